"""Squeeze-and-excitation in Triton: pooling, scale (+ residual + out_act) and backward kernels + launchers.

Passes over the (N, C, H, W) tensors, all Triton kernels:
  forward:  _se_pool_kernel (partial sums of x over HW splits), _se_scale_kernel (out = out_act(x*g + res));
  backward: _se_bwd_reduce_kernel (partial dg = sum_hw dy * x), _se_bwd_gx_kernel (gx = dy*g + dp/HW, gres = dy).
The per-sample MLP (N x C x R, forward and backward) runs as fp32 torch ops on the (N, C) pooled vectors in the
host launcher: it is a tiny matmul (<1% of the work) that Triton would gain nothing on.

Kernels address x-shaped tensors as base + n*sn + c*sc + p*sp (p = h*W + w), with (sn, sc, sp) the canonical
strides of the layout, so one kernel serves NCHW and channels_last; the launcher only picks the tile shape that
keeps the contiguous dimension along the wide axis. Offsets are int64, accumulation fp32.

Exposed as the opaque custom ops ``fastops::squeeze_excite_triton`` and ``fastops::squeeze_excite_backward_triton``
(fake kernels and autograd: fastops/ops/squeeze_excite.py).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._layout import is_channels_last, memory_format_of
from . import _common


@triton.jit
def _se_pool_kernel(
    x_ptr, part_ptr,
    C, HW, SPLITS, CHUNK,
    sn, sc, sp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (n * SPLITS + split, c-block): part[n, split, c] = sum of x over this split's pixels.
    pid = tl.program_id(0)
    n = (pid // SPLITS).to(tl.int64)
    split = pid % SPLITS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = x_ptr + n * sn + c.to(tl.int64)[None, :] * sc
    start = split * CHUNK
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, CHUNK, BLOCK_P):
        p = start + p0 + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        xv = tl.load(base + p.to(tl.int64)[:, None] * sp, mask=ok, other=0.0)
        acc += xv.to(tl.float32)
    tl.store(part_ptr + pid.to(tl.int64) * C + c, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _se_scale_kernel(
    x_ptr, g_ptr, res_ptr, out_ptr,
    C, HW,
    sn, sc, sp,
    HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # out = out_act(x * g[n, c] + res)
    pid = tl.program_id(0)
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (p < HW)[:, None] & c_ok[None, :]
    off = n * sn + c.to(tl.int64)[None, :] * sc + p.to(tl.int64)[:, None] * sp
    g = tl.load(g_ptr + n * C + c, mask=c_ok, other=0.0)
    y = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) * g[None, :]
    if HAS_RES:
        y += tl.load(res_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if OUT_RELU:
        y = tl.where(y < 0.0, 0.0, y)  # NaN stays NaN, as torch.relu
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _se_bwd_reduce_kernel(
    go_ptr, x_ptr, out_ptr, part_ptr,
    C, HW, SPLITS, CHUNK,
    sn, sc, sp,
    OUT_RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # part[n, split, c] = sum over this split's pixels of dy * x, dy = go * (out > 0 if OUT_RELU).
    pid = tl.program_id(0)
    n = (pid // SPLITS).to(tl.int64)
    split = pid % SPLITS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    cofs = n * sn + c.to(tl.int64)[None, :] * sc
    start = split * CHUNK
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, CHUNK, BLOCK_P):
        p = start + p0 + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        off = cofs + p.to(tl.int64)[:, None] * sp
        dy = tl.load(go_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if OUT_RELU:
            o = tl.load(out_ptr + off, mask=ok, other=0.0).to(tl.float32)
            dy = tl.where(o > 0.0, dy, 0.0)
        acc += dy * tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    tl.store(part_ptr + pid.to(tl.int64) * C + c, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _se_bwd_gx_kernel(
    go_ptr, out_ptr, g_ptr, dpc_ptr, gx_ptr, gres_ptr,
    C, HW,
    sn, sc, sp,
    HAS_RES: tl.constexpr, OUT_RELU: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # gx = dy * g[n, c] + dpc[n, c] (dpc = dp / HW, the pooling's share); gres = dy.
    pid = tl.program_id(0)
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (p < HW)[:, None] & c_ok[None, :]
    off = n * sn + c.to(tl.int64)[None, :] * sc + p.to(tl.int64)[:, None] * sp
    dy = tl.load(go_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if OUT_RELU:
        o = tl.load(out_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dy = tl.where(o > 0.0, dy, 0.0)
    g = tl.load(g_ptr + n * C + c, mask=c_ok, other=0.0)
    dpc = tl.load(dpc_ptr + n * C + c, mask=c_ok, other=0.0)
    gx = dy * g[None, :] + dpc[None, :]
    tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=ok)
    if HAS_RES:
        tl.store(gres_ptr + off, dy.to(gres_ptr.dtype.element_ty), mask=ok)


# Host side ---------------------------------------------------------------------------------------

def _tiles(channels_last: bool):
    """(BLOCK_P, BLOCK_C): channels along the wide axis for channels_last, pixels for NCHW."""
    return (16, 64) if channels_last else (64, 16)


def _geometry(x):
    """(channels_last, (sn, sc, sp)): canonical element strides of x's layout, p = h * W + w."""
    N, C, H, W = x.shape
    if is_channels_last(x):
        return True, (H * W * C, 1, C)
    return False, (C * H * W, H * W, 1)


def _hw_splits(N, cblocks, HW, block_p, on_gpu):
    """(splits, chunk) for the HW reductions: enough programs to fill a GPU, each split a whole number of
    BLOCK_P tiles; the interpreter runs programs one by one, so there 2 splits (still exercising the path)."""
    nblk = triton.cdiv(HW, block_p)
    want = max(1, triton.cdiv(1024, N * cblocks)) if on_gpu else 2
    splits = max(1, min(nblk, want))
    chunk = triton.cdiv(nblk, splits) * block_p
    return triton.cdiv(HW, chunk), chunk



def _launch_forward(x, w1, b1, w2, b2, residual, act, gate, out_act):
    N, C, H, W = x.shape
    HW = H * W
    cl, strides = _geometry(x)
    BP, BC = _tiles(cl)
    cblocks = triton.cdiv(C, BC)
    splits, chunk = _hw_splits(N, cblocks, HW, BP, x.is_cuda)
    part = torch.empty((N, splits, C), dtype=torch.float32, device=x.device)
    _se_pool_kernel[(N * splits, cblocks)](x, part, C, HW, splits, chunk, *strides, BLOCK_P=BP, BLOCK_C=BC)
    pooled = part.sum(1) / HW  # (N, C): the last, tiny reduction across splits
    # The MLP: (N, C) x (C, R) matmuls in fp32 torch ops (<1% of the work).
    h = _common.act(act, F.linear(pooled, _common.f32(w1), _common.f32(b1)))
    g = _common.gate(gate, F.linear(h, _common.f32(w2), _common.f32(b2))).contiguous()
    out = torch.empty_like(x, memory_format=memory_format_of(x))
    has_res = residual is not None
    res = residual.contiguous(memory_format=memory_format_of(x)) if has_res else x
    _se_scale_kernel[(N * triton.cdiv(HW, BP), cblocks)](
        x, g, res, out, C, HW, *strides,
        HAS_RES=has_res, OUT_RELU=out_act == "relu", BLOCK_P=BP, BLOCK_C=BC)
    return out, pooled


def _launch_backward(grad_out, x, out, pooled, w1, b1, w2, b2, has_residual, act, gate, out_act):
    N, C, H, W = x.shape
    HW = H * W
    fmt = memory_format_of(x)
    go = grad_out.contiguous(memory_format=fmt)
    out = out.contiguous(memory_format=fmt)
    cl, strides = _geometry(x)
    BP, BC = _tiles(cl)
    cblocks = triton.cdiv(C, BC)
    relu = out_act == "relu"
    splits, chunk = _hw_splits(N, cblocks, HW, BP, x.is_cuda)
    part = torch.empty((N, splits, C), dtype=torch.float32, device=x.device)
    _se_bwd_reduce_kernel[(N * splits, cblocks)](go, x, out, part, C, HW, splits, chunk, *strides,
                                                 OUT_RELU=relu, BLOCK_P=BP, BLOCK_C=BC)
    dg = part.sum(1)
    # MLP recompute + backward: fp32 torch ops on (N, C) / (N, R) tensors (<1% of the work).
    p = pooled.to(torch.float32)
    w1f, w2f = _common.f32(w1), _common.f32(w2)
    z1 = F.linear(p, w1f, _common.f32(b1))
    h = _common.act(act, z1)
    z2 = F.linear(h, w2f, _common.f32(b2))
    g = _common.gate(gate, z2)
    dz2 = dg * _common.gate_grad(gate, z2, g)
    gw2 = dz2.t() @ h
    gb2 = dz2.sum(0)
    dz1 = (dz2 @ w2f) * _common.act_grad(act, z1)
    gw1 = dz1.t() @ p
    gb1 = dz1.sum(0)
    dpc = ((dz1 @ w1f) / HW).contiguous()
    g = g.contiguous()
    gx = torch.empty_like(x, memory_format=fmt)
    gres = torch.empty_like(x, memory_format=fmt) if has_residual else x.new_empty((0,))
    _se_bwd_gx_kernel[(N * triton.cdiv(HW, BP), cblocks)](
        go, out, g, dpc, gx, gres if has_residual else gx, C, HW, *strides,
        HAS_RES=has_residual, OUT_RELU=relu, BLOCK_P=BP, BLOCK_C=BC)
    return (gx, gw1.to(w1.dtype), gb1.to(w1.dtype), gw2.to(w2.dtype), gb2.to(w2.dtype), gres)


@torch.library.custom_op("fastops::squeeze_excite_triton", mutates_args=())
def squeeze_excite_triton(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                          fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor],
                          residual: Optional[torch.Tensor], act: str, gate: str, out_act: str
                          ) -> Tuple[torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, residual, act, gate, out_act)


@torch.library.custom_op("fastops::squeeze_excite_backward_triton", mutates_args=())
def squeeze_excite_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, out: torch.Tensor,
                                   pooled: torch.Tensor, fc1_weight: torch.Tensor,
                                   fc1_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor,
                                   fc2_bias: Optional[torch.Tensor], has_residual: bool, act: str, gate: str,
                                   out_act: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                          torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_backward(grad_out, x, out, pooled, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                has_residual, act, gate, out_act)


# fp32 scratch buffers (everything else pointer-typed is in x's dtype)
_FP32_PTRS = {"part_ptr", "g_ptr", "dpc_ptr"}


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for every kernel variant the launchers can request, with element
    type `dtype` for the x-shaped tensors; tests compile each ahead of time for sm_80 / sm_90."""
    specs = []
    for cl in (False, True):
        bp, bc = _tiles(cl)
        tile = {"BLOCK_P": bp, "BLOCK_C": bc}
        specs.append((_se_pool_kernel, dict(tile)))
        for relu in (False, True):
            specs.append((_se_bwd_reduce_kernel, {"OUT_RELU": relu, **tile}))
            for has_res in (False, True):
                specs.append((_se_scale_kernel, {"HAS_RES": has_res, "OUT_RELU": relu, **tile}))
                specs.append((_se_bwd_gx_kernel, {"HAS_RES": has_res, "OUT_RELU": relu, **tile}))
    return _common.aot_signatures(specs, lambda name: "*fp32" if name in _FP32_PTRS else "*" + dtype)
