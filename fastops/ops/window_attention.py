"""fastops.window_attention: the public function, its backends, fake kernels and autograd."""
import math
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _ext, backends
from .. import reference as _ref
from . import _checks, _registration

OP = "window_attention"

# The CUDA kernel streams keys and values through shared memory in tiles; a head's row lives in registers.
CUDA_MAX_TOKENS = 4096
CUDA_MAX_HEAD_DIM = 128

IntOrPair = Union[int, Sequence[int]]


def window_attention(
    qkv: torch.Tensor,
    num_heads: int,
    window_size: IntOrPair,
    shift_size: IntOrPair = 0,
    rel_pos_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    pad_qkv: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Swin (shifted-)window multi-head self-attention, fused: timm's ``SwinTransformerBlock._attn`` from
    the qkv projection to the input of ``proj``.

    The map is cyclically shifted by ``(-sh, -sw)``, zero-padded at the bottom/right to window multiples
    (a padding token's q, k, v are ``pad_qkv``) and cut into ``wh x ww`` windows of ``N = wh * ww`` tokens.
    In every window and head:

    .. math::
        S = \mathrm{scale}\, Q K^\top + B_{\mathrm{rel}} + M, \qquad O = \mathrm{softmax}_{\mathrm{row}}(S)\, V

    with ``M = -100`` between tokens of different shift regions (timm's SW-MSA mask; only when a shift is
    non-zero). Each output goes back to its token's original position; padding tokens' outputs are dropped.
    Roll, pad, window partition, the mask and their reverses are index arithmetic inside the kernels; no
    shifted, padded or windowed copy and no (nW, N, N) mask is materialised. Softmax and accumulation are fp32.

    Args:
        qkv: (B, H, W, 3C): the block's qkv ``Linear`` applied to the normalised, un-shifted, un-padded map;
            channels ``[q | k | v]``, each ``num_heads x head_dim`` (timm's order). float16 / bfloat16 /
            float32 (float64 on CPU).
        num_heads: heads; ``C`` must be a multiple of it.
        window_size: int or ``(wh, ww)``; may exceed the map (the map is then padded).
        shift_size: int or ``(sh, sw)`` with ``0 <= sh < wh``, ``0 <= sw < ww``; 0 is W-MSA.
        rel_pos_bias: None or ``(num_heads, N, N)`` added to the scaled scores (timm's
            ``relative_position_bias_table[relative_position_index]``, heads first). Differentiable.
        scale: default ``head_dim ** -0.5``.
        pad_qkv: None (zeros) or ``(3C,)``: the qkv of a zero padding token, i.e. the qkv ``Linear``'s bias.
            Differentiable (it receives the gradient of every padding token).

    Returns:
        (B, H, W, C) contiguous, qkv's dtype: each token's attention output, ready for ``proj``.
        Differentiable in ``qkv``, ``rel_pos_bias`` and ``pad_qkv``.
    """
    _checks.tensor(OP, "qkv", qkv, 4, shape_doc="(B, H, W, 3*C)")
    if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
        raise ValueError(f"fastops.{OP}: num_heads must be a positive int, got {num_heads!r}")
    ws = _checks.pair(OP, "window_size", window_size, 1)
    ss = _checks.pair(OP, "shift_size", shift_size, 0)
    if ss[0] >= ws[0] or ss[1] >= ws[1]:
        raise ValueError(f"fastops.{OP}: shift_size must be smaller than window_size in each dimension, "
                         f"got shift_size {ss} with window_size {ws}")
    B, H, W, C3 = qkv.shape
    if min(B, H, W) < 1:
        raise ValueError(f"fastops.{OP}: qkv must have B, H, W >= 1, got shape {tuple(qkv.shape)}")
    if C3 < 1 or C3 % (3 * num_heads) != 0:
        raise ValueError(f"fastops.{OP}: qkv's last dim must be 3 * C with C a multiple of num_heads={num_heads} "
                         f"and C >= 1, got {C3}")
    head_dim = C3 // (3 * num_heads)
    n = ws[0] * ws[1]
    if scale is None:
        scale = head_dim ** -0.5
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"fastops.{OP}: scale must be a finite float or None, got {scale!r}")
    (qkv,) = _checks.autocast_inputs(qkv.device.type, qkv)
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    if rel_pos_bias is not None:
        _checks.tensor(OP, "rel_pos_bias", rel_pos_bias, 3, shape_doc=f"(num_heads, N, N) = {(num_heads, n, n)}")
        if tuple(rel_pos_bias.shape) != (num_heads, n, n):
            raise ValueError(f"fastops.{OP}: rel_pos_bias must have shape (num_heads, N, N) = {(num_heads, n, n)} "
                             f"for window {ws}, got {tuple(rel_pos_bias.shape)}")
        _same_device(qkv, "rel_pos_bias", rel_pos_bias)
    if pad_qkv is not None:
        _checks.tensor(OP, "pad_qkv", pad_qkv, 1, shape_doc=f"(3*C,) = ({C3},)")
        if pad_qkv.shape[0] != C3:
            raise ValueError(f"fastops.{OP}: pad_qkv must have shape ({C3},) (qkv's last dim), "
                             f"got {tuple(pad_qkv.shape)}")
        _same_device(qkv, "pad_qkv", pad_qkv)
    backend = backends.choose(OP, qkv.device, qkv, head_dim, n)
    if backend == "reference":
        return _ref.window_attention(qkv, num_heads, ws, ss, rel_pos_bias, float(scale), pad_qkv)
    qkv = qkv.contiguous()
    bias = None if rel_pos_bias is None else rel_pos_bias.to(acc).contiguous()
    # A padding token's qkv is a Linear output, in qkv's dtype: round it there first, as the unfused path does.
    pad = None if pad_qkv is None else pad_qkv.to(qkv.dtype).to(acc).contiguous()
    fn = torch.ops.fastops.window_attention_triton if backend == "triton" else torch.ops.fastops.window_attention
    return _registration.call(fn, qkv, num_heads, list(ws), list(ss), bias, float(scale), pad)[0]


def _same_device(qkv, name, t):
    if t.device != qkv.device:
        raise ValueError(f"fastops.{OP}: {name} is on {t.device} but qkv is on {qkv.device}; "
                         f"expected both on one device")


def _cuda_limits(qkv, head_dim=1, n=1) -> Optional[str]:
    if n > CUDA_MAX_TOKENS:
        return f"window of {n} tokens; the CUDA kernels take at most {CUDA_MAX_TOKENS} (wh * ww)"
    if head_dim > CUDA_MAX_HEAD_DIM:
        return f"head_dim {head_dim}; the CUDA kernels take at most {CUDA_MAX_HEAD_DIM}"
    return None


def _triton_limits(qkv, head_dim=1, n=1) -> Optional[str]:
    from ..triton import window_attention as _tw

    return _tw.limit_reason(qkv.dtype, n, head_dim)


backends.register_kernel_backends(OP, limits={"cuda": _cuda_limits, "triton": _triton_limits})


# Fake kernels and autograd (shared by the C++ op and the Triton op) -----------------------------

def _num_windows(h, w, ws) -> int:
    return -(-h // ws[0]) * -(-w // ws[1])


def _fake_forward(qkv, num_heads, window_size, shift_size, rel_pos_bias, scale, pad_qkv):
    B, H, W, C3 = qkv.shape
    n = window_size[0] * window_size[1]
    acc = torch.float64 if qkv.dtype == torch.float64 else torch.float32
    return (qkv.new_empty((B, H, W, C3 // 3)),
            qkv.new_empty((B, _num_windows(H, W, window_size), num_heads, n), dtype=acc))


def _fake_backward(grad_out, qkv, out, lse, num_heads, window_size, shift_size, rel_pos_bias, scale, pad_qkv,
                   bias_grad, pad_grad):
    n = window_size[0] * window_size[1]
    gb = lse.new_empty((num_heads, n, n) if bias_grad else (0,))
    gp = lse.new_empty((qkv.shape[-1],) if pad_grad else (0,))
    return torch.empty_like(qkv), gb, gp


def _setup_context(ctx, inputs, output):
    qkv, num_heads, window_size, shift_size, rel_pos_bias, scale, pad_qkv = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse, rel_pos_bias, pad_qkv)
    ctx.conf = (num_heads, window_size, shift_size)
    ctx.scale = scale


def _make_backward(backward_op):
    def backward(ctx, grad_out, _grad_lse):
        qkv, out, lse, bias, pad = ctx.saved_tensors
        need = ctx.needs_input_grad
        bias_grad = bias is not None and need[4]
        pad_grad = pad is not None and need[6]
        gq, gb, gp = backward_op(grad_out.contiguous(), qkv, out, lse, *ctx.conf, bias, ctx.scale, pad,
                                 bias_grad, pad_grad)
        return (gq if need[0] else None, None, None, None, gb if bias_grad else None, None,
                gp if pad_grad else None)
    return backward


def _register(fwd_name, bwd_name):
    _registration.register(fwd_name, bwd_name, _fake_forward, _fake_backward, _make_backward, _setup_context)


if _ext.C_LOADED:
    _register("window_attention", "window_attention_backward")

from ..triton import TRITON_ERROR  # noqa: E402

if TRITON_ERROR is None:
    from ..triton import window_attention as _triton_wa  # noqa: F401,E402  (defines the Triton custom ops)

    _register("window_attention_triton", "window_attention_backward_triton")
