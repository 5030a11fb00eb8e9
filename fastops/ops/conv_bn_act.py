"""fastops.conv_bias_act (convolution with a fused bias + residual + activation epilogue) and
fastops.conv_bn_act (conv -> BatchNorm -> activation, BN folded into the conv in eval mode); backends of the
conv_bias_act kernel op, its fake kernels and autograd."""
from typing import Optional, Tuple, Union

import torch

from .. import _ext, backends
from .. import reference as _ref
from .._layout import memory_format_of
from . import _checks, _registration
from .bn_act import _bn_act, as_layout_of, channel_param, check_act, dense

OP = "conv_bias_act"


def _conv_args(op, x, weight, stride, padding, dilation, groups):
    _checks.tensor(op, "x", x, 4, shape_doc="(N, C_in, H, W)")
    _checks.tensor(op, "weight", weight, 4, shape_doc="(C_out, C_in / groups, kh, kw)")
    # Empty channel dims: the cpu kernel's backward and oneDNN / F.conv2d refuse or mishandle them.
    _checks.positive_dim(op, "x", x, 1, "C_in")
    _checks.positive_dim(op, "weight", weight, 0, "C_out")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"fastops.{op}: groups must be a positive int, got {groups!r}")
    cin, cout = x.shape[1], weight.shape[0]
    if cin % groups or cout % groups:
        raise ValueError(f"fastops.{op}: groups={groups} must divide x's channels ({cin}) and weight.shape[0] "
                         f"({cout})")
    if weight.shape[1] != cin // groups:
        raise ValueError(f"fastops.{op}: weight must have shape (C_out, C_in / groups, kh, kw) = "
                         f"({cout}, {cin // groups}, kh, kw), got {tuple(weight.shape)}")
    stride = _checks.pair(op, "stride", stride, 1, _checks.MAX_CONV_ARG)
    dilation = _checks.pair(op, "dilation", dilation, 1, _checks.MAX_CONV_ARG)
    kh, kw = _checks.kernel_size(op, "weight", weight)
    pad = _checks.conv_padding(op, padding, kh, kw, stride, dilation)
    _checks.dilated_kernel_fits(op, x, kh, kw, pad, dilation)
    return list(stride), pad, list(dilation)


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
                  padding: Union[int, tuple, str] = 0, dilation=1, groups: int = 1, act: str = "none",
                  residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""Convolution with its epilogue fused: ``act(F.conv2d(x, weight, None, stride, padding, dilation, groups)
    + bias + residual)``, written once.

    .. math::
        y[n, o, i, j] = \mathrm{act}\Big(b_o + r[n, o, i, j] + \sum_{c,p,q} w[o, c, p, q]\,
                        x_{pad}[n, g(o) C_g + c,\; i s_h + p d_h,\; j s_w + q d_w]\Big)

    Args:
        x: (N, C_in, H, W), float16 / bfloat16 / float32 (float64 on CPU), NCHW or channels_last.
        weight: (C_out, C_in / groups, kh, kw), x's dtype and device.
        bias: (C_out,) or None; added in fp32.
        stride, dilation: int or (h, w).  padding: int, (h, w), ``"same"`` (stride 1) or ``"valid"``.
        groups: as in ``F.conv2d``; groups == C_in == C_out is the depthwise case.
        act: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"gelu"`` (exact) or ``"hardswish"``.
        residual: None, or (N, C_out, H_out, W_out) in x's dtype, added before the activation.

    Returns:
        (N, C_out, H_out, W_out) in x's dtype and layout, accumulated in fp32. Differentiable in x, weight,
        bias and residual.
    """
    return _conv_bias_act(OP, x, weight, bias, stride, padding, dilation, groups, act, residual)


def _conv_bias_act(op, x, weight, bias, stride, padding, dilation, groups, act, residual):
    return run_conv_bias_act(*plan_conv_bias_act(op, x, weight, bias, stride, padding, dilation, groups, act,
                                                 residual))


def plan_conv_bias_act(op, x, weight, bias, stride, padding, dilation, groups, act, residual):
    """The checks and argument preparation of :func:`conv_bias_act`: returns ``(backend, args)`` for
    :func:`run_conv_bias_act`, ``args`` being ``(x, weight, bias, residual, stride, padding, dilation, groups,
    act)`` as the kernels take them (x / residual replaced by dense copies where they needed one)."""
    stride, pad, dilation = _conv_args(op, x, weight, stride, padding, dilation, groups)
    check_act(op, act)
    x, weight, residual = _checks.autocast_inputs(x.device.type, x, weight, residual)
    _checks.same_device_dtype(op, "x", x, "weight", weight)
    cout = weight.shape[0]
    b = channel_param(op, "bias", bias, x, cout)
    oh, ow = _checks.conv_output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, pad, dilation)
    x = dense(x)
    if residual is not None:
        _checks.tensor(op, "residual", residual, 4, shape_doc="(N, C_out, H_out, W_out)")
        expect = (x.shape[0], cout, oh, ow)
        if tuple(residual.shape) != expect:
            raise ValueError(f"fastops.{op}: residual must have the output's shape {expect}, got "
                             f"{tuple(residual.shape)}")
        _checks.same_device_dtype(op, "x", x, "residual", residual)
        residual = as_layout_of(residual, x)
    backend = backends.choose(OP, x.device, x, weight, groups)
    return backend, (x, weight, b, residual, stride, pad, dilation, groups, act)


def run_conv_bias_act(backend: str, args: tuple) -> torch.Tensor:
    """The call that :func:`plan_conv_bias_act` prepared, on ``backend``."""
    if backend == "reference":
        return _ref.conv_bias_act(*args)
    kernel = torch.ops.fastops.conv_bias_act_triton if backend == "triton" else torch.ops.fastops.conv_bias_act
    return _registration.call(kernel, *args)


def reusable_part(backend: str, args: tuple, x, weight, bias, residual) -> Optional[tuple]:
    """The part of a prepared call that can serve later calls on other inputs of the same kind: ``(backend,
    args without x and residual)``; None when the preparation replaced x, weight, bias or residual by a copy
    (a later call would need the same conversion). It holds no activation. The caller decides what the part
    stays valid for."""
    if args[0] is x and args[1] is weight and args[2] is bias and args[3] is residual:
        return backend, args[1:3] + args[4:]
    return None


def run_reusable_part(part: tuple, x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.Tensor:
    """:func:`run_conv_bias_act` of a :func:`reusable_part` on a new x (and residual)."""
    backend, (weight, bias, stride, pad, dilation, groups, act) = part
    return run_conv_bias_act(backend, (x, weight, bias, residual, stride, pad, dilation, groups, act))


def fold_bn(weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
            bn_bias: Optional[torch.Tensor], running_mean: torch.Tensor, running_var: torch.Tensor,
            eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN folded into the conv: ``w' = w * s``, ``b' = bn_bias + (bias - mean) * s`` with
    ``s = bn_weight / sqrt(var + eps)``. w' in weight's dtype; b' in fp32 (fp64 for fp64 weights), as
    conv_bias_act adds it. Plain differentiable tensor ops (gradients reach every parameter)."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(running_var.to(acc) + eps)
    if bn_weight is not None:
        scale = scale * bn_weight.to(acc)
    shift = -running_mean.to(acc) if bias is None else bias.to(acc) - running_mean.to(acc)
    b = shift * scale
    if bn_bias is not None:
        b = b + bn_bias.to(acc)
    w = (weight.to(acc) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    return w, b


# bn_act's argument names as conv_bn_act calls them (its x is the conv output, whose shape residual must have).
_BN_NAMES = {"x": "the output", "weight": "bn_weight", "bias": "bn_bias"}


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], eps: float = 1e-5, stride=1, padding: Union[int, tuple, str] = 0,
                dilation=1, groups: int = 1, act: str = "relu", residual: Optional[torch.Tensor] = None,
                training: bool = False, momentum: float = 0.1) -> torch.Tensor:
    r"""Conv2d -> BatchNorm2d (+ residual) -> activation:
    ``act(F.batch_norm(F.conv2d(x, weight, bias, stride, padding, dilation, groups), running_mean,
    running_var, bn_weight, bn_bias, training, momentum, eps) + residual)``.

    * Eval (``training=False``): BN is folded into the conv (:func:`fold_bn`) and bias + residual + act run in
      the conv's epilogue (:func:`conv_bias_act`): one pass over the output, no BN or activation pass.
      :class:`fastops.nn.ConvBNAct` caches the folded weights between calls.
    * Training: the convolution (:func:`conv_bias_act` with no epilogue), then :func:`bn_act` in training mode
      (one statistics pass, one normalise + residual + act pass); ``running_mean`` / ``running_var`` (when
      given) are updated in place as ``F.batch_norm`` does (momentum, unbiased variance).

    Args:
        x: (N, C_in, H, W), float16 / bfloat16 / float32 (float64 on CPU), NCHW or channels_last.
        weight: (C_out, C_in / groups, kh, kw); bias: (C_out,) conv bias or None.
        bn_weight, bn_bias: (C_out,) or None.  running_mean, running_var: (C_out,) (required in eval).
        eps, momentum: BN's.  stride, padding, dilation, groups: the conv's (padding also "same" / "valid").
        act: ``"none"``, ``"relu"``, ``"relu6"``, ``"silu"``, ``"gelu"`` (exact) or ``"hardswish"``.
        residual: None or (N, C_out, H_out, W_out), added after BN, before the activation.

    Returns:
        (N, C_out, H_out, W_out) in x's dtype and layout. Differentiable in every input tensor except the
        running statistics.
    """
    op = "conv_bn_act"
    _checks.tensor(op, "x", x, 4, shape_doc="(N, C_in, H, W)")
    _checks.flag(op, "training", training)
    if training:
        y = _conv_bias_act(op, x, weight, bias, stride, padding, dilation, groups, "none", None)
        return _bn_act(op, y, bn_weight, bn_bias, running_mean, running_var, eps, act, residual, True, momentum,
                       names=_BN_NAMES)
    _checks.tensor(op, "weight", weight, 4, shape_doc="(C_out, C_in / groups, kh, kw)")
    cout = weight.shape[0]
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is not None:
            channel_param(op, name, t, weight, cout)
    if running_mean is None or running_var is None:
        raise ValueError(f"fastops.{op}: running_mean and running_var are required when training=False")
    _checks.positive_finite(op, "eps", eps)
    if torch.is_autocast_enabled(x.device.type):
        weight = _checks.autocast_inputs(x.device.type, weight)[0]
    w, b = fold_bn(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
    return _conv_bias_act(op, x, w, b, stride, padding, dilation, groups, act, residual)


# Backends ---------------------------------------------------------------------------------------

def _triton_limit(x, weight, groups):
    from ..triton import conv_bias_act as _t

    return _t.limit_reason(x.dtype, x.shape[1], weight.shape[0], groups, weight.shape[2], weight.shape[3])


backends.register_kernel_backends(OP, limits={"triton": _triton_limit})


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _fake_forward(x, weight, bias, residual, stride, padding, dilation, groups, act):
    oh, ow = _checks.conv_output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding,
                                    dilation)
    return torch.empty((x.shape[0], weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def _fake_backward(grad_out, x, weight, bias, residual, out, stride, padding, dilation, groups, act):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    gb = x.new_empty((weight.shape[0],) if bias is not None else (0,), dtype=acc)
    gr = torch.empty_like(out, memory_format=memory_format_of(out)) if residual is not None else x.new_empty((0,))
    return (torch.empty_like(x, memory_format=memory_format_of(x)), torch.empty_like(weight,
            memory_format=torch.contiguous_format), gb, gr)


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups, act = inputs
    # The backward reads the output only for relu / relu6's mask (none: act' = 1; others recompute z). Not
    # saving it otherwise lets callers add to it in place, as timm's `x = bn3(conv3(x)); x += shortcut` does.
    ctx.save_for_backward(x, weight, bias, residual, output if act in ("relu", "relu6") else None)
    ctx.conf = (stride, padding, dilation, groups, act)


def _make_backward(backward_op):
    def backward(ctx, grad_out):
        x, weight, bias, residual, out = ctx.saved_tensors
        grad_out = grad_out.contiguous(memory_format=memory_format_of(x))
        # Without a saved output, grad_out (same shape and layout) stands in: its values are never read.
        gx, gw, gb, gr = backward_op(grad_out, x, weight, bias, residual, grad_out if out is None else out,
                                     *ctx.conf)
        need = ctx.needs_input_grad
        return (gx if need[0] else None, gw if need[1] else None, gb if bias is not None and need[2] else None,
                gr if residual is not None and need[3] else None, None, None, None, None, None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("conv_bias_act", "conv_bias_act_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import conv_bias_act as _triton_conv  # noqa: F401,E402  (defines the Triton custom ops)

    _register("conv_bias_act_triton", "conv_bias_act_backward_triton")
