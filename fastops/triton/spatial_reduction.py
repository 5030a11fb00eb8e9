"""PVT spatial reduction in Triton: the strided conv (or 7x7 average pool + 1x1 conv) as a gather-GEMM, then
LayerNorm (+ exact GELU); forward and backward kernels + launchers.

x (B, N, C) holds the tokens of an (H, W) map (token n = hy * W + wx). The conv is a GEMM with M = B * Nr output
tokens, K = C * k * k, N = C output channels whose A rows are gathered from x in place: output token
r = ry * Wr + rx reads, for tap (ky, kx), the contiguous C channels of token (ry*k + ky) * W + rx*k + kx.
Linear mode first averages AdaptiveAvgPool2d(7)'s bins (row bin i covers hy in [floor(i H / 7),
ceil((i + 1) H / 7)), same for columns) into a pooled (B, 49, C) buffer in x's dtype, then runs the same GEMM on
that 7x7 map with k = 1.

Forward:
  _sr_pool_kernel (linear only): per (batch * bin, channel block), the mean over the bin.
  _sr_conv_kernel: per (block of BLOCK_R output tokens, block of BLOCK_CO output channels); K walked tap by tap
                   and in chunks of BLOCK_K input channels; y = conv + bias stored in fp32. The weight is read
                   as wt = weight permuted to (k, k, C_in, C_out), a C*C*k*k copy made once per call, so every
                   K chunk reads contiguous output-channel runs.
  _sr_norm_fwd_kernel: per block of whole rows: mean, rstd = 1/sqrt(biased var + eps), out = LN(y)
                   (then 0.5 z (1 + erf(z / sqrt 2)) in linear mode); stats = [mean, rstd] (fp32).
Backward:
  _sr_norm_bwd_kernel: per block of rows: dz = grad_out (* GELU'(z), z recomputed from y and stats),
                   g = dz * norm_weight, dy = rstd (g - mean(g) - xhat mean(g xhat)) stored in fp32; the block's
                   partial sums of dz * xhat, dz and dy (for norm weight, norm bias, conv bias) go to a
                   (programs, 3, C) fp32 buffer that _sr_colsum_kernel adds in a fixed order.
  _sr_wgrad_kernel: per (output-channel block, tap * input-channel block), over every output token:
                   grad_weight[co, ci, ky, kx] = sum_r dy[r, co] A[r, (ci, ky, kx)] (deterministic, no atomics).
  _sr_xgrad_kernel: per (output-token block, tap * input-channel block): the tap's pixels get
                   dy[r, :] . W[:, ci, ky, kx]; each pixel belongs to at most one (token, tap), so plain stores.
                   In linear mode this is dpooled = dy . W (fp32, on the 7x7 map), then
  _sr_unpool_kernel (linear): per pixel block, the sum over the (up to 2 x 2, more when H or W < 7) bins
                   that contain the pixel of dpooled / bin area.
  _sr_zero_rest_kernel: the pixels past (H // k) * k or (W // k) * k, which the conv does not read, get 0.

Offsets are int64; accumulation fp32. fp16 / bf16 operands go to tl.dot as they are (dy is rounded to x's
dtype for the two backward GEMMs), fp32 ones with the 3-pass tf32 split (see _dot_precision); under the
interpreter every dot operand is cast to fp32 first, since its low-precision dot is not reliable.

Exposed as the opaque custom ops ``fastops::spatial_reduction_triton`` and
``fastops::spatial_reduction_backward_triton`` (fake kernels and autograd: fastops/ops/spatial_reduction.py).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common

POOL = 7
# The norm kernels hold whole rows of C channels in one program.
MAX_CHANNELS = 4096
# The backward GEMMs put taps * input-channel blocks on grid axis 1 (at most 65535 programs).
MAX_GRID_Y = 65535
# The forward GEMM's grid size below which its row blocks shrink (about one program per SM).
FWD_TARGET_PROGRAMS = 128


@triton.jit
def _sr_tokens(R, NR, WR, KS, W, NPIX):
    """Flat token index (b * NPIX + pixel) of tap (0, 0) of output rows R = b * Nr + r (int64)."""
    b = R // NR
    r = R - b * NR
    ry = r // WR
    rx = r - ry * WR
    return b * NPIX + (ry * KS) * W + rx * KS


@triton.jit
def _sr_pool_kernel(
    x_ptr, pooled_ptr, H, W, C,
    BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // 49).to(tl.int64)
    bin_ = pid % 49
    i = bin_ // 7
    j = bin_ - i * 7
    hs = (i * H) // 7
    he = ((i + 1) * H + 6) // 7
    ws = (j * W) // 7
    we = ((j + 1) * W + 6) // 7
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for hy in range(hs, he):
        row = x_ptr + (b * H + hy) * W * C + c
        for wx in range(ws, we):
            acc += tl.load(row + wx * C, mask=c_ok, other=0.0).to(tl.float32)
    area = ((he - hs) * (we - ws)).to(tl.float32)
    tl.store(pooled_ptr + (b * 49 + bin_) * C + c, (acc / area).to(pooled_ptr.dtype.element_ty), mask=c_ok)


@triton.jit
def _sr_conv_kernel(
    src_ptr, wt_ptr, b_ptr, y_ptr,
    NROWS, NR, WR, KS, W, NPIX, C,
    HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr,
):
    R = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = R < NROWS
    base = _sr_tokens(R, NR, WR, KS, W, NPIX)
    co = tl.program_id(1) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C
    acc = tl.zeros((BLOCK_R, BLOCK_CO), dtype=tl.float32)
    for t in range(KS * KS):
        ky = t // KS
        kx = t - ky * KS
        a_rows = src_ptr + (base + ky * W + kx)[:, None] * C
        for c0 in range(0, C, BLOCK_K):
            ci = c0 + tl.arange(0, BLOCK_K)
            ci_ok = ci < C
            a = tl.load(a_rows + ci[None, :], mask=r_ok[:, None] & ci_ok[None, :], other=0.0)
            w = tl.load(wt_ptr + ((t * C + ci).to(tl.int64) * C)[:, None] + co[None, :],
                        mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc += tl.dot(a, w, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + R[:, None] * C + co[None, :], acc, mask=r_ok[:, None] & co_ok[None, :])


@triton.jit
def _sr_norm_fwd_kernel(
    y_ptr, nw_ptr, nb_ptr, out_ptr, stats_ptr,
    NROWS, C, eps,
    GELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    R = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = R < NROWS
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    m = r_ok[:, None] & c_ok[None, :]
    off = R[:, None] * C + c[None, :]
    y = tl.load(y_ptr + off, mask=m, other=0.0)
    mean = tl.sum(y, axis=1) / C
    diff = tl.where(m, y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=1) / C + eps)
    nw = tl.load(nw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    nb = tl.load(nb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    z = diff * rstd[:, None] * nw[None, :] + nb[None, :]
    if GELU:
        z = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    tl.store(out_ptr + off, z.to(out_ptr.dtype.element_ty), mask=m)
    tl.store(stats_ptr + R * 2, mean, mask=r_ok)
    tl.store(stats_ptr + R * 2 + 1, rstd, mask=r_ok)


@triton.jit
def _sr_norm_bwd_kernel(
    go_ptr, y_ptr, stats_ptr, nw_ptr, nb_ptr, dy_ptr, part_ptr,
    NROWS, C,
    GELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid = tl.program_id(0)
    R = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = R < NROWS
    c = tl.arange(0, BLOCK_C)
    c_ok = c < C
    m = r_ok[:, None] & c_ok[None, :]
    off = R[:, None] * C + c[None, :]
    y = tl.load(y_ptr + off, mask=m, other=0.0)
    mean = tl.load(stats_ptr + R * 2, mask=r_ok, other=0.0)
    rstd = tl.load(stats_ptr + R * 2 + 1, mask=r_ok, other=0.0)
    xhat = tl.where(m, (y - mean[:, None]) * rstd[:, None], 0.0)
    nw = tl.load(nw_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    dz = tl.load(go_ptr + off, mask=m, other=0.0).to(tl.float32)
    if GELU:
        nb = tl.load(nb_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        z = xhat * nw[None, :] + nb[None, :]
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        dz = dz * (cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327)
    g = dz * nw[None, :]
    mg = tl.sum(g, axis=1) / C
    mgx = tl.sum(g * xhat, axis=1) / C
    dy = tl.where(m, rstd[:, None] * (g - mg[:, None] - xhat * mgx[:, None]), 0.0)
    tl.store(dy_ptr + off, dy, mask=m)
    prow = part_ptr + pid.to(tl.int64) * 3 * C + c
    tl.store(prow, tl.sum(dz * xhat, axis=0), mask=c_ok)
    tl.store(prow + C, tl.sum(dz, axis=0), mask=c_ok)
    tl.store(prow + 2 * C, tl.sum(dy, axis=0), mask=c_ok)


@triton.jit
def _sr_colsum_kernel(src_ptr, dst_ptr, NROWS, LD, COL0, NCOLS, BLOCK: tl.constexpr):
    # dst[c] = sum_r src[r * LD + COL0 + c], rows in order (deterministic)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = c < NCOLS
    p = src_ptr + COL0 + c
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(NROWS):
        acc += tl.load(p, mask=ok, other=0.0)
        p += LD
    tl.store(dst_ptr + c, acc.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _sr_wgrad_kernel(
    src_ptr, dy_ptr, gw_ptr,
    NROWS, NR, WR, KS, W, NPIX, C, NCIB,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < C
    pid1 = tl.program_id(1)
    t = pid1 // NCIB
    ci = (pid1 - t * NCIB) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C
    ky = t // KS
    kx = t - ky * KS
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for r0 in range(0, NROWS, BLOCK_R):
        R = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        r_ok = R < NROWS
        tok = _sr_tokens(R, NR, WR, KS, W, NPIX) + ky * W + kx
        a = tl.load(src_ptr + tok[:, None] * C + ci[None, :], mask=r_ok[:, None] & ci_ok[None, :], other=0.0)
        g = tl.load(dy_ptr + R[:, None] * C + co[None, :], mask=r_ok[:, None] & co_ok[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        else:
            g = g.to(a.dtype)
        acc += tl.dot(tl.trans(g), a, input_precision=DOT_PREC)
    KK = KS * KS
    off = (co.to(tl.int64)[:, None] * C + ci[None, :]) * KK + t
    tl.store(gw_ptr + off, acc.to(gw_ptr.dtype.element_ty), mask=co_ok[:, None] & ci_ok[None, :])


@triton.jit
def _sr_xgrad_kernel(
    dy_ptr, wt_ptr, gx_ptr,
    NROWS, NR, WR, KS, W, NPIX, C, NCIB,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    R = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = R < NROWS
    pid1 = tl.program_id(1)
    t = pid1 // NCIB
    ci = (pid1 - t * NCIB) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < C
    ky = t // KS
    kx = t - ky * KS
    tok = _sr_tokens(R, NR, WR, KS, W, NPIX) + ky * W + kx
    w_tap = wt_ptr + ((t * C + ci).to(tl.int64) * C)[None, :]
    acc = tl.zeros((BLOCK_R, BLOCK_CI), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_CO):
        co = c0 + tl.arange(0, BLOCK_CO)
        co_ok = co < C
        g = tl.load(dy_ptr + R[:, None] * C + co[None, :], mask=r_ok[:, None] & co_ok[None, :], other=0.0)
        w = tl.load(w_tap + co[:, None], mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
        if DOT_F32:
            w = w.to(tl.float32)
        else:
            g = g.to(w.dtype)
        acc += tl.dot(g, w, input_precision=DOT_PREC)
    tl.store(gx_ptr + tok[:, None] * C + ci[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=r_ok[:, None] & ci_ok[None, :])


@triton.jit
def _sr_unpool_kernel(
    dp_ptr, gx_ptr, NPIXTOT, H, W, C, SPAN_H, SPAN_W,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    P = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    p_ok = P < NPIXTOT
    HW = H * W
    b = P // HW
    pix = P - b * HW
    hy = (pix // W).to(tl.int32)
    hx = (pix - (pix // W) * W).to(tl.int32)
    # bins i with floor(i H / 7) <= hy < ceil((i + 1) H / 7)
    i0 = (7 * hy) // H
    i1 = tl.minimum(6, (7 * hy + 6) // H)
    j0 = (7 * hx) // W
    j1 = tl.minimum(6, (7 * hx + 6) // W)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for di in range(SPAN_H):
        i = i0 + di
        i_ok = p_ok & (i <= i1)
        bh = ((i + 1) * H + 6) // 7 - (i * H) // 7
        for dj in range(SPAN_W):
            j = j0 + dj
            ok = i_ok & (j <= j1)
            bw = ((j + 1) * W + 6) // 7 - (j * W) // 7
            inv_area = tl.where(ok, 1.0 / tl.maximum(bh * bw, 1).to(tl.float32), 0.0)
            v = tl.load(dp_ptr + (b * 49 + i * 7 + j)[:, None] * C + c[None, :], mask=ok[:, None] & c_ok[None, :],
                        other=0.0)
            acc += v * inv_area[:, None]
    tl.store(gx_ptr + P[:, None] * C + c[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=p_ok[:, None] & c_ok[None, :])


@triton.jit
def _sr_zero_rest_kernel(
    gx_ptr, NPIXTOT, H, W, HC, WC, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # pixels with hy >= HC or hx >= WC are not read by the conv: their gradient is 0
    P = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    HW = H * W
    pix = P - (P // HW) * HW
    hy = pix // W
    hx = pix - hy * W
    rest = (P < NPIXTOT) & ((hy >= HC) | (hx >= WC))
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    zero = tl.zeros((BLOCK_P, BLOCK_C), dtype=gx_ptr.dtype.element_ty)
    tl.store(gx_ptr + P[:, None] * C + c[None, :], zero, mask=rest[:, None] & (c < C)[None, :])


# Host side ---------------------------------------------------------------------------------------

_interpreting = _common.interpreting


_dot_precision = _common.dot_precision


def _gemm_blocks(C: int, dtype: torch.dtype, rows: Optional[int] = None) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_CO, BLOCK_K): tl.dot wants every dim >= 16; fp32's 3-pass tf32 operands take ~3x the
    shared memory of fp16 ones, so its K chunk is halved. Given the forward's output rows, BLOCK_R shrinks
    (to 16) while the grid has fewer than FWD_TARGET_PROGRAMS programs: PVT's reduced maps are small
    (B * 49 rows) and their K = C * k * k deep."""
    bc = min(64, max(16, triton.next_power_of_2(C)))
    bk = min(32 if dtype == torch.float32 else 64, bc)
    br = 64
    while rows is not None and br > 16 and triton.cdiv(rows, br) * triton.cdiv(C, bc) < FWD_TARGET_PROGRAMS:
        br //= 2
    return br, bc, bk


def _row_blocks(C: int) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_C) of the norm kernels: whole rows, ~4096 fp32 values per program."""
    bc = triton.next_power_of_2(max(C, 1))
    return max(1, min(64, 4096 // bc)), bc


def limit_reason(dtype: torch.dtype, channels: int, sr_ratio: int = 1, linear: bool = False) -> Optional[str]:
    """Why these kernels cannot take C = channels (and this sr_ratio) in dtype, or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the triton backend takes float16, bfloat16 or float32, got {dtype}"
    if channels > MAX_CHANNELS:
        return (f"the triton backend normalises whole rows of C channels in one program: C <= {MAX_CHANNELS}, "
                f"got {channels}")
    k = 1 if linear else int(sr_ratio)
    _, bc, _ = _gemm_blocks(channels, dtype)
    if k * k * triton.cdiv(channels, bc) > MAX_GRID_Y:
        return f"the triton backend takes sr_ratio^2 * ceil(C / {bc}) <= {MAX_GRID_Y}, got sr_ratio {sr_ratio}"
    return None


class _Geometry:
    def __init__(self, op, x, feat_size, weight, sr_ratio, linear):
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"fastops.{op}: x must be a 3-D (B, N, C) tensor")
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"fastops.{op}: the triton backend takes x in float16, bfloat16 or float32, "
                             f"got {x.dtype}")
        if not x.is_cuda and not _interpreting():
            raise RuntimeError(f"fastops.{op}: the triton backend needs CUDA tensors "
                               f"(or TRITON_INTERPRET=1 for CPU tensors), got x on {x.device}")
        if len(feat_size) != 2:
            raise ValueError(f"fastops.{op}: feat_size must be [H, W], got {list(feat_size)}")
        B, N, C = x.shape
        H, W = int(feat_size[0]), int(feat_size[1])
        if H < 1 or W < 1 or H * W != N:
            raise ValueError(f"fastops.{op}: feat_size {[H, W]} must be positive with H * W = N = {N} "
                             f"(x of shape {tuple(x.shape)})")
        if C < 1:
            raise ValueError(f"fastops.{op}: x must have C >= 1 channels, got shape {tuple(x.shape)}")
        k = 1 if linear else int(sr_ratio)
        if k < 1:
            raise ValueError(f"fastops.{op}: sr_ratio must be >= 1, got {sr_ratio}")
        if not linear and (H < k or W < k):
            raise ValueError(f"fastops.{op}: feat_size {[H, W]} must be at least sr_ratio = {k} in each dimension")
        wshape = (C, C, k, k)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != wshape:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"fastops.{op}: weight must have shape {wshape}, got {got}")
        why = limit_reason(x.dtype, C, k, linear)
        if why is not None:
            raise ValueError(f"fastops.{op}: {why}")
        self.B, self.N, self.C, self.H, self.W, self.k, self.linear = B, N, C, H, W, k, bool(linear)
        if linear:
            self.hr, self.wr = POOL, POOL
        else:
            self.hr, self.wr = H // k, W // k
        self.nr = self.hr * self.wr

    def gemm_src(self, x, pooled):
        """(source, NR, WR, KS, W, NPIX) of the GEMM's gathered A rows."""
        if self.linear:
            return pooled, self.nr, self.wr, 1, POOL, POOL * POOL
        return x, self.nr, self.wr, self.k, self.W, self.N


def _check_like(op, name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device:
        got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastops.{op}: {name} must be a {dtype} tensor of shape {tuple(shape)} on {device}, "
                         f"got {got}")
    return t.contiguous()


def _pool(g, x):
    pooled = torch.empty((g.B, POOL * POOL, g.C), dtype=x.dtype, device=x.device)
    bc = min(128, triton.next_power_of_2(g.C))
    _sr_pool_kernel[(g.B * POOL * POOL, triton.cdiv(g.C, bc))](x, pooled, g.H, g.W, g.C, BLOCK_C=bc, num_warps=4)
    return pooled


def _launch_forward(x, feat_size, weight, bias, norm_weight, norm_bias, sr_ratio, linear, eps):
    op = "spatial_reduction"
    g = _Geometry(op, x, feat_size, weight, sr_ratio, linear)
    x = x.contiguous()
    weight = _check_like(op, "weight", weight, weight.shape, x.dtype, x.device)
    if bias is not None:
        bias = _check_like(op, "bias", bias, (g.C,), x.dtype, x.device)
    nw = _check_like(op, "norm_weight", norm_weight, (g.C,), x.dtype, x.device)
    nb = _check_like(op, "norm_bias", norm_bias, (g.C,), x.dtype, x.device)
    f32 = dict(dtype=torch.float32, device=x.device)
    out = torch.empty((g.B, g.nr, g.C), dtype=x.dtype, device=x.device)
    y = torch.empty((g.B, g.nr, g.C), **f32)
    stats = torch.empty((g.B, g.nr, 2), **f32)
    rows = g.B * g.nr
    if rows == 0:
        return out, y, stats
    pooled = _pool(g, x) if g.linear else None
    src, nr, wr, ks, w, npix = g.gemm_src(x, pooled)
    wt = weight.permute(2, 3, 1, 0).contiguous()
    br, bco, bk = _gemm_blocks(g.C, x.dtype, rows)
    _sr_conv_kernel[(triton.cdiv(rows, br), triton.cdiv(g.C, bco))](
        src, wt, y if bias is None else bias, y, rows, nr, wr, ks, w, npix, g.C,
        HAS_BIAS=bias is not None, DOT_F32=_interpreting(), DOT_PREC=_dot_precision(x.dtype),
        BLOCK_R=br, BLOCK_CO=bco, BLOCK_K=bk, num_warps=4)
    rb, bc = _row_blocks(g.C)
    _sr_norm_fwd_kernel[(triton.cdiv(rows, rb),)](
        y, nw, nb, out, stats, rows, g.C, float(eps), GELU=g.linear, BLOCK_R=rb, BLOCK_C=bc, num_warps=4)
    return out, y, stats


def _colsum(src, rows, ld, col0, ncols, dst):
    block = min(1024, triton.next_power_of_2(ncols))
    _sr_colsum_kernel[(triton.cdiv(ncols, block),)](src, dst, rows, ld, col0, ncols, BLOCK=block, num_warps=4)
    return dst


def _launch_backward(grad_out, x, feat_size, weight, norm_weight, norm_bias, y, stats, sr_ratio, linear,
                     bias_grad):
    op = "spatial_reduction_backward"
    g = _Geometry(op, x, feat_size, weight, sr_ratio, linear)
    x = x.contiguous()
    dev, dt = x.device, x.dtype
    weight = _check_like(op, "weight", weight, weight.shape, dt, dev)
    nw = _check_like(op, "norm_weight", norm_weight, (g.C,), dt, dev)
    nb = _check_like(op, "norm_bias", norm_bias, (g.C,), dt, dev)
    go = _check_like(op, "grad_out", grad_out, (g.B, g.nr, g.C), dt, dev)
    y = _check_like(op, "y", y, (g.B, g.nr, g.C), torch.float32, dev)
    stats = _check_like(op, "stats", stats, (g.B, g.nr, 2), torch.float32, dev)
    C, rows = g.C, g.B * g.nr
    gx = torch.empty_like(x)
    gw = torch.empty_like(weight)
    gb = torch.empty((C,) if bias_grad else (0,), dtype=dt, device=dev)
    gnw = torch.empty((C,), dtype=dt, device=dev)
    gnb = torch.empty((C,), dtype=dt, device=dev)
    if rows == 0:
        return gx, gw.zero_(), gb.zero_(), gnw.zero_(), gnb.zero_()
    f32 = dict(dtype=torch.float32, device=dev)
    # LN (+ GELU) backward -> dy and per-block partial sums
    rb, bc = _row_blocks(C)
    nprog = triton.cdiv(rows, rb)
    dy = torch.empty((rows, C), **f32)
    part = torch.empty((nprog, 3, C), **f32)
    _sr_norm_bwd_kernel[(nprog,)](go, y, stats, nw, nb, dy, part, rows, C, GELU=g.linear,
                                  BLOCK_R=rb, BLOCK_C=bc, num_warps=4)
    _colsum(part, nprog, 3 * C, 0, C, gnw)
    _colsum(part, nprog, 3 * C, C, C, gnb)
    if bias_grad:
        _colsum(part, nprog, 3 * C, 2 * C, C, gb)
    pooled = _pool(g, x) if g.linear else None
    src, nr, wr, ks, w, npix = g.gemm_src(x, pooled)
    br, bco, bci = _gemm_blocks(C, dt)
    ncib = triton.cdiv(C, bci)
    common = dict(DOT_F32=_interpreting(), DOT_PREC=_dot_precision(dt), num_warps=4)
    _sr_wgrad_kernel[(triton.cdiv(C, bco), ks * ks * ncib)](
        src, dy, gw, rows, nr, wr, ks, w, npix, C, ncib, BLOCK_R=br, BLOCK_CO=bco, BLOCK_CI=bci, **common)
    wt = weight.permute(2, 3, 1, 0).contiguous()
    bp, bcp = 64, min(64, triton.next_power_of_2(C))
    npixtot = g.B * g.N
    pgrid = (triton.cdiv(npixtot, bp), triton.cdiv(C, bcp))
    if g.linear:
        dpooled = torch.empty((rows, C), **f32)
        _sr_xgrad_kernel[(triton.cdiv(rows, br), ncib)](
            dy, wt, dpooled, rows, nr, wr, 1, POOL, POOL * POOL, C, ncib,
            BLOCK_R=br, BLOCK_CO=bco, BLOCK_CI=bci, **common)
        span_h, span_w = min(POOL, POOL // g.H + 2), min(POOL, POOL // g.W + 2)
        _sr_unpool_kernel[pgrid](dpooled, gx, npixtot, g.H, g.W, C, span_h, span_w,
                                 BLOCK_P=bp, BLOCK_C=bcp, num_warps=4)
    else:
        _sr_xgrad_kernel[(triton.cdiv(rows, br), ks * ks * ncib)](
            dy, wt, gx, rows, nr, wr, ks, w, npix, C, ncib, BLOCK_R=br, BLOCK_CO=bco, BLOCK_CI=bci, **common)
        hc, wc = g.hr * g.k, g.wr * g.k
        if hc < g.H or wc < g.W:
            _sr_zero_rest_kernel[pgrid](gx, npixtot, g.H, g.W, hc, wc, C, BLOCK_P=bp, BLOCK_C=bcp, num_warps=4)
    return gx, gw, gb, gnw, gnb


@torch.library.custom_op("fastops::spatial_reduction_triton", mutates_args=())
def spatial_reduction_triton(x: torch.Tensor, feat_size: List[int], weight: torch.Tensor,
                             bias: Optional[torch.Tensor], norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                             sr_ratio: int, linear: bool, eps: float
                             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_forward(x, feat_size, weight, bias, norm_weight, norm_bias, sr_ratio, linear, eps)


@torch.library.custom_op("fastops::spatial_reduction_backward_triton", mutates_args=())
def spatial_reduction_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, feat_size: List[int],
                                      weight: torch.Tensor, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                                      y: torch.Tensor, stats: torch.Tensor, sr_ratio: int, linear: bool,
                                      bias_grad: bool
                                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor]:
    with _common.device_guard(x):
        return _launch_backward(grad_out, x, feat_size, weight, norm_weight, norm_bias, y, stats, sr_ratio,
                                linear, bias_grad)


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for the variants the launchers request on the PVT shapes (C = 64 .. 512,
    an odd C = 24, the widest row the norm kernels take; linear mode's GELU), with element type `dtype` for the
    x-shaped tensors; tests compile each ahead of time for sm_80 / sm_90."""
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    common = {"DOT_F32": False, "DOT_PREC": "tf32x3" if dtype == "fp32" else "tf32"}
    fp32 = "*fp32"
    elt = "*" + dtype
    specs = []  # (kernel, constexprs, pointer types that differ from x's dtype)
    # (C, forward rows): PVTv2-b2 stage 1 at batch 8 (392 rows: the smallest row blocks), a large batch, an
    # odd C, stage 3
    for C, rows in ((64, 392), (64, 1 << 20), (24, 1 << 20), (320, 8 * 49)):
        br, bco, bk = _gemm_blocks(C, tdtype, rows)
        for has_bias in (True, False):
            specs.append((_sr_conv_kernel, {"HAS_BIAS": has_bias, **common, "BLOCK_R": br, "BLOCK_CO": bco,
                                            "BLOCK_K": bk}, {"y_ptr": fp32}))
        br, bco, bk = _gemm_blocks(C, tdtype)
        blocks = {"BLOCK_R": br, "BLOCK_CO": bco, "BLOCK_CI": bk}
        specs.append((_sr_wgrad_kernel, {**common, **blocks}, {"dy_ptr": fp32}))
        specs.append((_sr_xgrad_kernel, {**common, **blocks}, {"dy_ptr": fp32}))
        specs.append((_sr_xgrad_kernel, {**common, **blocks}, {"dy_ptr": fp32, "gx_ptr": fp32}))  # dpooled
    for C in (64, 512, 24, MAX_CHANNELS):
        rb, bc = _row_blocks(C)
        for gelu in (False, True):
            specs.append((_sr_norm_fwd_kernel, {"GELU": gelu, "BLOCK_R": rb, "BLOCK_C": bc},
                          {"y_ptr": fp32, "stats_ptr": fp32}))
            specs.append((_sr_norm_bwd_kernel, {"GELU": gelu, "BLOCK_R": rb, "BLOCK_C": bc},
                          {"y_ptr": fp32, "stats_ptr": fp32, "dy_ptr": fp32, "part_ptr": fp32}))
    for C in (64, 512):
        specs.append((_sr_pool_kernel, {"BLOCK_C": min(128, C)}, {}))
        specs.append((_sr_colsum_kernel, {"BLOCK": C}, {"src_ptr": fp32}))
        bcp = min(64, C)
        specs.append((_sr_unpool_kernel, {"BLOCK_P": 64, "BLOCK_C": bcp}, {"dp_ptr": fp32}))
        specs.append((_sr_zero_rest_kernel, {"BLOCK_P": 64, "BLOCK_C": bcp}, {}))
    out = []
    for kernel, constexprs, ptrs in specs:
        (k, sig, ce), = _common.aot_signatures([(kernel, constexprs)], lambda name: ptrs.get(name, elt))
        if "eps" in sig:
            sig["eps"] = "fp32"
        if (k, sig, ce) not in out:
            out.append((k, sig, ce))
    return out
