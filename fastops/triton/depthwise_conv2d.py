"""Depthwise conv2d in Triton: forward, grad-input and grad-weight/bias kernels + host launchers. The forward
kernel also carries conv_bias_act's epilogue (residual + activation, off for depthwise_conv2d itself).

Every kernel addresses tensors through their strides, so one kernel serves NCHW and channels_last; the
launcher only picks tile shapes that keep the contiguous dimension (pixels for NCHW, channels for
channels_last) along the vectorised axis. Offsets are computed in int64 (tensors may pass 2^31
elements); accumulation is fp32.

Exposed as the opaque custom ops ``fastops::depthwise_conv2d_triton`` and
``fastops::depthwise_conv2d_backward_triton`` (fake kernels and autograd: fastops/ops/depthwise_conv2d.py).
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl

from .._layout import is_channels_last, memory_format_of
from . import _common
from ._common import act_fwd


@triton.jit
def _dw_fwd_kernel(
    x_ptr, w_ptr, b_ptr, r_ptr, y_ptr,
    C, H, W, OH, OW, KH, KW,
    SH, SW, PT, PL, DH, DW,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Epilogue (conv_bias_act): + residual (r has y's strides), then activation ACT (_common.ACT_CODES).
    pid_np = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_pblocks = tl.cdiv(OH * OW, BLOCK_P)
    n = (pid_np // n_pblocks).to(tl.int64)
    p = (pid_np % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < OH * OW
    c_ok = c < C
    oh = p // OW
    ow = p % OW
    c64 = c.to(tl.int64)
    x_base = x_ptr + n * sxn + c64[None, :] * sxc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * SH - PT + kh * DH
        h_ok = p_ok & (ih >= 0) & (ih < H)
        for kw in range(KW):
            iw = ow * SW - PL + kw * DW
            ok = h_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + (ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None],
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + c64 * (KH * KW) + kh * KW + kw, mask=c_ok, other=0.0)
            acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y_off = n * syn + c64[None, :] * syc + (oh.to(tl.int64) * syh + ow.to(tl.int64) * syw)[:, None]
    y_ok = p_ok[:, None] & c_ok[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + y_off, mask=y_ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_off, act_fwd(acc, ACT).to(y_ptr.dtype.element_ty), mask=y_ok)


@triton.jit
def _dw_bwd_input_kernel(
    go_ptr, w_ptr, gi_ptr,
    C, H, W, OH, OW, KH, KW,
    SH, SW, PT, PL, DH, DW,
    sgn, sgc, sgh, sgw,
    sin, sic, sih, siw,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # grad_input[n, c, ih, iw] = sum over taps whose output position (oh, ow) lands on (ih, iw).
    pid_np = tl.program_id(0)
    pid_c = tl.program_id(1)
    n_pblocks = tl.cdiv(H * W, BLOCK_P)
    n = (pid_np // n_pblocks).to(tl.int64)
    p = (pid_np % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    p_ok = p < H * W
    c_ok = c < C
    ih = p // W
    iw = p % W
    c64 = c.to(tl.int64)
    go_base = go_ptr + n * sgn + c64[None, :] * sgc
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for kh in range(KH):
        t = ih + PT - kh * DH
        oh = t // SH
        h_ok = p_ok & (t >= 0) & (oh * SH == t) & (oh < OH)
        for kw in range(KW):
            u = iw + PL - kw * DW
            ow = u // SW
            ok = h_ok & (u >= 0) & (ow * SW == u) & (ow < OW)
            gv = tl.load(go_base + (oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[:, None],
                         mask=ok[:, None] & c_ok[None, :], other=0.0)
            wv = tl.load(w_ptr + c64 * (KH * KW) + kh * KW + kw, mask=c_ok, other=0.0)
            acc += gv.to(tl.float32) * wv.to(tl.float32)[None, :]
    gi_off = n * sin + c64[None, :] * sic + (ih.to(tl.int64) * sih + iw.to(tl.int64) * siw)[:, None]
    tl.store(gi_ptr + gi_off, acc.to(gi_ptr.dtype.element_ty), mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _dw_bwd_weight_kernel(
    go_ptr, x_ptr, part_ptr,
    M, C, H, W, OH, OW, KH, KW,
    SH, SW, PT, PL, DH, DW,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    CHUNK,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (tap, c-block, split): partial[split, tap, c] = sum over this split's output positions of
    # grad_out * x at that tap. tap == KH*KW is the bias: the plain sum of grad_out. M = N * OH * OW comes from
    # the host, as an int64 when it needs one (a product of int32 arguments here could wrap).
    tap = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    kh = tap // KW
    kw = tap % KW
    is_bias = tap == KH * KW
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    c64 = c.to(tl.int64)
    start = split.to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, CHUNK, BLOCK_P):
        m = start + m0 + tl.arange(0, BLOCK_P)
        m_ok = (m < M) & (m < start + CHUNK)
        n = m // (OH * OW)
        r = m % (OH * OW)
        oh = r // OW
        ow = r % OW
        gv = tl.load(go_ptr + (n * sgn + oh * sgh + ow * sgw)[:, None] + c64[None, :] * sgc,
                     mask=m_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        ih = oh * SH - PT + kh * DH
        iw = ow * SW - PL + kw * DW
        x_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (tap < KH * KW)
        xv = tl.load(x_ptr + (n * sxn + ih * sxh + iw * sxw)[:, None] + c64[None, :] * sxc,
                     mask=x_ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
        if is_bias:
            acc += gv
        else:
            acc += gv * xv
    total = tl.sum(acc, axis=0)
    n_taps = KH * KW + 1
    tl.store(part_ptr + (split.to(tl.int64) * n_taps + tap) * C + c64, total, mask=c_ok)


def _tiles(channels_last: bool, C: int):
    """(BLOCK_P, BLOCK_C): channels along the vector axis for channels_last, pixels for NCHW."""
    if channels_last:
        block_c = min(64, max(4, triton.next_power_of_2(C)))
        return max(16, 1024 // block_c // 4), block_c
    return 128, 4


def _launch_forward(x, weight, bias, stride, padding, dilation):
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    top, left, bottom, right = padding
    OH = (H + top + bottom - dilation[0] * (KH - 1) - 1) // stride[0] + 1
    OW = (W + left + right - dilation[1] * (KW - 1) - 1) // stride[1] + 1
    y = torch.empty((N, C, OH, OW), dtype=x.dtype, device=x.device, memory_format=memory_format_of(x))
    if y.numel() == 0:
        return y
    w = weight.contiguous()
    BP, BC = _tiles(is_channels_last(x), C)
    grid = (N * triton.cdiv(OH * OW, BP), triton.cdiv(C, BC))
    _dw_fwd_kernel[grid](
        x, w, bias if bias is not None else w, y, y,
        C, H, W, OH, OW, KH, KW,
        stride[0], stride[1], top, left, dilation[0], dilation[1],
        *x.stride(), *y.stride(),
        HAS_BIAS=bias is not None, HAS_RES=False, ACT=0, BLOCK_P=BP, BLOCK_C=BC,
    )
    return y


def _launch_backward(grad_output, x, weight, stride, padding, dilation):
    N, C, H, W = x.shape
    KH, KW = weight.shape[2], weight.shape[3]
    top, left = padding[0], padding[1]
    OH, OW = grad_output.shape[2], grad_output.shape[3]
    w = weight.contiguous()
    gi = torch.empty_like(x, memory_format=memory_format_of(x))
    cl = is_channels_last(x)
    BP, BC = _tiles(cl, C)
    geom = (stride[0], stride[1], top, left, dilation[0], dilation[1])
    if gi.numel():
        grid = (N * triton.cdiv(H * W, BP), triton.cdiv(C, BC))
        _dw_bwd_input_kernel[grid](grad_output, w, gi, C, H, W, OH, OW, KH, KW, *geom,
                                   *grad_output.stride(), *gi.stride(), BLOCK_P=BP, BLOCK_C=BC)
    M = N * OH * OW
    # Enough splits to fill a GPU, each a whole number of BP-blocks; the interpreter runs programs one
    # by one, so there a few splits (still exercising the split path) are much faster.
    splits = max(1, min(triton.cdiv(M, BP), 64 if x.is_cuda else 4))
    chunk = triton.cdiv(triton.cdiv(M, splits), BP) * BP
    splits = max(1, triton.cdiv(M, chunk))
    part = torch.empty((splits, KH * KW + 1, C), dtype=torch.float32, device=x.device)
    grid = (KH * KW + 1, triton.cdiv(C, BC), splits)
    _dw_bwd_weight_kernel[grid](grad_output, x, part, M, C, H, W, OH, OW, KH, KW, *geom,
                                *grad_output.stride(), *x.stride(), chunk, BLOCK_P=BP, BLOCK_C=BC)
    sums = part.sum(0)  # (KH*KW + 1, C): the last reduction across splits
    gw = sums[: KH * KW].t().reshape(C, 1, KH, KW).to(weight.dtype)
    gb = sums[KH * KW].to(weight.dtype)
    return gi, gw.contiguous(), gb


@torch.library.custom_op("fastops::depthwise_conv2d_triton", mutates_args=())
def depthwise_conv2d_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                            stride: List[int], padding: List[int], dilation: List[int]) -> torch.Tensor:
    with _common.device_guard(x):
        return _launch_forward(x, weight, bias, stride, padding, dilation)


@torch.library.custom_op("fastops::depthwise_conv2d_backward_triton", mutates_args=())
def depthwise_conv2d_backward_triton(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                     stride: List[int], padding: List[int], dilation: List[int]
                                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_backward(grad_output, x, weight, stride, padding, dilation)


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for every kernel variant the launchers can request, with pointer
    element type `dtype`; tests compile each ahead of time for sm_80 / sm_90."""
    specs = []
    for cl, C in ((False, 37), (True, 37), (True, 144)):
        bp, bc = _tiles(cl, C)
        for has_bias in (False, True):
            specs.append((_dw_fwd_kernel, {"HAS_BIAS": has_bias, "HAS_RES": False, "ACT": 0, "BLOCK_P": bp,
                                           "BLOCK_C": bc}))
        # conv_bias_act's depthwise epilogues (bias fp32 there; the element type only changes loads)
        act = {37: 4, 144: 1}[C] if cl else 3
        specs.append((_dw_fwd_kernel, {"HAS_BIAS": True, "HAS_RES": True, "ACT": act, "BLOCK_P": bp,
                                       "BLOCK_C": bc}))
        specs.append((_dw_bwd_input_kernel, {"BLOCK_P": bp, "BLOCK_C": bc}))
        specs.append((_dw_bwd_weight_kernel, {"BLOCK_P": bp, "BLOCK_C": bc}))
    return _common.aot_signatures(specs, lambda name: "*fp32" if name == "part_ptr" else "*" + dtype)
