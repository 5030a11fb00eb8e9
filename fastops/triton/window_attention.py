"""Swin (shifted-)window attention in Triton: forward and backward kernels + launchers.

One program per (batch * window, head) for both directions. The window's tokens are found by index arithmetic
on the padded, shifted grid (no materialised roll / pad / partition): token i of window (wy, wx) sits at padded
position (py, px) = (wy*wh + i // ww, wx*ww + i % ww); inside the map it is the real token at
((py + sh) % H, (px + sw) % W), beyond it a padding token whose q, k, v come from pad_qkv (zeros without it).

The program keeps the window's K and V head slices (BLOCK_N x BLOCK_D) on chip and walks its queries in blocks
of BLOCK_M rows, so the fp32 score tile stays BLOCK_M x BLOCK_N (a 12x12 window would otherwise need a
256 x 256 fp32 tile per program): scores = q k^T * scale + rel_pos_bias + shift mask (-100 across the region
ids of timm's SW-MSA mask, computed in the kernel), row softmax in fp32, o = p v, rows of real tokens stored at
their original positions, lse = natural-log log-sum-exp of each row (0 for padding rows).

Backward recomputes p from lse: dv = p^T do, dp = do v^T, ds = p (dp - D) with D = rowsum(do * o),
dq = scale ds k, dk = scale ds^T q. dq, dk, dv of real tokens are stored (each real token belongs to exactly
one window); dS is summed over batch and windows into a zeroed fp32 (heads, N, N) buffer and the padding
tokens' dk, dv into a zeroed fp32 (3C,) buffer, both with atomics.

Offsets into qkv / out / grads are int64. fp16 / bf16 operands go to tl.dot as they are (fp32 accumulation),
fp32 ones with the 3-pass tf32 split (see _dot_precision); under the interpreter every dot operand is cast to
fp32 first, since its low-precision dot is not reliable.

Exposed as the opaque custom ops ``fastops::window_attention_triton`` and
``fastops::window_attention_backward_triton`` (fake kernels and autograd: fastops/ops/window_attention.py).
"""
import os
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common

MAX_N = 256
MAX_HEAD_DIM = 128
# BLOCK_N * BLOCK_D bound per operand size: shared memory grows with this product, and the backward of 256
# keys x 64 dims in fp16 / bf16 needs ~160 KB on sm_80 (its limit is 163 KB). fp32 operands (split in three
# tf32 parts) need far more: 64 keys x 32 dims already take ~130 KB on sm_80 and ~180 KB on sm_90.
MAX_TILE = {torch.float16: 256 * 64, torch.bfloat16: 256 * 64, torch.float32: 64 * 32}


@triton.jit
def _wa_tokens(i, b, wy, wx, N, H, W, WH, WW, SH, SW, HP, WP):
    """For in-window token indices i: (real, flat token index in the (B, H, W) map, shift region id)."""
    ty = i // WW
    tx = i - ty * WW
    py = wy * WH + ty
    px = wx * WW + tx
    real = (i < N) & (py < H) & (px < W)
    # a modulo, not one subtraction: the shift may exceed a map smaller than the window
    oy = (py + SH) % H
    ox = (px + SW) % W
    tok = (b * H + oy.to(tl.int64)) * W + ox.to(tl.int64)
    # timm's regions per dimension: [0, P - win), [P - win, P - s), [P - s, P); a single region when s == 0
    rh = tl.where(py < HP - WH, 0, tl.where(py < HP - SH, 1, 2))
    rh = tl.where(SH > 0, rh, 0)
    rw = tl.where(px < WP - WW, 0, tl.where(px < WP - SW, 1, 2))
    rw = tl.where(SW > 0, rw, 0)
    return real, tok, rh * 3 + rw


@triton.jit
def _wa_scores(q, k, i, j, h, qrid, krid, N, scale, bias_ptr,
               HAS_BIAS: tl.constexpr, SHIFTED: tl.constexpr, DOT_PREC: tl.constexpr):
    """fp32 (BLOCK_M, BLOCK_N) scores; keys outside the window at -inf."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale
    col_ok = j < N
    if HAS_BIAS:
        boff = (h * N + i)[:, None] * N + j[None, :]
        s += tl.load(bias_ptr + boff, mask=(i < N)[:, None] & col_ok[None, :], other=0.0)
    if SHIFTED:
        s = tl.where(qrid[:, None] == krid[None, :], s, s - 100.0)
    return tl.where(col_ok[None, :], s, float("-inf"))


@triton.jit
def _wa_load_kv(qkv_ptr, pad_ptr, ktok, kreal, ch, d_ok, C,
                HAS_PAD: tl.constexpr, DOT_F32: tl.constexpr):
    C3 = 3 * C
    m = kreal[:, None] & d_ok[None, :]
    koff = ktok[:, None] * C3 + (C + ch)[None, :]
    k = tl.load(qkv_ptr + koff, mask=m, other=0.0)
    v = tl.load(qkv_ptr + koff + C, mask=m, other=0.0)
    if HAS_PAD:
        kp = tl.load(pad_ptr + C + ch, mask=d_ok, other=0.0).to(k.dtype)
        vp = tl.load(pad_ptr + 2 * C + ch, mask=d_ok, other=0.0).to(v.dtype)
        k = tl.where(kreal[:, None], k, kp[None, :])
        v = tl.where(kreal[:, None], v, vp[None, :])
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _wa_fwd_kernel(
    qkv_ptr, bias_ptr, pad_ptr, out_ptr, lse_ptr,
    H, W, C, NH, HD, N, WH, WW, SH, SW, HP, WP, NWW, NW, scale,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SHIFTED: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = (pid // NW).to(tl.int64)
    w = pid % NW
    wy = w // NWW
    wx = w - wy * NWW
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    ch = h * HD + d
    C3 = 3 * C
    j = tl.arange(0, BLOCK_N)
    kreal, ktok, krid = _wa_tokens(j, b, wy, wx, N, H, W, WH, WW, SH, SW, HP, WP)
    k, v = _wa_load_kv(qkv_ptr, pad_ptr, ktok, kreal, ch, d_ok, C, HAS_PAD, DOT_F32)
    lse_base = ((b * NW + w) * NH + h) * N
    for m0 in range(0, N, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        qreal, qtok, qrid = _wa_tokens(i, b, wy, wx, N, H, W, WH, WW, SH, SW, HP, WP)
        qm = qreal[:, None] & d_ok[None, :]
        # padding queries are cropped: their rows may hold anything finite, so q stays 0 there
        q = tl.load(qkv_ptr + qtok[:, None] * C3 + ch[None, :], mask=qm, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
        s = _wa_scores(q, k, i, j, h, qrid, krid, N, scale, bias_ptr, HAS_BIAS, SHIFTED, DOT_PREC)
        mx = tl.max(s, axis=1)
        p = tl.exp(s - mx[:, None])
        l = tl.sum(p, axis=1)
        o = tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC) / l[:, None]
        tl.store(out_ptr + qtok[:, None] * C + ch[None, :], o.to(out_ptr.dtype.element_ty), mask=qm)
        lse = tl.where(qreal, mx + tl.log(l), 0.0)
        tl.store(lse_ptr + lse_base + i, lse, mask=i < N)


@triton.jit
def _wa_bwd_kernel(
    go_ptr, qkv_ptr, out_ptr, lse_ptr, bias_ptr, pad_ptr, gqkv_ptr, gbias_ptr, gpad_ptr,
    H, W, C, NH, HD, N, WH, WW, SH, SW, HP, WP, NWW, NW, scale,
    HAS_BIAS: tl.constexpr, HAS_PAD: tl.constexpr, SHIFTED: tl.constexpr, BIAS_GRAD: tl.constexpr,
    PAD_GRAD: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = (pid // NW).to(tl.int64)
    w = pid % NW
    wy = w // NWW
    wx = w - wy * NWW
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    ch = h * HD + d
    C3 = 3 * C
    j = tl.arange(0, BLOCK_N)
    col_ok = j < N
    kreal, ktok, krid = _wa_tokens(j, b, wy, wx, N, H, W, WH, WW, SH, SW, HP, WP)
    k, v = _wa_load_kv(qkv_ptr, pad_ptr, ktok, kreal, ch, d_ok, C, HAS_PAD, DOT_F32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    lse_base = ((b * NW + w) * NH + h) * N
    for m0 in range(0, N, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        qreal, qtok, qrid = _wa_tokens(i, b, wy, wx, N, H, W, WH, WW, SH, SW, HP, WP)
        qm = qreal[:, None] & d_ok[None, :]
        q = tl.load(qkv_ptr + qtok[:, None] * C3 + ch[None, :], mask=qm, other=0.0)
        # padding queries were cropped: zero dO makes their dS rows vanish
        do = tl.load(go_ptr + qtok[:, None] * C + ch[None, :], mask=qm, other=0.0)
        o = tl.load(out_ptr + qtok[:, None] * C + ch[None, :], mask=qm, other=0.0)
        Di = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s = _wa_scores(q, k, i, j, h, qrid, krid, N, scale, bias_ptr, HAS_BIAS, SHIFTED, DOT_PREC)
        lse = tl.load(lse_ptr + lse_base + i, mask=i < N, other=0.0)
        # padding rows: lse is a placeholder, exp may overflow there; where() discards it without NaNs
        p = tl.where(qreal[:, None], tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - Di[:, None])
        dsc = ds.to(k.dtype)
        dq = tl.dot(dsc, k, input_precision=DOT_PREC) * scale
        tl.store(gqkv_ptr + qtok[:, None] * C3 + ch[None, :], dq.to(gqkv_ptr.dtype.element_ty), mask=qm)
        dk += tl.dot(tl.trans(dsc), q, input_precision=DOT_PREC)
        if BIAS_GRAD:
            boff = (h * N + i)[:, None] * N + j[None, :]
            tl.atomic_add(gbias_ptr + boff, ds, mask=(i < N)[:, None] & col_ok[None, :])
    dk = dk * scale
    km = kreal[:, None] & d_ok[None, :]
    koff = ktok[:, None] * C3 + (C + ch)[None, :]
    tl.store(gqkv_ptr + koff, dk.to(gqkv_ptr.dtype.element_ty), mask=km)
    tl.store(gqkv_ptr + koff + C, dv.to(gqkv_ptr.dtype.element_ty), mask=km)
    if PAD_GRAD:
        prow = col_ok & (kreal == 0)
        gk = tl.sum(tl.where(prow[:, None], dk, 0.0), axis=0)
        gv = tl.sum(tl.where(prow[:, None], dv, 0.0), axis=0)
        # most windows hold no padding token: skip their atomics
        any_pad = tl.max(prow.to(tl.int32), axis=0) > 0
        tl.atomic_add(gpad_ptr + C + ch, gk, mask=d_ok & any_pad)
        tl.atomic_add(gpad_ptr + 2 * C + ch, gv, mask=d_ok & any_pad)


# Host side ---------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _dot_precision(qkv) -> str:
    """tl.dot input precision: plain tf32 rounding of fp32 operands costs ~5e-4 relative error in out and
    grads, so fp32 inputs take the 3-pass tf32 split (still tensor cores, fp32-level error); fp16 / bf16
    operands ignore it; the interpreter computes exactly."""
    if _interpreting():
        return "ieee"
    return "tf32x3" if qkv.dtype == torch.float32 else "tf32"


def _blocks(n: int, hd: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D): tl.dot wants every dim >= 16; above 64 keys the queries go in blocks of
    32 rows so the fp32 score tile and the dk / dv accumulators fit the registers of 4 warps."""
    bn = max(16, triton.next_power_of_2(n))
    bd = max(16, triton.next_power_of_2(hd))
    return (bn if bn <= 64 else 32), bn, bd


def _fits(n: int, hd: int, dtype: torch.dtype) -> bool:
    _, bn, bd = _blocks(n, hd)
    return bn * bd <= MAX_TILE[dtype]


def limit_reason(dtype: torch.dtype, n: int, hd: int) -> Optional[str]:
    """Why these kernels cannot take windows of n tokens with head_dim hd in dtype, or None."""
    if n > MAX_N:
        return f"the triton backend takes windows of at most {MAX_N} tokens, got {n}"
    if hd > MAX_HEAD_DIM:
        return f"the triton backend takes head_dim <= {MAX_HEAD_DIM}, got {hd}"
    if dtype in MAX_TILE and not _fits(n, hd, dtype):
        return (f"the triton backend keeps a window's keys and values on chip, which does not fit shared memory "
                f"for {n} tokens x head_dim {hd} in {dtype}: next_power_of_2(N) * next_power_of_2(head_dim) must "
                f"be <= {MAX_TILE[dtype]} (float16 / bfloat16: up to 256 tokens x head_dim 64 or 128 x 128; "
                f"float32: up to 64 tokens x head_dim 32)")
    return None


class _Geometry:
    def __init__(self, op, qkv, num_heads, window_size, shift_size):
        if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4:
            raise ValueError(f"fastops.{op}: qkv must be a 4-D (B, H, W, 3C) tensor")
        if qkv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"fastops.{op}: the triton backend takes qkv in float16, bfloat16 or float32, "
                            f"got {qkv.dtype}")
        if not qkv.is_cuda and not _interpreting():
            raise RuntimeError(f"fastops.{op}: the triton backend needs CUDA tensors "
                               f"(or TRITON_INTERPRET=1 for CPU tensors), got qkv on {qkv.device}")
        if len(window_size) != 2 or len(shift_size) != 2:
            raise ValueError(f"fastops.{op}: window_size and shift_size must have 2 entries, "
                             f"got {list(window_size)} and {list(shift_size)}")
        B, H, W, C3 = qkv.shape
        wh, ww = int(window_size[0]), int(window_size[1])
        sh, sw = int(shift_size[0]), int(shift_size[1])
        if wh < 1 or ww < 1:
            raise ValueError(f"fastops.{op}: window_size must be >= 1, got {list(window_size)}")
        if not (0 <= sh < wh and 0 <= sw < ww):
            raise ValueError(f"fastops.{op}: shift_size must satisfy 0 <= shift < window_size, "
                             f"got {list(shift_size)} with window_size {list(window_size)}")
        if num_heads < 1 or C3 % (3 * num_heads) != 0:
            raise ValueError(f"fastops.{op}: qkv.shape[-1] = {C3} must be 3 * num_heads * head_dim "
                             f"with num_heads = {num_heads}")
        n = wh * ww
        C = C3 // 3
        hd = C // num_heads
        why = limit_reason(qkv.dtype, n, hd)
        if why is not None:
            raise ValueError(f"fastops.{op}: window_size {list(window_size)}, num_heads {num_heads}: {why}")
        hp, wp = -(-H // wh) * wh, -(-W // ww) * ww
        self.B, self.H, self.W, self.C, self.nh, self.hd = B, H, W, C, num_heads, hd
        self.wh, self.ww, self.sh, self.sw, self.n = wh, ww, sh, sw, n
        self.hp, self.wp, self.nww = hp, wp, wp // ww
        self.nw = (hp // wh) * self.nww
        self.shifted = sh > 0 or sw > 0

    def ints(self):
        return (self.H, self.W, self.C, self.nh, self.hd, self.n, self.wh, self.ww, self.sh, self.sw,
                self.hp, self.wp, self.nww, self.nw)


def _check_param(op, name, t, shape, qkv):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastops.{op}: {name} must have shape {shape}, got {got}")
    if t.dtype != torch.float32:
        raise TypeError(f"fastops.{op}: {name} must be float32 for the triton backend, got {t.dtype}")
    if t.device != qkv.device:
        raise ValueError(f"fastops.{op}: {name} is on {t.device} but qkv is on {qkv.device}")
    return t.contiguous()


def _check_like(op, name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastops.{op}: {name} must be a {dtype} tensor of shape {shape} on {device}, got {got}")
    return t.contiguous()


def _launch_forward(qkv, num_heads, window_size, shift_size, rel_pos_bias, scale, pad_qkv):
    op = "window_attention"
    g = _Geometry(op, qkv, num_heads, window_size, shift_size)
    bias = _check_param(op, "rel_pos_bias", rel_pos_bias, (g.nh, g.n, g.n), qkv)
    pad = _check_param(op, "pad_qkv", pad_qkv, (3 * g.C,), qkv)
    qkv = qkv.contiguous()
    out = torch.empty((g.B, g.H, g.W, g.C), dtype=qkv.dtype, device=qkv.device)
    lse = torch.empty((g.B, g.nw, g.nh, g.n), dtype=torch.float32, device=qkv.device)
    bm, bn, bd = _blocks(g.n, g.hd)
    _wa_fwd_kernel[(g.B * g.nw, g.nh)](
        qkv, lse if bias is None else bias, lse if pad is None else pad, out, lse, *g.ints(), float(scale),
        HAS_BIAS=bias is not None, HAS_PAD=pad is not None, SHIFTED=g.shifted, DOT_F32=_interpreting(),
        DOT_PREC=_dot_precision(qkv), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=4)
    return out, lse


def _launch_backward(grad_out, qkv, out, lse, num_heads, window_size, shift_size, rel_pos_bias, scale,
                     pad_qkv, bias_grad, pad_grad):
    op = "window_attention_backward"
    g = _Geometry(op, qkv, num_heads, window_size, shift_size)
    bias = _check_param(op, "rel_pos_bias", rel_pos_bias, (g.nh, g.n, g.n), qkv)
    pad = _check_param(op, "pad_qkv", pad_qkv, (3 * g.C,), qkv)
    qkv = qkv.contiguous()
    go = _check_like(op, "grad_out", grad_out, (g.B, g.H, g.W, g.C), qkv.dtype, qkv.device)
    out = _check_like(op, "out", out, (g.B, g.H, g.W, g.C), qkv.dtype, qkv.device)
    lse = _check_like(op, "lse", lse, (g.B, g.nw, g.nh, g.n), torch.float32, qkv.device)
    gqkv = torch.empty_like(qkv)
    f32 = dict(dtype=torch.float32, device=qkv.device)
    gbias = torch.zeros((g.nh, g.n, g.n), **f32) if bias_grad else torch.empty((0,), **f32)
    gpad = torch.zeros((3 * g.C,), **f32) if pad_grad else torch.empty((0,), **f32)
    bm, bn, bd = _blocks(g.n, g.hd)
    _wa_bwd_kernel[(g.B * g.nw, g.nh)](
        go, qkv, out, lse, lse if bias is None else bias, lse if pad is None else pad, gqkv,
        gbias if bias_grad else lse, gpad if pad_grad else lse, *g.ints(), float(scale),
        HAS_BIAS=bias is not None, HAS_PAD=pad is not None, SHIFTED=g.shifted, BIAS_GRAD=bool(bias_grad),
        PAD_GRAD=bool(pad_grad), DOT_F32=_interpreting(), DOT_PREC=_dot_precision(qkv),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=4)
    return gqkv, gbias, gpad


@torch.library.custom_op("fastops::window_attention_triton", mutates_args=())
def window_attention_triton(qkv: torch.Tensor, num_heads: int, window_size: List[int], shift_size: List[int],
                            rel_pos_bias: Optional[torch.Tensor], scale: float, pad_qkv: Optional[torch.Tensor]
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    with _common.device_guard(qkv):
        return _launch_forward(qkv, num_heads, window_size, shift_size, rel_pos_bias, scale, pad_qkv)


@torch.library.custom_op("fastops::window_attention_backward_triton", mutates_args=())
def window_attention_backward_triton(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                                     lse: torch.Tensor, num_heads: int, window_size: List[int],
                                     shift_size: List[int], rel_pos_bias: Optional[torch.Tensor], scale: float,
                                     pad_qkv: Optional[torch.Tensor], bias_grad: bool, pad_grad: bool
                                     ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(qkv):
        return _launch_backward(grad_out, qkv, out, lse, num_heads, window_size, shift_size, rel_pos_bias,
                                scale, pad_qkv, bias_grad, pad_grad)


# fp32 buffers (everything else pointer-typed is in qkv's dtype)
_FP32_PTRS = {"lse_ptr", "bias_ptr", "pad_ptr", "gbias_ptr", "gpad_ptr"}


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for the variants the launchers request on the Swin shapes (window 7 or
    8 -> 64 keys, window 12 -> 256; head_dim 32 or 64), with element type `dtype` for the qkv-shaped tensors;
    tests compile each ahead of time for sm_80 / sm_90."""
    def blocks(n, hd):
        bm, bn, bd = _blocks(n, hd)
        return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}

    # (window tokens, head_dim, shifted, has_pad, has_bias): SW-MSA / W-MSA of Swin-T/S/B (7x7; an 8x8 window
    # takes the same blocks), a padded map, head_dim 64, 12x12 windows, and attention without bias
    cases = [(49, 32, True, False, True), (49, 32, False, False, True), (49, 32, True, True, True),
             (49, 64, True, False, True), (144, 32, True, False, True), (49, 32, False, False, False)]
    specs = []
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    for n, hd, shifted, has_pad, has_bias in cases:  # forward / backward interleaved
        if not _fits(n, hd, tdtype):
            continue
        common = {"HAS_BIAS": has_bias, "HAS_PAD": has_pad, "SHIFTED": shifted, "DOT_F32": False,
                  "DOT_PREC": "tf32x3" if dtype == "fp32" else "tf32", **blocks(n, hd)}
        specs.append((_wa_fwd_kernel, dict(common)))
        specs.append((_wa_bwd_kernel, {**common, "BIAS_GRAD": has_bias, "PAD_GRAD": has_pad}))
    out = _common.aot_signatures(specs, lambda name: "*fp32" if name in _FP32_PTRS else "*" + dtype)
    for _, sig, _ in out:
        sig["scale"] = "fp32"
    return out
