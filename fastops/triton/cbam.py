"""CBAM (channel + spatial attention) in Triton: forward and backward kernels + host launchers.

Passes over the (N, C, H, W) tensors, all Triton kernels:
  forward:  _cbam_pool_kernel      avg + max over HW in one pass (partial sums / maxima per HW split);
            _cbam_chanpool_kernel  mean_c and max_c of x1 = x * ca per pixel (x1 never written);
            _cbam_scale_kernel     BN + gate of the conv output per pixel, out = x * ca * sa.
  backward: _cbam_bwd_dsa_kernel   dsa = sum_c go * x1 and the s1 tie counts |T1| per pixel; then, on the
                                   pixel, v / vhat / sa / dv = dsa * gate'(v);
            _cbam_bwd_dx1_kernel   dca = sum_hw dx1 * x (partials per HW split) and the pmax tie counts |T2|;
            _cbam_bwd_gx_kernel    gx = dx1 * ca + dpavg / HW + dpmax * [x == pmax] / |T2|.
Small fp32 (N, H, W) map kernels: _cbam_conv_kernel (k x k conv of the 2-channel map), _cbam_bwd_ds_kernel
(BN backward + conv transpose, giving ds0 / C and ds1 / |T1|), _cbam_bwd_convw_kernel (conv weight grad,
partials per split).

Done with torch ops in the host launcher, on small fp32 tensors only: the per-sample MLP and its backward
(N x C x R matmuls, <1% of the work); the BN batch mean / biased variance of the (N, H, W) conv output and the
two BN-grad sums (single scalar reductions over a map C times smaller than x); the last tiny reduction across
HW splits of the per-split partials. Convs are never done with torch (cuDNN might use TF32).

x-shaped tensors are addressed as base + n*sn + c*sc + p*sp (p = h*W + w) with the canonical strides of the
layout, so one kernel serves NCHW and channels_last. Offsets are int64, accumulation fp32. x1 = float(x) * ca
is recomputed bit-identically wherever a tie test against the stored max needs it.

Exposed as the opaque custom ops ``fastops::cbam_triton`` and ``fastops::cbam_backward_triton`` (fake kernels
and autograd: fastops/ops/cbam.py).
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .._layout import is_channels_last, memory_format_of
from . import _common


@triton.jit
def _gate_fn(v, GATE: tl.constexpr):
    if GATE == 0:
        return 1.0 / (1.0 + tl.exp(-v))
    else:
        t = v + 3.0
        return tl.where(t < 0.0, 0.0, tl.where(t > 6.0, 6.0, t)) / 6.0  # NaN stays NaN, as F.relu6


@triton.jit
def _nanmax(a, b):
    # tl.maximum / tl.max skip NaN by default; torch.amax (the reference) returns NaN
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _gate_grad_fn(v, g, GATE: tl.constexpr):
    if GATE == 0:
        return g * (1.0 - g)
    else:
        return tl.where((v > -3.0) & (v < 3.0), 1.0 / 6.0, 0.0)


# Forward ------------------------------------------------------------------------------------------

@triton.jit
def _cbam_pool_kernel(
    x_ptr, psum_ptr, pmax_ptr,
    C, HW, SPLITS, CHUNK,
    sn, sc, sp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Program (n * SPLITS + split, c-block): psum / pmax[n, split, c] = sum / max of x over the split's pixels.
    pid = tl.program_id(0)
    n = (pid // SPLITS).to(tl.int64)
    split = pid % SPLITS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    base = x_ptr + n * sn + c.to(tl.int64)[None, :] * sc
    start = split * CHUNK
    acc_s = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc_m = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for p0 in range(0, CHUNK, BLOCK_P):
        p = start + p0 + tl.arange(0, BLOCK_P)
        ok = (p < HW)[:, None] & c_ok[None, :]
        xv = tl.load(base + p.to(tl.int64)[:, None] * sp, mask=ok, other=0.0).to(tl.float32)
        acc_s += xv
        acc_m = _nanmax(acc_m, tl.where(ok, xv, float("-inf")))
    o = pid.to(tl.int64) * C + c
    tl.store(psum_ptr + o, tl.sum(acc_s, axis=0), mask=c_ok)
    tl.store(pmax_ptr + o, tl.reduce(acc_m, 0, _nanmax), mask=c_ok)


@triton.jit
def _cbam_chanpool_kernel(
    x_ptr, ca_ptr, s_ptr,
    C, HW,
    sn, sc, sp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # s[n, 0, p] = mean_c x[n, c, p] * ca[n, c];  s[n, 1, p] = max_c of the same fp32 products.
    pid = tl.program_id(0)
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    pofs = n * sn + p.to(tl.int64)[:, None] * sp
    acc_s = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    acc_m = tl.full((BLOCK_P, BLOCK_C), float("-inf"), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = p_ok[:, None] & c_ok[None, :]
        ca = tl.load(ca_ptr + n * C + c, mask=c_ok, other=0.0)
        xv = tl.load(x_ptr + pofs + c.to(tl.int64)[None, :] * sc, mask=ok, other=0.0).to(tl.float32)
        x1 = xv * ca[None, :]
        acc_s += x1
        acc_m = _nanmax(acc_m, tl.where(ok, x1, float("-inf")))
    s_off = n * 2 * HW + p
    tl.store(s_ptr + s_off, tl.sum(acc_s, axis=1) / C, mask=p_ok)
    tl.store(s_ptr + s_off + HW, tl.reduce(acc_m, 1, _nanmax), mask=p_ok)


@triton.jit
def _cbam_conv_kernel(
    s_ptr, w_ptr, u_ptr,
    H, W, K,
    BLOCK_S: tl.constexpr,
):
    # u[n, h, w] = sum_{j, a, b} w[j, a, b] * s[n, j, h + a - K//2, w + b - K//2]  (zero padding), fp32 maps.
    pid = tl.program_id(0)
    HW = H * W
    n_pblocks = tl.cdiv(HW, BLOCK_S)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    p_ok = p < HW
    h = p // W
    w = p % W
    R = K // 2
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for j in range(2):
        base = s_ptr + (n * 2 + j) * HW
        for a in range(K):
            ih = h + a - R
            h_ok = p_ok & (ih >= 0) & (ih < H)
            for b in range(K):
                iw = w + b - R
                ok = h_ok & (iw >= 0) & (iw < W)
                sv = tl.load(base + ih * W + iw, mask=ok, other=0.0)
                acc += sv * tl.load(w_ptr + (j * K + a) * K + b)
    tl.store(u_ptr + n * HW + p, acc, mask=p_ok)


@triton.jit
def _cbam_scale_kernel(
    x_ptr, ca_ptr, u_ptr, bnp_ptr, out_ptr,
    C, HW,
    sn, sc, sp,
    GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # sa = gate((u - mean) * rstd * bn_w + bn_b) per pixel (bnp = [mean, rstd, bn_w, bn_b]); out = x * ca * sa.
    pid = tl.program_id(0)
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    mean = tl.load(bnp_ptr)
    rstd = tl.load(bnp_ptr + 1)
    bw = tl.load(bnp_ptr + 2)
    bb = tl.load(bnp_ptr + 3)
    u = tl.load(u_ptr + n * HW + p, mask=p_ok, other=0.0)
    sa = _gate_fn((u - mean) * rstd * bw + bb, GATE)
    ca = tl.load(ca_ptr + n * C + c, mask=c_ok, other=0.0)
    off = n * sn + c.to(tl.int64)[None, :] * sc + p.to(tl.int64)[:, None] * sp
    x1 = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) * ca[None, :]
    tl.store(out_ptr + off, (x1 * sa[:, None]).to(out_ptr.dtype.element_ty), mask=ok)


# Backward -----------------------------------------------------------------------------------------

@triton.jit
def _cbam_bwd_dsa_kernel(
    go_ptr, x_ptr, ca_ptr, s_ptr, u_ptr, bnp_ptr,
    dv_ptr, vhat_ptr, sa_ptr, cnt_ptr,
    C, HW,
    sn, sc, sp,
    GATE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # Per pixel: dsa = sum_c go * x1, |T1| = #{c : x1 == s1}; then vhat, sa = gate(v), dv = dsa * gate'(v).
    pid = tl.program_id(0)
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    pofs = n * sn + p.to(tl.int64)[:, None] * sp
    m_off = n * HW + p
    s1 = tl.load(s_ptr + n * 2 * HW + HW + p, mask=p_ok, other=0.0)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < C
        ok = p_ok[:, None] & c_ok[None, :]
        ca = tl.load(ca_ptr + n * C + c, mask=c_ok, other=0.0)
        off = pofs + c.to(tl.int64)[None, :] * sc
        x1 = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32) * ca[None, :]
        acc += tl.load(go_ptr + off, mask=ok, other=0.0).to(tl.float32) * x1
        cnt += tl.where(ok & (x1 == s1[:, None]), 1.0, 0.0)
    dsa = tl.sum(acc, axis=1)
    mean = tl.load(bnp_ptr)
    rstd = tl.load(bnp_ptr + 1)
    bw = tl.load(bnp_ptr + 2)
    bb = tl.load(bnp_ptr + 3)
    u = tl.load(u_ptr + m_off, mask=p_ok, other=0.0)
    vhat = (u - mean) * rstd
    v = vhat * bw + bb
    sa = _gate_fn(v, GATE)
    tl.store(dv_ptr + m_off, dsa * _gate_grad_fn(v, sa, GATE), mask=p_ok)
    tl.store(vhat_ptr + m_off, vhat, mask=p_ok)
    tl.store(sa_ptr + m_off, sa, mask=p_ok)
    tl.store(cnt_ptr + m_off, tl.sum(cnt, axis=1), mask=p_ok)


@triton.jit
def _cbam_bwd_ds_kernel(
    dv_ptr, vhat_ptr, dup_ptr, w_ptr, cnt_ptr, a_ptr,
    C, H, W, K,
    BLOCK_S: tl.constexpr,
):
    # du = coef * (dv - m1 - vhat * m2)  (dup = [coef, m1, m2]; m1 = m2 = 0 in eval), then the conv transpose
    # dS[n, j, h, w] = sum_{a, b} w[j, a, b] * du[n, h - a + K//2, w - b + K//2].
    # Stores a[n, 0] = dS0 / C (the channel mean's share) and a[n, 1] = dS1 / |T1| (each tied max's share).
    pid = tl.program_id(0)
    HW = H * W
    n_pblocks = tl.cdiv(HW, BLOCK_S)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    p_ok = p < HW
    h = p // W
    w = p % W
    R = K // 2
    coef = tl.load(dup_ptr)
    m1 = tl.load(dup_ptr + 1)
    m2 = tl.load(dup_ptr + 2)
    base = n * HW
    acc0 = tl.zeros((BLOCK_S,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for a in range(K):
        ih = h - a + R
        h_ok = p_ok & (ih >= 0) & (ih < H)
        for b in range(K):
            iw = w - b + R
            ok = h_ok & (iw >= 0) & (iw < W)
            q = base + ih * W + iw
            dvv = tl.load(dv_ptr + q, mask=ok, other=0.0)
            vh = tl.load(vhat_ptr + q, mask=ok, other=0.0)
            du = tl.where(ok, coef * (dvv - m1 - vh * m2), 0.0)
            acc0 += du * tl.load(w_ptr + a * K + b)
            acc1 += du * tl.load(w_ptr + K * K + a * K + b)
    cnt = tl.load(cnt_ptr + base + p, mask=p_ok, other=1.0)
    tl.store(a_ptr + n * 2 * HW + p, acc0 / C, mask=p_ok)
    tl.store(a_ptr + n * 2 * HW + HW + p, acc1 / cnt, mask=p_ok)


@triton.jit
def _cbam_bwd_convw_kernel(
    dv_ptr, vhat_ptr, dup_ptr, s_ptr, part_ptr,
    M, H, W, K, CHUNK,
    BLOCK_S: tl.constexpr,
):
    # Program (tap, split): part[split, tap] = sum over the split's (n, h, w) of du * s[n, j, h+a-K//2, w+b-K//2],
    # tap = (j * K + a) * K + b. M = N * H * W from the host (an int64 when it needs one).
    tap = tl.program_id(0)
    split = tl.program_id(1)
    KK = K * K
    j = tap // KK
    a = (tap // K) % K
    b = tap % K
    R = K // 2
    HW = H * W
    coef = tl.load(dup_ptr)
    m1 = tl.load(dup_ptr + 1)
    m2 = tl.load(dup_ptr + 2)
    start = split.to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK_S,), dtype=tl.float32)
    for m0 in range(0, CHUNK, BLOCK_S):
        m = start + m0 + tl.arange(0, BLOCK_S)
        m_ok = m < M
        n = m // HW
        r = m % HW
        h = r // W
        w = r % W
        dvv = tl.load(dv_ptr + m, mask=m_ok, other=0.0)
        vh = tl.load(vhat_ptr + m, mask=m_ok, other=0.0)
        du = coef * (dvv - m1 - vh * m2)
        ih = h + a - R
        iw = w + b - R
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        sv = tl.load(s_ptr + (n * 2 + j) * HW + ih * W + iw, mask=ok, other=0.0)
        acc += tl.where(ok, du * sv, 0.0)
    tl.store(part_ptr + split * (2 * KK) + tap, tl.sum(acc, axis=0))


@triton.jit
def _cbam_bwd_dx1_kernel(
    go_ptr, x_ptr, ca_ptr, pooled_ptr, s_ptr, sa_ptr, a_ptr, dca_ptr, cnt2_ptr,
    C, HW, SPLITS, CHUNK,
    sn, sc, sp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # dx1 = go * sa + dS0 / C + [x1 == s1] * dS1 / |T1|;  per (n, split, c): dca = sum dx1 * x and
    # |T2| = #{p : x == pmax}.
    pid = tl.program_id(0)
    n = (pid // SPLITS).to(tl.int64)
    split = pid % SPLITS
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ca = tl.load(ca_ptr + n * C + c, mask=c_ok, other=0.0)
    pmax = tl.load(pooled_ptr + n * 2 * C + C + c, mask=c_ok, other=0.0)
    cofs = n * sn + c.to(tl.int64)[None, :] * sc
    start = split * CHUNK
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    cnt = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, CHUNK, BLOCK_P):
        p = start + p0 + tl.arange(0, BLOCK_P)
        p_ok = p < HW
        ok = p_ok[:, None] & c_ok[None, :]
        off = cofs + p.to(tl.int64)[:, None] * sp
        mp = n * HW + p
        sa = tl.load(sa_ptr + mp, mask=p_ok, other=0.0)
        a0 = tl.load(a_ptr + n * 2 * HW + p, mask=p_ok, other=0.0)
        a1 = tl.load(a_ptr + n * 2 * HW + HW + p, mask=p_ok, other=0.0)
        s1 = tl.load(s_ptr + n * 2 * HW + HW + p, mask=p_ok, other=0.0)
        xv = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
        go = tl.load(go_ptr + off, mask=ok, other=0.0).to(tl.float32)
        x1 = xv * ca[None, :]
        dx1 = go * sa[:, None] + a0[:, None] + tl.where(x1 == s1[:, None], a1[:, None], 0.0)
        acc += tl.where(ok, dx1 * xv, 0.0)
        cnt += tl.where(ok & (xv == pmax[None, :]), 1.0, 0.0)
    o = pid.to(tl.int64) * C + c
    tl.store(dca_ptr + o, tl.sum(acc, axis=0), mask=c_ok)
    tl.store(cnt2_ptr + o, tl.sum(cnt, axis=0), mask=c_ok)


@triton.jit
def _cbam_bwd_gx_kernel(
    go_ptr, x_ptr, ca_ptr, pooled_ptr, cavg_ptr, cmax_ptr, s_ptr, sa_ptr, a_ptr, gx_ptr,
    C, HW,
    sn, sc, sp,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # gx = dx1 * ca + cavg[n, c] + [x == pmax] * cmax[n, c]   (cavg = dpavg / HW, cmax = dpmax / |T2|)
    pid = tl.program_id(0)
    n_pblocks = tl.cdiv(HW, BLOCK_P)
    n = (pid // n_pblocks).to(tl.int64)
    p = (pid % n_pblocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = p < HW
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = p_ok[:, None] & c_ok[None, :]
    nc = n * C + c
    ca = tl.load(ca_ptr + nc, mask=c_ok, other=0.0)
    pmax = tl.load(pooled_ptr + n * 2 * C + C + c, mask=c_ok, other=0.0)
    cavg = tl.load(cavg_ptr + nc, mask=c_ok, other=0.0)
    cmax = tl.load(cmax_ptr + nc, mask=c_ok, other=0.0)
    mp = n * HW + p
    sa = tl.load(sa_ptr + mp, mask=p_ok, other=0.0)
    a0 = tl.load(a_ptr + n * 2 * HW + p, mask=p_ok, other=0.0)
    a1 = tl.load(a_ptr + n * 2 * HW + HW + p, mask=p_ok, other=0.0)
    s1 = tl.load(s_ptr + n * 2 * HW + HW + p, mask=p_ok, other=0.0)
    off = n * sn + c.to(tl.int64)[None, :] * sc + p.to(tl.int64)[:, None] * sp
    xv = tl.load(x_ptr + off, mask=ok, other=0.0).to(tl.float32)
    go = tl.load(go_ptr + off, mask=ok, other=0.0).to(tl.float32)
    x1 = xv * ca[None, :]
    dx1 = go * sa[:, None] + a0[:, None] + tl.where(x1 == s1[:, None], a1[:, None], 0.0)
    gx = dx1 * ca[None, :] + cavg[None, :] + tl.where(xv == pmax[None, :], cmax[None, :], 0.0)
    tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=ok)


# Host side ---------------------------------------------------------------------------------------

BLOCK_S = 128  # pixels per program of the small fp32 map kernels
_GATE_ID = {"sigmoid": 0, "hard_sigmoid": 1}


def _tiles(channels_last: bool):
    """(BLOCK_P, BLOCK_C): channels along the wide axis for channels_last, pixels for NCHW."""
    return (16, 64) if channels_last else (64, 16)


def _geometry(x):
    """(channels_last, (sn, sc, sp)): canonical element strides of x's layout, p = h * W + w."""
    N, C, H, W = x.shape
    if is_channels_last(x):
        return True, (H * W * C, 1, C)
    return False, (C * H * W, H * W, 1)


def _splits(nblk, programs, on_gpu):
    """How many splits of a reduction over `nblk` tiles when `programs` programs run besides: enough to fill
    a GPU; the interpreter runs programs one by one, so there 2 (still exercising the split path)."""
    want = max(1, triton.cdiv(1024, programs)) if on_gpu else 2
    return max(1, min(nblk, want))


def _hw_splits(N, cblocks, HW, block_p, on_gpu):
    nblk = triton.cdiv(HW, block_p)
    chunk = triton.cdiv(nblk, _splits(nblk, N * cblocks, on_gpu)) * block_p
    return triton.cdiv(HW, chunk), chunk



def _channel_attn(pooled, w1, b1, w2, b2, act, gate):
    """The shared MLP on both pooled vectors: fp32 torch ops on (N, C) tensors (<1% of the work)."""
    w1f, b1f, w2f, b2f = _common.f32(w1), _common.f32(b1), _common.f32(w2), _common.f32(b2)
    pavg, pmax = pooled[:, 0], pooled[:, 1]
    z1a, z1m = F.linear(pavg, w1f, b1f), F.linear(pmax, w1f, b1f)
    ha, hm = _common.act(act, z1a), _common.act(act, z1m)
    zsum = F.linear(ha, w2f, b2f) + F.linear(hm, w2f, b2f)
    return _common.gate(gate, zsum), (pavg, pmax, z1a, z1m, ha, hm, zsum)


def _conv(spatial, cw, N, H, W, K):
    u = torch.empty((N, H, W), dtype=torch.float32, device=spatial.device)
    _cbam_conv_kernel[(N * triton.cdiv(H * W, BLOCK_S),)](spatial, cw, u, H, W, K, BLOCK_S=BLOCK_S)
    return u


def _launch_forward(x, w1, b1, w2, b2, conv_w, bn_w, bn_b, bn_mean, bn_var, eps, training, act, gate):
    N, C, H, W = x.shape
    HW = H * W
    K = conv_w.shape[-1]
    cl, strides = _geometry(x)
    BP, BC = _tiles(cl)
    cblocks = triton.cdiv(C, BC)
    dev = x.device
    splits, chunk = _hw_splits(N, cblocks, HW, BP, x.is_cuda)
    psum = torch.empty((N, splits, C), dtype=torch.float32, device=dev)
    pmax = torch.empty((N, splits, C), dtype=torch.float32, device=dev)
    _cbam_pool_kernel[(N * splits, cblocks)](x, psum, pmax, C, HW, splits, chunk, *strides, BLOCK_P=BP, BLOCK_C=BC)
    # last, tiny reduction across the HW splits
    pooled = torch.stack([psum.sum(1) / HW, pmax.amax(1)], 1).contiguous()  # (N, 2, C)
    ca = _channel_attn(pooled, w1, b1, w2, b2, act, gate)[0].contiguous()
    spatial = torch.empty((N, 2, H, W), dtype=torch.float32, device=dev)
    pblocks = triton.cdiv(HW, BP)
    _cbam_chanpool_kernel[(N * pblocks,)](x, ca, spatial, C, HW, *strides, BLOCK_P=BP, BLOCK_C=BC)
    cw = conv_w.to(torch.float32).contiguous()
    u = _conv(spatial, cw, N, H, W, K)
    if training:
        # BN batch statistics: two scalar reductions over the (N, H, W) fp32 conv output (C times smaller than x).
        stats = torch.stack([u.mean(), u.var(unbiased=False)])
    else:
        stats = torch.cat([bn_mean.reshape(1), bn_var.reshape(1)]).to(torch.float32)
    bnp = torch.stack([stats[0], torch.rsqrt(stats[1] + eps), bn_w.reshape(()).to(torch.float32),
                       bn_b.reshape(()).to(torch.float32)])
    out = torch.empty_like(x, memory_format=memory_format_of(x))
    _cbam_scale_kernel[(N * pblocks, cblocks)](x, ca, u, bnp, out, C, HW, *strides,
                                               GATE=_GATE_ID[gate], BLOCK_P=BP, BLOCK_C=BC)
    return out, pooled, spatial, stats


def _launch_backward(grad_out, x, pooled, spatial, stats, w1, b1, w2, b2, conv_w, bn_w, bn_b, eps, training,
                     act, gate):
    N, C, H, W = x.shape
    HW = H * W
    M = N * HW
    K = conv_w.shape[-1]
    dev = x.device
    f32 = dict(dtype=torch.float32, device=dev)
    fmt = memory_format_of(x)
    go = grad_out.contiguous(memory_format=fmt)
    pooled = pooled.to(torch.float32).contiguous()
    spatial = spatial.to(torch.float32).contiguous()
    stats = stats.to(torch.float32)
    cl, strides = _geometry(x)
    BP, BC = _tiles(cl)
    cblocks = triton.cdiv(C, BC)
    pblocks = triton.cdiv(HW, BP)
    gate_id = _GATE_ID[gate]

    ca, saved = _channel_attn(pooled, w1, b1, w2, b2, act, gate)
    ca = ca.contiguous()
    cw = conv_w.to(torch.float32).contiguous()
    u = _conv(spatial, cw, N, H, W, K)
    rstd = torch.rsqrt(stats[1] + eps)
    bw = bn_w.reshape(()).to(torch.float32)
    bnp = torch.stack([stats[0], rstd, bw, bn_b.reshape(()).to(torch.float32)])

    dv = torch.empty((N, H, W), **f32)
    vhat = torch.empty((N, H, W), **f32)
    sa = torch.empty((N, H, W), **f32)
    cnt1 = torch.empty((N, H, W), **f32)
    _cbam_bwd_dsa_kernel[(N * pblocks,)](go, x, ca, spatial, u, bnp, dv, vhat, sa, cnt1, C, HW, *strides,
                                         GATE=gate_id, BLOCK_P=BP, BLOCK_C=BC)
    # BN grads: two scalar reductions over the (N, H, W) fp32 map (C times smaller than x).
    gbn_b = dv.sum()
    gbn_w = (dv * vhat).sum()
    zero = torch.zeros((), **f32)
    dup = torch.stack([rstd * bw, gbn_b / M if training else zero, gbn_w / M if training else zero])

    a = torch.empty((N, 2, H, W), **f32)
    _cbam_bwd_ds_kernel[(N * triton.cdiv(HW, BLOCK_S),)](dv, vhat, dup, cw, cnt1, a, C, H, W, K, BLOCK_S=BLOCK_S)
    wsplits = _splits(triton.cdiv(M, BLOCK_S), 2 * K * K, x.is_cuda)
    wchunk = triton.cdiv(triton.cdiv(M, BLOCK_S), wsplits) * BLOCK_S
    wsplits = triton.cdiv(M, wchunk)
    wpart = torch.empty((wsplits, 2 * K * K), **f32)
    _cbam_bwd_convw_kernel[(2 * K * K, wsplits)](dv, vhat, dup, spatial, wpart, M, H, W, K, wchunk,
                                                 BLOCK_S=BLOCK_S)
    gcw = wpart.sum(0).reshape(conv_w.shape)

    splits, chunk = _hw_splits(N, cblocks, HW, BP, x.is_cuda)
    dca_p = torch.empty((N, splits, C), **f32)
    cnt2_p = torch.empty((N, splits, C), **f32)
    _cbam_bwd_dx1_kernel[(N * splits, cblocks)](go, x, ca, pooled, spatial, sa, a, dca_p, cnt2_p,
                                                C, HW, splits, chunk, *strides, BLOCK_P=BP, BLOCK_C=BC)
    dca = dca_p.sum(1)
    cnt2 = cnt2_p.sum(1).clamp_min(1.0)

    # MLP backward (both branches share the weights): fp32 torch ops on (N, C) tensors (<1% of the work).
    pavg, pmax, z1a, z1m, ha, hm, zsum = saved
    w1f, w2f = _common.f32(w1), _common.f32(w2)
    dz = dca * _common.gate_grad(gate, zsum, ca)
    gw2 = dz.t() @ (ha + hm)
    gb2 = 2.0 * dz.sum(0)
    dh = dz @ w2f
    dz1a = dh * _common.act_grad(act, z1a)
    dz1m = dh * _common.act_grad(act, z1m)
    gw1 = dz1a.t() @ pavg + dz1m.t() @ pmax
    gb1 = (dz1a + dz1m).sum(0)
    cavg = ((dz1a @ w1f) / HW).contiguous()
    cmax = ((dz1m @ w1f) / cnt2).contiguous()

    gx = torch.empty_like(x, memory_format=fmt)
    _cbam_bwd_gx_kernel[(N * pblocks, cblocks)](go, x, ca, pooled, cavg, cmax, spatial, sa, a, gx,
                                                C, HW, *strides, BLOCK_P=BP, BLOCK_C=BC)
    return (gx, gw1.to(w1.dtype), gb1.to(w1.dtype), gw2.to(w2.dtype), gb2.to(w2.dtype),
            gcw.to(conv_w.dtype), gbn_w.reshape(bn_w.shape).to(bn_w.dtype),
            gbn_b.reshape(bn_b.shape).to(bn_b.dtype))


@torch.library.custom_op("fastops::cbam_triton", mutates_args=())
def cbam_triton(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], conv_weight: torch.Tensor,
                bn_weight: torch.Tensor, bn_bias: torch.Tensor, bn_mean: torch.Tensor, bn_var: torch.Tensor,
                eps: float, training: bool, act: str, gate: str
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_forward(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias,
                               bn_mean, bn_var, eps, training, act, gate)


@torch.library.custom_op("fastops::cbam_backward_triton", mutates_args=())
def cbam_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, pooled: torch.Tensor, spatial: torch.Tensor,
                         stats: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor],
                         fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], conv_weight: torch.Tensor,
                         bn_weight: torch.Tensor, bn_bias: torch.Tensor, eps: float, training: bool, act: str,
                         gate: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                             torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_backward(grad_out, x, pooled, spatial, stats, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                                conv_weight, bn_weight, bn_bias, eps, training, act, gate)


# x-shaped tensors are in x's dtype; every other pointer is an fp32 buffer (pooled, spatial, stats, maps,
# partial sums, gates, the fp32 copy of the conv weight).
_X_PTRS = {"x_ptr", "out_ptr", "go_ptr", "gx_ptr"}


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for every kernel variant the launchers can request, with element
    type `dtype` for the x-shaped tensors; tests compile each ahead of time for sm_80 / sm_90."""
    specs = []
    for cl in (False, True):
        bp, bc = _tiles(cl)
        tile = {"BLOCK_P": bp, "BLOCK_C": bc}
        for gate_id in (0, 1):
            specs.append((_cbam_scale_kernel, {"GATE": gate_id, **tile}))
            specs.append((_cbam_bwd_dsa_kernel, {"GATE": gate_id, **tile}))
        specs.append((_cbam_pool_kernel, dict(tile)))
        specs.append((_cbam_chanpool_kernel, dict(tile)))
        specs.append((_cbam_bwd_dx1_kernel, dict(tile)))
        specs.append((_cbam_bwd_gx_kernel, dict(tile)))
    for kernel in (_cbam_conv_kernel, _cbam_bwd_ds_kernel, _cbam_bwd_convw_kernel):
        specs.append((kernel, {"BLOCK_S": BLOCK_S}))
    return _common.aot_signatures(specs, lambda name: "*" + dtype if name in _X_PTRS else "*fp32")
