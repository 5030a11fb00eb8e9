"""fastops.bn_act: BatchNorm (+ residual) + activation in one kernel; its backends, fake kernels and autograd."""
from typing import Optional

import torch

from .. import _ext, backends
from .. import reference as _ref
from .._layout import memory_format_of
from . import _checks, _registration

OP = "bn_act"
ACTS = tuple(_ref.BN_ACTS)


def check_act(op: str, act) -> None:
    if act not in ACTS:
        raise ValueError(f"fastops.{op}: act must be one of {', '.join(ACTS)}; got {act!r}")


def as_layout_of(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """t in x's memory format, dense (a no-op when it already is)."""
    return t.contiguous(memory_format=memory_format_of(x))


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when it is NCHW- or channels_last-contiguous, else an NCHW copy (the layouts the kernels read)."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def channel_param(op: str, name: str, t: Optional[torch.Tensor], x: torch.Tensor, channels: int):
    """Checks a per-channel vector and returns it as the kernels take it: fp32 (fp64 for fp64 x), contiguous."""
    if t is None:
        return None
    _checks.tensor(op, name, t, 1, shape_doc=f"({channels},)")
    if t.shape[0] != channels:
        raise ValueError(f"fastops.{op}: {name} must have shape ({channels},), got {tuple(t.shape)}")
    if t.device != x.device:
        raise ValueError(f"fastops.{op}: {name} is on {t.device} but x is on {x.device}; expected both on one device")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return t.to(acc).contiguous()


def update_running_stats(running_mean, running_var, mean, var, count: int, momentum: float) -> None:
    """nn.BatchNorm2d's update: running = (1 - momentum) running + momentum batch, with the unbiased variance."""
    with torch.no_grad():
        if running_mean is not None:
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
        if running_var is not None:
            running_var.lerp_((var * (count / (count - 1))).to(running_var.dtype), momentum)


def bn_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float = 1e-5,
           act: str = "relu", residual: Optional[torch.Tensor] = None, training: bool = False,
           momentum: float = 0.1) -> torch.Tensor:
    r"""BatchNorm2d, residual add and activation in one pass (two in training):
    ``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps) + residual)``.

    .. math::
        y[n, c, h, w] = \mathrm{act}\Big(\frac{x[n, c, h, w] - \mu_c}{\sqrt{\sigma^2_c + \epsilon}}\,
                        \gamma_c + \beta_c + r[n, c, h, w]\Big)

    with :math:`\mu, \sigma^2` the running statistics in eval mode, and in training mode the batch mean and
    biased variance over (N, H, W), after which ``running_mean`` / ``running_var`` (when given) are updated in
    place as ``F.batch_norm`` does: ``running = (1 - momentum) running + momentum batch`` (the variance
    unbiased, times M / (M - 1), M = N H W).

    Args:
        x: (N, C, H, W), float16 / bfloat16 / float32 (float64 on CPU), NCHW or channels_last.
        weight, bias: (C,) BN affine parameters (gamma, beta), or None (1 and 0).
        running_mean, running_var: (C,) running statistics; required when ``training`` is False.
        eps: added to the variance.  momentum: running-statistics factor (training only).
        act: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"gelu"`` (exact) or ``"hardswish"``.
        residual: None, or a tensor of x's shape added before the activation (pre-activation
            shortcut adds, e.g. ``relu(bn(x) + shortcut)``).
        training: use batch statistics (and update the running ones) instead of the running statistics.

    Returns:
        (N, C, H, W) in x's dtype and layout. Statistics and arithmetic in fp32 (fp64 for float64).
        Differentiable in x, weight, bias and residual (through the batch statistics in training mode).
    """
    return _bn_act(OP, x, weight, bias, running_mean, running_var, eps, act, residual, training, momentum)


def _bn_act(op: str, x, weight, bias, running_mean, running_var, eps, act, residual, training, momentum,
            names: Optional[dict] = None) -> torch.Tensor:
    """:func:`bn_act`, its errors naming ``fastops.<op>`` and, through ``names``, the caller's own argument
    names (conv_bn_act's BN runs through here on its conv output)."""
    names = names or {}
    xn, wn, bn, rn = (names.get(k, k) for k in ("x", "weight", "bias", "residual"))
    _checks.tensor(op, xn, x, 4, shape_doc="(N, C, H, W)")
    check_act(op, act)
    if residual is not None:
        _checks.tensor(op, rn, residual, 4, shape_doc="(N, C, H, W)")
    (residual,) = _checks.autocast_to_x(x.device.type, x, residual)
    # C = 0 runs on the cpu kernel but not through F.batch_norm (the reference): refused on every backend.
    _checks.positive_dim(op, xn, x, 1, "C")
    C = x.shape[1]
    _checks.batch_norm_options(op, eps, training, momentum)
    w, b = channel_param(op, wn, weight, x, C), channel_param(op, bn, bias, x, C)
    rm, rv = (channel_param(op, "running_mean", running_mean, x, C),
              channel_param(op, "running_var", running_var, x, C))
    if not training and (rm is None or rv is None):
        raise ValueError(f"fastops.{op}: running_mean and running_var are required when training=False")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"fastops.{op}: give both running_mean and running_var, or neither")
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"fastops.{op}: {rn} must have {xn}'s shape {tuple(x.shape)}, got "
                             f"{tuple(residual.shape)}")
        _checks.same_device_dtype(op, xn, x, rn, residual)
    count = x.numel() // C
    if training and count <= 1:
        raise ValueError(f"fastops.{op}: training needs more than one value per channel (N * H * W > 1), "
                         f"got {xn} of shape {tuple(x.shape)}")
    x = dense(x)
    if residual is not None:
        residual = as_layout_of(residual, x)
    backend = backends.choose(OP, x.device, x)
    if backend == "reference":
        return _ref.bn_act(x, weight, bias, running_mean, running_var, eps, act, residual, training, momentum)
    kernel = torch.ops.fastops.bn_act_triton if backend == "triton" else torch.ops.fastops.bn_act
    out, mean, var = _registration.call(kernel, x, w, b, None if training else rm, None if training else rv,
                                        residual, float(eps), act, training)
    if training:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return out


# Backends ---------------------------------------------------------------------------------------

def _triton_limit(x, *rest):
    from ..triton import bn_act as _t

    return _t.limit_reason(x.dtype, x.shape[1])


backends.register_kernel_backends(OP, limits={"triton": _triton_limit})


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fake_forward(x, weight, bias, mean, var, residual, eps, act, training):
    C = x.shape[1]
    return (torch.empty_like(x, memory_format=memory_format_of(x)), x.new_empty((C,), dtype=_stat_dtype(x)),
            x.new_empty((C,), dtype=_stat_dtype(x)))


def _fake_backward(grad_out, x, weight, bias, save_mean, save_var, residual, eps, act, training):
    C = x.shape[1]
    grad_res = torch.empty_like(x, memory_format=memory_format_of(x)) if residual is not None else x.new_empty((0,))
    return (torch.empty_like(x, memory_format=memory_format_of(x)), x.new_empty((C,), dtype=_stat_dtype(x)),
            x.new_empty((C,), dtype=_stat_dtype(x)), grad_res)


def _setup_context(ctx, inputs, output):
    x, weight, bias, mean, var, residual, eps, act, training = inputs
    _, save_mean, save_var = output
    ctx.save_for_backward(x, weight, bias, save_mean, save_var, residual)
    ctx.conf = (eps, act, training)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_mean, _grad_var):
        x, weight, bias, save_mean, save_var, residual = ctx.saved_tensors
        gx, gw, gb, gr = backward_op(grad_out.contiguous(memory_format=memory_format_of(x)), x, weight, bias,
                                     save_mean, save_var, residual, *ctx.conf)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if weight is not None and need[1] else None,
                gb if bias is not None and need[2] else None, None, None,
                gr if residual is not None and need[5] else None, None, None, None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("bn_act", "bn_act_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import bn_act as _triton_bn  # noqa: F401,E402  (defines the Triton custom ops)

    _register("bn_act_triton", "bn_act_backward_triton")
