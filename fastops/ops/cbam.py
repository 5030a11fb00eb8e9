"""fastops.cbam: the public function, its backends, fake kernels and autograd."""
from typing import Optional

import torch

from .. import _ext, backends
from .. import reference as _ref
from .._layout import memory_format_of
from . import _attn_common as _ac
from . import _checks, _registration

OP = "cbam"
MAX_SPATIAL_KERNEL = 15


def cbam(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    conv_weight: torch.Tensor,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    bn_running_mean: torch.Tensor,
    bn_running_var: torch.Tensor,
    bn_eps: float = 1e-5,
    training: bool = False,
    momentum: float = 0.1,
    act: str = "relu",
    gate: str = "sigmoid",
) -> torch.Tensor:
    r"""CBAM channel + spatial attention, fused: timm's ``CbamModule`` (``ChannelAttn`` then ``SpatialAttn``).

    .. math::
        c_a[n, c] &= \mathrm{gate}\big(\mathrm{mlp}(\mathrm{mean}_{hw}\,x)[n, c] + \mathrm{mlp}(\max_{hw} x)[n, c]\big),
        \quad \mathrm{mlp}(p) = W_2\,\mathrm{act}(W_1 p + b_1) + b_2 \\
        x_1 &= x \cdot c_a, \qquad s = [\mathrm{mean}_c\,x_1,\ \max_c x_1] \in \mathbb{R}^{N\times 2\times H\times W} \\
        s_a &= \mathrm{gate}(\mathrm{BN}(\mathrm{conv}_{k\times k}(s))), \qquad y = x_1 \cdot s_a

    Passes over x: avg + max pooling in one; the channel-wise mean / max of ``x * ca`` in one (``x_1`` is
    never written); the k x k conv, BN, gate and final scale in one. fp32 accumulation throughout.

    Args:
        x: (N, C, H, W), float16 / bfloat16 / float32 (float64 on CPU), NCHW or channels_last.
        fc1_weight (R, C) or (R, C, 1, 1); fc1_bias (R,) or None (timm: ``mlp_bias=False``).
        fc2_weight (C, R) or (C, R, 1, 1); fc2_bias (C,) or None.
        conv_weight: (1, 2, k, k), odd k <= 15 (timm's ``spatial.conv.conv.weight``), padding k // 2, no bias.
        bn_weight, bn_bias, bn_running_mean, bn_running_var: (1,) (timm's ``spatial.conv.bn``).
        bn_eps, momentum: as ``nn.BatchNorm2d``.
        training: BN uses the batch statistics of the conv output over (N, H, W) and updates the running
            stats in place (running_var with the unbiased variance), as ``F.batch_norm(training=True)``.
        act: ``"relu"``, ``"silu"`` or ``"gelu"``; gate: ``"sigmoid"`` or ``"hard_sigmoid"`` (both gates).

    Returns:
        (N, C, H, W) in x's layout. Differentiable in x and every parameter except the running stats.
        The gradient of a max is split evenly among tied maxima, as ``torch.amax``'s.
    """
    _checks.tensor(OP, "x", x, 4, shape_doc="(N, C, H, W)")
    act = _ac.choice(OP, "act", act, _ac.ACTS)
    gate = _ac.choice(OP, "gate", gate, _ac.GATES)
    _checks.batch_norm_options(OP, bn_eps, training, momentum, eps_name="bn_eps")
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight = _checks.autocast_to_x(
        x.device.type, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight)
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"fastops.{OP}: x must have N, C >= 1 and H * W >= 1, got shape {tuple(x.shape)}")
    x = _ac.dense(x)
    w1, b1, w2, b2 = _ac.mlp_weights(OP, x.shape[1], fc1_weight, fc1_bias, fc2_weight, fc2_bias, x)
    _checks.tensor(OP, "conv_weight", conv_weight, 4, shape_doc="(1, 2, k, k)")
    k = conv_weight.shape[-1]
    if conv_weight.shape[:3] != (1, 2, k) or k % 2 == 0 or k > MAX_SPATIAL_KERNEL:
        raise ValueError(f"fastops.{OP}: conv_weight must have shape (1, 2, k, k) with odd k <= "
                         f"{MAX_SPATIAL_KERNEL}, got {tuple(conv_weight.shape)}")
    _checks.same_device_dtype(OP, "x", x, "conv_weight", conv_weight)
    # The BN's four scalars may have any float dtype (as F.batch_norm's: fp32 next to a half x when a model's
    # BN layers are kept in fp32); the kernels take them in the accumulation dtype.
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("bn_running_mean", bn_running_mean),
                    ("bn_running_var", bn_running_var)):
        _checks.tensor(OP, name, t, 1, shape_doc="(1,)")
        if t.shape[0] != 1:
            raise ValueError(f"fastops.{OP}: {name} must have shape (1,), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"fastops.{OP}: {name} is on {t.device} but x is on {x.device}; expected both on one device")
    bn_w, bn_b = bn_weight.to(_ac.acc_dtype(x)), bn_bias.to(_ac.acc_dtype(x))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    if training and count < 2:
        raise ValueError(f"fastops.{OP}: training needs more than one value per BN channel (N * H * W >= 2), "
                         f"got x of shape {tuple(x.shape)}")
    backend = backends.choose(OP, x.device, x)
    if backend == "reference":
        return _ref.cbam(x, w1, b1, w2, b2, conv_weight, bn_weight, bn_bias, bn_running_mean, bn_running_var,
                         bn_eps, training, momentum, act, gate)
    fn = torch.ops.fastops.cbam_triton if backend == "triton" else torch.ops.fastops.cbam
    # Eval normalises with the running stats; training with the batch stats the kernel computes.
    out, _, _, stats = _registration.call(fn, x, w1, b1, w2, b2, conv_weight.contiguous(), bn_w, bn_b,
                                          bn_running_mean.to(_ac.acc_dtype(x)), bn_running_var.to(_ac.acc_dtype(x)),
                                          float(bn_eps), training, act, gate)
    if training:
        with torch.no_grad():
            unbiased = stats[1] * (count / (count - 1))
            bn_running_mean.mul_(1 - momentum).add_(stats[0].to(bn_running_mean.dtype), alpha=momentum)
            bn_running_var.mul_(1 - momentum).add_(unbiased.to(bn_running_var.dtype), alpha=momentum)
    return out


backends.register_kernel_backends(OP)


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _fake_forward(x, w1, b1, w2, b2, conv_w, bn_w, bn_b, bn_mean, bn_var, eps, training, act, gate):
    N, C, H, W = x.shape
    f32 = dict(dtype=_ac.acc_dtype(x), device=x.device)
    return (torch.empty_like(x, memory_format=memory_format_of(x)), torch.empty((N, 2, C), **f32),
            torch.empty((N, 2, H, W), **f32), torch.empty((2,), **f32))


def _fake_backward(grad_out, x, pooled, spatial, stats, w1, b1, w2, b2, conv_w, bn_w, bn_b, eps, training, act, gate):
    return (torch.empty_like(x, memory_format=memory_format_of(x)), torch.empty_like(w1),
            w1.new_empty((w1.shape[0],)), torch.empty_like(w2), w2.new_empty((w2.shape[0],)),
            torch.empty_like(conv_w), torch.empty_like(bn_w), torch.empty_like(bn_b))


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, conv_w, bn_w, bn_b, bn_mean, bn_var, eps, training, act, gate = inputs
    out, pooled, spatial, stats = output
    ctx.mark_non_differentiable(pooled, spatial, stats)
    ctx.save_for_backward(x, pooled, spatial, stats, w1, b1, w2, b2, conv_w, bn_w, bn_b)
    ctx.conf = (eps, training, act, gate)


def _make_backward(backward_op):
    def backward(ctx, grad_out, *_unused):
        x, pooled, spatial, stats, w1, b1, w2, b2, conv_w, bn_w, bn_b = ctx.saved_tensors
        gx, gw1, gb1, gw2, gb2, gcw, gbw, gbb = backward_op(
            grad_out.contiguous(memory_format=memory_format_of(x)), x, pooled, spatial, stats,
            w1, b1, w2, b2, conv_w, bn_w, bn_b, *ctx.conf)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw1 if need[1] else None, gb1 if b1 is not None and need[2] else None,
                gw2 if need[3] else None, gb2 if b2 is not None and need[4] else None,
                gcw if need[5] else None, gbw if need[6] else None, gbb if need[7] else None,
                None, None, None, None, None, None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("cbam", "cbam_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import cbam as _triton_cbam  # noqa: F401,E402  (defines the Triton custom ops)

    _register("cbam_triton", "cbam_backward_triton")
