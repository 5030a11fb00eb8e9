"""fastops.depthwise_conv2d: the public function, its backends, fake kernels and autograd."""
from typing import Optional, Union

import torch

from .. import _ext, backends
from .. import reference as _ref
from .._layout import memory_format_of
from . import _checks, _registration

OP = "depthwise_conv2d"
MAX_KERNEL = 31


def output_hw(h, w, kh, kw, stride, padding, dilation):
    return _checks.conv_output_hw(h, w, kh, kw, stride, padding, dilation)


def _padding4(padding, kh, kw, stride, dilation):
    return _checks.conv_padding(OP, padding, kh, kw, stride, dilation)


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding: Union[int, tuple, str] = 0,
    dilation=1,
) -> torch.Tensor:
    r"""Depthwise 2-D convolution: ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``.

    .. math::
        y[n, c, i, j] = b[c] + \sum_{p<k_h,\,q<k_w} w[c, 0, p, q]\,
                        x_{pad}[n, c,\; i s_h + p d_h,\; j s_w + q d_w]

    Args:
        x: (N, C, H, W), float16 / bfloat16 / float32 (float64 on CPU), NCHW or channels_last.
        weight: (C, 1, kh, kw), kh, kw <= 31, same dtype and device as ``x``.
        bias: (C,) or None.
        stride, dilation: int or (h, w), >= 1.
        padding: int, (h, w), ``"same"`` (stride 1; odd totals put the extra row/column at the end, as
            PyTorch does) or ``"valid"``.

    Returns:
        (N, C, H_out, W_out) in the layout of ``x`` (channels_last in, channels_last out; an input that
        is both contiguous and channels_last, i.e. C == 1 or H == W == 1, counts as NCHW), with
        ``H_out = (H + pad_top + pad_bottom - d_h (k_h - 1) - 1) // s_h + 1`` (likewise W_out).
        Accumulation is in fp32 (fp64 for float64). Differentiable in x, weight and bias.
    """
    _checks.tensor(OP, "x", x, 4, shape_doc="(N, C, H, W)")
    _checks.tensor(OP, "weight", weight, 4, shape_doc="(C, 1, kh, kw)")
    if bias is not None:
        _checks.tensor(OP, "bias", bias, 1, shape_doc="(C,)")
    x, weight, bias = _checks.autocast_inputs(x.device.type, x, weight, bias)
    C = x.shape[1]
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"fastops.{OP}: weight must have shape (C, 1, kh, kw) with C = {C} (x.shape[1]), "
                         f"got {tuple(weight.shape)}")
    # C = 0 runs on the cpu kernel but F.conv2d (the reference) refuses groups=0: refused on every backend.
    _checks.positive_dim(OP, "x", x, 1, "C")
    kh, kw = _checks.kernel_size(OP, "weight", weight, MAX_KERNEL)
    _checks.same_device_dtype(OP, "x", x, "weight", weight)
    if bias is not None:
        if bias.shape[0] != C:
            raise ValueError(f"fastops.{OP}: bias must have shape (C,) = ({C},), got {tuple(bias.shape)}")
        _checks.same_device_dtype(OP, "x", x, "bias", bias)
    stride = _checks.pair(OP, "stride", stride, 1, _checks.MAX_CONV_ARG)
    dilation = _checks.pair(OP, "dilation", dilation, 1, _checks.MAX_CONV_ARG)
    pad = _padding4(padding, kh, kw, stride, dilation)
    _checks.dilated_kernel_fits(OP, x, kh, kw, pad, dilation)
    stride, dilation = list(stride), list(dilation)
    backend = backends.choose(OP, x.device, x, weight, bias)
    if backend == "reference":
        return _ref.depthwise_conv2d(x, weight, bias, stride, pad, dilation)
    if backend == "triton":
        return _registration.call(torch.ops.fastops.depthwise_conv2d_triton, x, weight, bias, stride, pad, dilation)
    return _registration.call(torch.ops.fastops.depthwise_conv2d, x, weight, bias, stride, pad, dilation)


# Backends ---------------------------------------------------------------------------------------

backends.register_kernel_backends(OP)


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _fake_forward(x, weight, bias, stride, padding, dilation):
    oh, ow = output_hw(x.shape[2], x.shape[3], weight.shape[2], weight.shape[3], stride, padding, dilation)
    return torch.empty((x.shape[0], x.shape[1], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=memory_format_of(x))


def _fake_backward(grad_output, x, weight, stride, padding, dilation):
    return (torch.empty_like(x, memory_format=memory_format_of(x)), torch.empty_like(weight),
            weight.new_empty((weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(x, weight)
    ctx.conf = (stride, padding, dilation)
    ctx.has_bias = bias is not None


def _make_backward(backward_op):
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gi, gw, gb = backward_op(grad.contiguous(memory_format=memory_format_of(x)), x, weight, *ctx.conf)
        return (gi if ctx.needs_input_grad[0] else None, gw if ctx.needs_input_grad[1] else None,
                gb if ctx.has_bias and ctx.needs_input_grad[2] else None, None, None, None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("depthwise_conv2d", "depthwise_conv2d_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import depthwise_conv2d as _triton_dw  # noqa: F401,E402  (defines the Triton custom ops)

    _register("depthwise_conv2d_triton", "depthwise_conv2d_backward_triton")
