"""fastops.spatial_reduction: the public function, its backends, fake kernels and autograd."""
from typing import Optional, Sequence

import torch

from .. import _ext, backends
from .. import reference as _ref
from ..reference.spatial_reduction import POOL_SIZE
from . import _checks, _registration

OP = "spatial_reduction"

# The CUDA GEMM splits its C*k*k reduction over a grid dimension (at most 65535 blocks of 64).
CUDA_MAX_K = 64 * 65535


def spatial_reduction(
    x: torch.Tensor,
    feat_size: Sequence[int],
    sr_weight: torch.Tensor,
    sr_bias: Optional[torch.Tensor],
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    sr_ratio: int,
    linear: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""PVT's spatial reduction, fused: the tokens timm's ``pvt_v2.Attention`` feeds to its ``kv`` Linear.

    With ``x`` the tokens of an ``H x W`` map (token ``n = h * W + w``):

    * ``linear=False`` (PVT v1 / v2): ``y = Conv2d(C, C, kernel = stride = sr_ratio)(x)``, no padding
      (rows / columns past ``(H // sr) * sr`` are not read), ``Nr = (H // sr) (W // sr)``;
      ``out = LayerNorm(y)``.
    * ``linear=True`` (PVT v2 ``*_li``): ``y = Conv2d 1x1(AdaptiveAvgPool2d(7)(x))``, ``Nr = 49``;
      ``out = GELU(LayerNorm(y))`` (exact erf GELU).

    .. math::
        \mathrm{out}_{r} = \mathrm{act}\Big(\frac{y_r - \mu_r}{\sqrt{\sigma_r^2 + \epsilon}}\,\gamma + \beta\Big),
        \qquad y_r = b + \sum_{c, k_y, k_x} W_{:, c, k_y, k_x}\, x_{\mathrm{patch}(r, k_y, k_x), c}

    ``x`` is read in its token layout (no permute / reshape copies); the convolution, the LayerNorm and the
    GELU run as one fused pass per output row. Accumulation and statistics are fp32.

    Args:
        x: (B, N, C) with N = H * W. float16 / bfloat16 / float32 (float64 on CPU).
        feat_size: (H, W), the map the tokens come from.
        sr_weight: (C, C, sr_ratio, sr_ratio), or (C, C, 1, 1) when ``linear`` (timm's ``sr.weight``).
        sr_bias: (C,) or None (``sr.bias``).
        norm_weight, norm_bias: (C,), the LayerNorm's affine parameters (``norm.weight``, ``norm.bias``).
        sr_ratio: the conv's kernel size and stride, >= 1 (ignored when ``linear``); H, W >= sr_ratio.
        linear: the pool + 1x1 conv + GELU variant.
        eps: the LayerNorm's eps.

    Parameters are cast to x's dtype (as conv2d under autocast does); gradients flow back through the cast.

    Returns:
        (B, Nr, C) contiguous in x's dtype. Differentiable in x and every parameter.
    """
    _checks.tensor(OP, "x", x, 3, shape_doc="(B, N, C)")
    H, W = _checks.pair(OP, "feat_size", feat_size, 1)
    B, N, C = x.shape
    if B < 1 or C < 1:
        raise ValueError(f"fastops.{OP}: x must have B, C >= 1, got shape {tuple(x.shape)}")
    if H * W != N:
        raise ValueError(f"fastops.{OP}: feat_size {(H, W)} gives H * W = {H * W} tokens but x has N = {N} "
                         f"(x of shape {tuple(x.shape)})")
    _checks.flag(OP, "linear", linear)
    if not isinstance(sr_ratio, int) or isinstance(sr_ratio, bool) or sr_ratio < 1:
        raise ValueError(f"fastops.{OP}: sr_ratio must be a positive int, got {sr_ratio!r}")
    _checks.positive_finite(OP, "eps", eps)
    k = 1 if linear else sr_ratio
    if not linear and (H < k or W < k):
        raise ValueError(f"fastops.{OP}: feat_size {(H, W)} is smaller than sr_ratio={k}; the strided conv "
                         f"would produce no tokens")
    _checks.tensor(OP, "sr_weight", sr_weight, 4, shape_doc=f"(C, C, k, k) = {(C, C, k, k)}")
    if tuple(sr_weight.shape) != (C, C, k, k):
        raise ValueError(f"fastops.{OP}: sr_weight must have shape (C, C, k, k) = {(C, C, k, k)} "
                         f"({'linear mode: a 1x1 conv' if linear else 'k = sr_ratio'}), got {tuple(sr_weight.shape)}")
    for name, t in (("sr_bias", sr_bias), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None and name == "sr_bias":
            continue
        _checks.tensor(OP, name, t, 1, shape_doc=f"({C},)")
        if t.shape[0] != C:
            raise ValueError(f"fastops.{OP}: {name} must have shape ({C},) (x's channels), got {tuple(t.shape)}")
    for name, t in (("sr_weight", sr_weight), ("sr_bias", sr_bias), ("norm_weight", norm_weight),
                    ("norm_bias", norm_bias)):
        if t is not None and t.device != x.device:
            raise ValueError(f"fastops.{OP}: {name} is on {t.device} but x is on {x.device}; "
                             f"expected both on one device")
    (x,) = _checks.autocast_inputs(x.device.type, x)
    w, b, nw, nb = (None if t is None else t.to(x.dtype) for t in (sr_weight, sr_bias, norm_weight, norm_bias))
    backend = backends.choose(OP, x.device, x, C, k)
    if backend == "reference":
        return _ref.spatial_reduction(x, (H, W), w, b, nw, nb, k, linear, float(eps))
    fn = torch.ops.fastops.spatial_reduction_triton if backend == "triton" else torch.ops.fastops.spatial_reduction
    return _registration.call(fn, x.contiguous(), [H, W], w.contiguous(), None if b is None else b.contiguous(),
                              nw.contiguous(), nb.contiguous(), k, linear, float(eps))[0]


def _cuda_limits(x, C=1, k=1) -> Optional[str]:
    if C * k * k > CUDA_MAX_K:
        return f"C * sr_ratio^2 = {C * k * k}; the CUDA kernels take at most {CUDA_MAX_K}"
    return None


def _triton_limits(x, C=1, k=1) -> Optional[str]:
    from ..triton import spatial_reduction as _ts

    return _ts.limit_reason(x.dtype, C, k)


backends.register_kernel_backends(OP, limits={"cuda": _cuda_limits, "triton": _triton_limits})


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _num_reduced(feat_size, sr_ratio, linear) -> int:
    if linear:
        return POOL_SIZE * POOL_SIZE
    return (feat_size[0] // sr_ratio) * (feat_size[1] // sr_ratio)


def _fake_forward(x, feat_size, weight, bias, norm_weight, norm_bias, sr_ratio, linear, eps):
    B, _, C = x.shape
    nr = _num_reduced(feat_size, sr_ratio, linear)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return x.new_empty((B, nr, C)), x.new_empty((B, nr, C), dtype=acc), x.new_empty((B, nr, 2), dtype=acc)


def _fake_backward(grad_out, x, feat_size, weight, norm_weight, norm_bias, y, stats, sr_ratio, linear, bias_grad):
    C = x.shape[-1]
    return (torch.empty_like(x), torch.empty_like(weight), x.new_empty((C,) if bias_grad else (0,)),
            torch.empty_like(norm_weight), torch.empty_like(norm_bias))


def _setup_context(ctx, inputs, output):
    x, feat_size, weight, bias, norm_weight, norm_bias, sr_ratio, linear, eps = inputs
    _, y, stats = output
    ctx.mark_non_differentiable(y, stats)
    ctx.save_for_backward(x, weight, norm_weight, norm_bias, y, stats)
    ctx.conf = (feat_size, sr_ratio, linear)
    ctx.has_bias = bias is not None


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_y, _grad_stats):
        x, weight, norm_weight, norm_bias, y, stats = ctx.saved_tensors
        feat_size, sr_ratio, linear = ctx.conf
        need = ctx.needs_input_grad
        bias_grad = ctx.has_bias and need[3]
        gx, gw, gb, gnw, gnb = backward_op(grad_out.contiguous(), x, feat_size, weight, norm_weight, norm_bias,
                                           y, stats, sr_ratio, linear, bias_grad)
        return (gx if need[0] else None, None, gw if need[2] else None, gb if bias_grad else None,
                gnw if need[4] else None, gnb if need[5] else None, None, None, None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("spatial_reduction", "spatial_reduction_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import spatial_reduction as _triton_sr  # noqa: F401,E402  (defines the Triton custom ops)

    _register("spatial_reduction_triton", "spatial_reduction_backward_triton")
