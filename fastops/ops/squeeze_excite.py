"""fastops.squeeze_excite and fastops.conv1x1_squeeze_excite: the public functions, their backends, fake kernels
and autograd."""
from typing import Optional

import torch

from .. import _ext, backends
from .. import reference as _ref
from .._layout import memory_format_of
from . import _attn_common as _ac
from . import _checks, _registration
from .bn_act import channel_param

OP = "squeeze_excite"
CONV_OP = "conv1x1_squeeze_excite"


def squeeze_excite(
    x: torch.Tensor,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    act: str = "relu",
    gate: str = "sigmoid",
    residual: Optional[torch.Tensor] = None,
    out_act: Optional[str] = None,
) -> torch.Tensor:
    r"""Squeeze-and-excitation, fused: timm's ``SEModule`` (and SE-ResNet's ``relu(se(x) + shortcut)``).

    .. math::
        s[n, c] = \frac{1}{HW}\sum_{h,w} x[n, c, h, w], \qquad
        g = \mathrm{gate}(W_2\,\mathrm{act}(W_1 s + b_1) + b_2), \qquad
        y[n, c, h, w] = \mathrm{out\_act}(x[n, c, h, w]\, g[n, c] + r[n, c, h, w])

    One reduction pass over ``x``, the per-sample MLP, then one pass that scales, adds the residual and
    applies ``out_act``. Accumulation and the MLP are fp32.

    Args:
        x: (N, C, H, W), float16 / bfloat16 / float32 (float64 on CPU), NCHW or channels_last.
        fc1_weight: (R, C) or (R, C, 1, 1) (timm's ``fc1.weight``); fc1_bias: (R,) or None.
        fc2_weight: (C, R) or (C, R, 1, 1); fc2_bias: (C,) or None.
        act: ``"relu"``, ``"silu"`` or ``"gelu"`` (erf) between the two layers.
        gate: ``"sigmoid"`` or ``"hard_sigmoid"`` (``relu6(z + 3) / 6``).
        residual: None or a tensor of x's shape, added after the scale.
        out_act: None / ``"none"`` or ``"relu"``, applied last.

    Returns:
        (N, C, H, W) in x's layout (a non-dense x gives NCHW). Differentiable in x, every parameter and
        residual.
    """
    _checks.tensor(OP, "x", x, 4, shape_doc="(N, C, H, W)")
    act = _ac.choice(OP, "act", act, _ac.ACTS)
    gate = _ac.choice(OP, "gate", gate, _ac.GATES)
    out_act = _ac.choice(OP, "out_act", out_act, _ac.OUT_ACTS)
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual = _checks.autocast_to_x(
        x.device.type, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"fastops.{OP}: x must have N, C >= 1 and H * W >= 1, got shape {tuple(x.shape)}")
    x = _ac.dense(x)
    w1, b1, w2, b2 = _ac.mlp_weights(OP, x.shape[1], fc1_weight, fc1_bias, fc2_weight, fc2_bias, x)
    if residual is not None:
        _checks.tensor(OP, "residual", residual, 4, shape_doc="(N, C, H, W)")
        if residual.shape != x.shape:
            raise ValueError(f"fastops.{OP}: residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        _checks.same_device_dtype(OP, "x", x, "residual", residual)
        residual = _ac.like_x(residual, x)
    backend = backends.choose(OP, x.device, x)
    if backend == "reference":
        return _ref.squeeze_excite(x, w1, b1, w2, b2, act, gate, residual, out_act)
    fn = torch.ops.fastops.squeeze_excite_triton if backend == "triton" else torch.ops.fastops.squeeze_excite
    return _registration.call(fn, x, w1, b1, w2, b2, residual, act, gate, out_act)[0]


backends.register_kernel_backends(OP)


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _fake_forward(x, w1, b1, w2, b2, residual, act, gate, out_act):
    return (torch.empty_like(x, memory_format=memory_format_of(x)),
            x.new_empty((x.shape[0], x.shape[1]), dtype=_ac.acc_dtype(x)))


def _fake_backward(grad_out, x, out, pooled, w1, b1, w2, b2, has_residual, act, gate, out_act):
    gx = torch.empty_like(x, memory_format=memory_format_of(x))
    gr = torch.empty_like(x, memory_format=memory_format_of(x)) if has_residual else x.new_empty((0,))
    return gx, torch.empty_like(w1), w1.new_empty((w1.shape[0],)), torch.empty_like(w2), w2.new_empty((w2.shape[0],)), gr


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, residual, act, gate, out_act = inputs
    out, pooled = output
    ctx.mark_non_differentiable(pooled)
    # The backward reads the output only for out_act="relu"'s mask. Not saving it otherwise lets callers add
    # to it in place, as SE-ResNet's `x = se(x); x += shortcut` does.
    ctx.save_for_backward(x, out if out_act == "relu" else None, pooled, w1, b1, w2, b2)
    ctx.conf = (residual is not None, act, gate, out_act)


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_pooled):
        x, out, pooled, w1, b1, w2, b2 = ctx.saved_tensors
        # Without a saved output, x (same shape and layout) stands in: its values are not read then.
        grads = backward_op(grad_out.contiguous(memory_format=memory_format_of(x)), x, x if out is None else out,
                            pooled, w1, b1, w2, b2, *ctx.conf)
        gx, gw1, gb1, gw2, gb2, gr = grads
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw1 if need[1] else None, gb1 if b1 is not None and need[2] else None,
                gw2 if need[3] else None, gb2 if b2 is not None and need[4] else None,
                gr if ctx.conf[0] and need[5] else None, None, None, None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("squeeze_excite", "squeeze_excite_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import squeeze_excite as _triton_se  # noqa: F401,E402  (defines the Triton custom ops)

    _register("squeeze_excite_triton", "squeeze_excite_backward_triton")


# conv1x1_squeeze_excite -------------------------------------------------------------------------

def conv1x1_squeeze_excite(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    act: str = "relu",
    gate: str = "sigmoid",
    residual: Optional[torch.Tensor] = None,
    out_act: Optional[str] = None,
) -> torch.Tensor:
    r"""A 1x1 convolution followed by :func:`squeeze_excite`: SE-ResNet's ``relu(se(bn3(conv3(x))) + shortcut)``
    in eval mode, with bn3 folded into the convolution's weight and bias.

    .. math::
        y = W x + b \;\text{(per pixel)}, \qquad
        \mathrm{out} = \mathrm{out\_act}(y \cdot \mathrm{gate}(W_2\,\mathrm{act}(W_1 \mathrm{mean}_{hw} y + b_1) + b_2)
        + r)

    On the CPU backend, for fp32 maps whose convolution runs as fastops' GEMM (C_in <= 768; NCHW also
    C_in * C <= 196608 and H * W > 1), ``y`` is never stored: the pooling commutes with the 1x1 convolution,
    :math:`\mathrm{mean}_{hw}(W x + b) = W\,\mathrm{mean}_{hw}(x) + b`, so x is pooled, the gate computed for
    every sample, and the convolution's GEMM applies the gate, the residual and ``out_act`` to its accumulators
    as it writes ``out``. The SE then adds one read of x (a quarter of y's size in a bottleneck) to the
    convolution's traffic. Other inputs run the two CPU kernels in turn (conv_bias_act, then squeeze_excite).
    There is no CUDA or Triton kernel: on CUDA tensors the reference runs (``fastops info`` lists it);
    SE-ResNet's fused model calls conv_bias_act and squeeze_excite there.

    Args:
        x: (N, C_in, H, W), float16 / bfloat16 / float32 / float64, NCHW or channels_last.
        weight: (C, C_in, 1, 1) in x's dtype (stride 1, no padding, one group).
        bias: (C,) any float dtype (added in fp32, fp64 for fp64 x) or None.
        fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual (N, C, H, W), out_act: as
            :func:`squeeze_excite`.

    Returns:
        (N, C, H, W) in x's layout. Differentiable in x, weight, bias, every MLP parameter and residual: the
        backward recomputes ``y`` and runs squeeze_excite's and conv_bias_act's backward kernels.
    """
    op = CONV_OP
    _checks.tensor(op, "x", x, 4, shape_doc="(N, C_in, H, W)")
    act = _ac.choice(op, "act", act, _ac.ACTS)
    gate = _ac.choice(op, "gate", gate, _ac.GATES)
    out_act = _ac.choice(op, "out_act", out_act, _ac.OUT_ACTS)
    x, weight = _checks.autocast_inputs(x.device.type, x, weight)
    fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual = _checks.autocast_to_x(
        x.device.type, x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual)
    _checks.tensor(op, "weight", weight, 4, shape_doc="(C, C_in, 1, 1)")
    if weight.shape[1] != x.shape[1] or weight.shape[2:] != (1, 1) or weight.shape[0] == 0:
        raise ValueError(f"fastops.{op}: weight must have shape (C, C_in, 1, 1) with C_in = {x.shape[1]} "
                         f"(x.shape[1]), got {tuple(weight.shape)}")
    _checks.same_device_dtype(op, "x", x, "weight", weight)
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] * x.shape[3] == 0:
        raise ValueError(f"fastops.{op}: x must have N, C_in >= 1 and H * W >= 1, got shape {tuple(x.shape)}")
    C = weight.shape[0]
    b = channel_param(op, "bias", bias, x, C)
    x = _ac.dense(x)
    w1, b1, w2, b2 = _ac.mlp_weights(op, C, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, "weight.shape[0]")
    if residual is not None:
        _checks.tensor(op, "residual", residual, 4, shape_doc="(N, C, H, W)")
        expect = (x.shape[0], C, x.shape[2], x.shape[3])
        if tuple(residual.shape) != expect:
            raise ValueError(f"fastops.{op}: residual must have the output's shape {expect}, got "
                             f"{tuple(residual.shape)}")
        _checks.same_device_dtype(op, "x", x, "residual", residual)
        residual = _ac.like_x(residual, x)
    backend = backends.choose(op, x.device, x)
    if backend == "reference":
        return _ref.conv1x1_squeeze_excite(x, weight, b, w1, b1, w2, b2, act, gate, residual, out_act)
    return _registration.call(torch.ops.fastops.conv1x1_squeeze_excite, x, weight, b, w1, b1, w2, b2, residual,
                              act, gate, out_act)[0]


backends.register(CONV_OP, "reference", lambda *args: None)
backends.register(CONV_OP, "cpu", lambda x, *rest: backends.c_ext_reason(x.device, "cpu"))


def _conv_fake_forward(x, weight, bias, w1, b1, w2, b2, residual, act, gate, out_act):
    shape = (x.shape[0], weight.shape[0], x.shape[2], x.shape[3])
    return (x.new_empty(shape).contiguous(memory_format=memory_format_of(x)),
            x.new_empty((x.shape[0], weight.shape[0]), dtype=_ac.acc_dtype(x)))


def _conv_setup_context(ctx, inputs, output):
    x, weight, bias, w1, b1, w2, b2, residual, act, gate, out_act = inputs
    out, pooled = output
    ctx.mark_non_differentiable(pooled)
    ctx.save_for_backward(x, weight, bias, out if out_act == "relu" else None, pooled, w1, b1, w2, b2)
    ctx.conf = (residual is not None, act, gate, out_act)


def _conv_backward(ctx, grad_out, _grad_pooled):
    x, weight, bias, out, pooled, w1, b1, w2, b2 = ctx.saved_tensors
    has_residual, act, gate, out_act = ctx.conf
    conv_args = ([1, 1], [0, 0, 0, 0], [1, 1], 1, "none")
    # y = conv(x) is not kept by the forward (keeping it out of memory is the point of the op): recomputed.
    y = _registration.call(torch.ops.fastops.conv_bias_act, x, weight, bias, None, *conv_args)
    grad_out = grad_out.contiguous(memory_format=memory_format_of(y))
    gy, gw1, gb1, gw2, gb2, gr = _registration.call(
        torch.ops.fastops.squeeze_excite_backward, grad_out, y, y if out is None else out, pooled, w1, b1, w2, b2,
        has_residual, act, gate, out_act)
    # act "none": the backward reads no output (gy stands in).
    gx, gw, gb, _ = _registration.call(torch.ops.fastops.conv_bias_act_backward, gy, x, weight, bias, None, gy,
                                       *conv_args)
    need = ctx.needs_input_grad
    return (gx if need[0] else None, gw if need[1] else None, gb if bias is not None and need[2] else None,
            gw1 if need[3] else None, gb1 if b1 is not None and need[4] else None, gw2 if need[5] else None,
            gb2 if b2 is not None and need[6] else None, gr if has_residual and need[7] else None, None, None, None)


if _ext.C_LOADED:
    torch.library.register_fake(f"fastops::{CONV_OP}")(_conv_fake_forward)
    torch.library.register_autograd(f"fastops::{CONV_OP}", _conv_backward, setup_context=_conv_setup_context)
