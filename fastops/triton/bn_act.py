"""BatchNorm (+ residual) + activation in Triton: forward (training and eval) and backward kernels + launchers.

x (N, C, H, W) is read in place in either layout: channels_last is an (M, C) matrix (M = N * H * W), NCHW is
N slabs of C rows of HW pixels. Every kernel walks "units" of BLOCK_M pixels x BLOCK_C channels: for
channels_last a unit is BLOCK_M consecutive rows of the (M, C) matrix (n is always 0, HWV = M); for NCHW it is
BLOCK_M consecutive pixels of one image n (HWV = H * W), so the pixel axis stays contiguous in both.

Forward, training:
  _bn_stats_kernel: per (channel block, split of the units): count, mean and centred sum of squares of the
                    split, tile by tile, merged with Chan's pairwise formula (no E[x^2] - E[x]^2 cancellation);
                    partials go to a (splits, 3, C) fp32 buffer.
  _bn_stats_combine_kernel: per channel block, the splits merged in a fixed order (deterministic) ->
                    batch mean and biased variance (fp32).
  _bn_fwd_kernel:   out = act((x - mean) * rsqrt(var + eps) * w + b + residual), one rounding at the store.
Forward, eval: _bn_fwd_kernel with the running statistics.
Backward:
  _bn_bwd_reduce_kernel: per (channel block, split): z recomputed, dz = grad_out * act'(z), partial sums of
                    dz and dz * xhat to a (splits, 2, C) buffer; _bn_bwd_combine_kernel adds the splits in
                    order -> grad_bias, grad_weight.
  _bn_bwd_kernel:   dz again, grad_x = w rstd (dz - sum(dz) / M - xhat sum(dz xhat) / M) (training) or
                    dz w rstd (eval), and grad_residual = dz.

Offsets are int64; all arithmetic is fp32.

Exposed as the opaque custom ops ``fastops::bn_act_triton`` and ``fastops::bn_act_backward_triton`` (same
arguments and results as ``fastops::bn_act`` / ``fastops::bn_act_backward``; fake kernels and autograd are
registered by the Python front).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import is_channels_last
from . import _common
from ._common import act_bwd, act_fwd

# Programs the split reductions aim for on a GPU (a few per SM); the interpreter runs programs one by one, so
# there only a few splits (still exercising the combine) are used.
GPU_TARGET_PROGRAMS = 1024
INTERP_MAX_SPLITS = 3
# Pixel indices (not element offsets) are int32.
MAX_PIXELS = 1 << 31


@triton.jit
def _bn_rows(j, NPB, HWV, C, CL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row offsets (int64) and validity of unit j's BLOCK_M pixels."""
    n = (j // NPB).to(tl.int64)
    p = (j - (j // NPB) * NPB) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = p < HWV
    if CL:
        row = (n * HWV + p) * C
    else:
        row = n * C * HWV + p
    return row, ok


@triton.jit
def _bn_cols(c, HWV, CL: tl.constexpr):
    if CL:
        col = c.to(tl.int64)
    else:
        col = c.to(tl.int64) * HWV
    return col


@triton.jit
def _bn_stats_kernel(
    x_ptr, part_ptr,
    C, NPB, HWV, UNITS, UPS,
    CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    col = _bn_cols(c, HWV, CL)
    s = tl.program_id(1)
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    j0 = s * UPS
    j1 = tl.minimum(j0 + UPS, UNITS)
    for j in range(j0, j1):
        row, r_ok = _bn_rows(j, NPB, HWV, C, CL, BLOCK_M)
        m = r_ok[:, None] & c_ok[None, :]
        v = tl.load(x_ptr + row[:, None] + col[None, :], mask=m, other=0.0).to(tl.float32)
        tc = tl.sum(m.to(tl.float32), axis=0)
        tmean = tl.sum(v, axis=0) / tl.maximum(tc, 1.0)
        d = tl.where(m, v - tmean[None, :], 0.0)
        tm2 = tl.sum(d * d, axis=0)
        tot = cnt + tc
        frac = tc / tl.maximum(tot, 1.0)
        delta = tmean - mean
        mean = mean + delta * frac
        m2 = m2 + tm2 + delta * delta * cnt * frac
        cnt = tot
    prow = part_ptr + s.to(tl.int64) * 3 * C + c
    tl.store(prow, cnt, mask=c_ok)
    tl.store(prow + C, mean, mask=c_ok)
    tl.store(prow + 2 * C, m2, mask=c_ok)


@triton.jit
def _bn_stats_combine_kernel(part_ptr, mean_ptr, var_ptr, C, S, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    cnt = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    p = part_ptr + c
    for _ in range(S):
        tc = tl.load(p, mask=c_ok, other=0.0)
        tmean = tl.load(p + C, mask=c_ok, other=0.0)
        tm2 = tl.load(p + 2 * C, mask=c_ok, other=0.0)
        tot = cnt + tc
        frac = tc / tl.maximum(tot, 1.0)
        delta = tmean - mean
        mean = mean + delta * frac
        m2 = m2 + tm2 + delta * delta * cnt * frac
        cnt = tot
        p += 3 * C
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(var_ptr + c, m2 / tl.maximum(cnt, 1.0), mask=c_ok)


@triton.jit
def _bn_channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, c_ok, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        w = tl.load(w_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full((c.shape[0],), 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    else:
        b = tl.zeros((c.shape[0],), dtype=tl.float32)
    return mean, rstd, w, b


@triton.jit
def _bn_fwd_kernel(
    x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, r_ptr, out_ptr,
    C, NPB, HWV, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, r_ok = _bn_rows(tl.program_id(0), NPB, HWV, C, CL, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    off = row[:, None] + _bn_cols(c, HWV, CL)[None, :]
    m = r_ok[:, None] & c_ok[None, :]
    mean, rstd, w, b = _bn_channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, c_ok, eps, HAS_W, HAS_B)
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    z = (x - mean[None, :]) * rstd[None, :] * w[None, :] + b[None, :]
    if HAS_RES:
        z += tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, act_fwd(z, ACT).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _bn_dz(go_ptr, x_ptr, r_ptr, off, m, mean, rstd, w, b, HAS_RES: tl.constexpr, ACT: tl.constexpr):
    """(dz, xhat) of one tile, z recomputed (dz = grad_out when ACT is none)."""
    x = tl.load(x_ptr + off, mask=m, other=0.0).to(tl.float32)
    xhat = (x - mean[None, :]) * rstd[None, :]
    dz = tl.load(go_ptr + off, mask=m, other=0.0).to(tl.float32)
    if ACT != 0:
        z = xhat * w[None, :] + b[None, :]
        if HAS_RES:
            z += tl.load(r_ptr + off, mask=m, other=0.0).to(tl.float32)
        dz = dz * act_bwd(z, ACT)
    dz = tl.where(m, dz, 0.0)
    xhat = tl.where(m, xhat, 0.0)
    return dz, xhat


@triton.jit
def _bn_bwd_reduce_kernel(
    go_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, r_ptr, part_ptr,
    C, NPB, HWV, UNITS, UPS, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    col = _bn_cols(c, HWV, CL)
    s = tl.program_id(1)
    mean, rstd, w, b = _bn_channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, c_ok, eps, HAS_W, HAS_B)
    acc_dz = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    acc_dzx = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    j0 = s * UPS
    j1 = tl.minimum(j0 + UPS, UNITS)
    for j in range(j0, j1):
        row, r_ok = _bn_rows(j, NPB, HWV, C, CL, BLOCK_M)
        m = r_ok[:, None] & c_ok[None, :]
        dz, xhat = _bn_dz(go_ptr, x_ptr, r_ptr, row[:, None] + col[None, :], m, mean, rstd, w, b, HAS_RES, ACT)
        acc_dz += dz
        acc_dzx += dz * xhat
    prow = part_ptr + s.to(tl.int64) * 2 * C + c
    tl.store(prow, tl.sum(acc_dz, axis=0), mask=c_ok)
    tl.store(prow + C, tl.sum(acc_dzx, axis=0), mask=c_ok)


@triton.jit
def _bn_bwd_combine_kernel(part_ptr, gb_ptr, gw_ptr, C, S, BLOCK_C: tl.constexpr):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sdz = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sdzx = tl.zeros((BLOCK_C,), dtype=tl.float32)
    p = part_ptr + c
    for _ in range(S):
        sdz += tl.load(p, mask=c_ok, other=0.0)
        sdzx += tl.load(p + C, mask=c_ok, other=0.0)
        p += 2 * C
    tl.store(gb_ptr + c, sdz, mask=c_ok)
    tl.store(gw_ptr + c, sdzx, mask=c_ok)


@triton.jit
def _bn_bwd_kernel(
    go_ptr, x_ptr, w_ptr, b_ptr, mean_ptr, var_ptr, r_ptr, gb_ptr, gw_ptr, gx_ptr, gr_ptr,
    C, NPB, HWV, inv_m, eps,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr,
    TRAINING: tl.constexpr, CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    row, r_ok = _bn_rows(tl.program_id(0), NPB, HWV, C, CL, BLOCK_M)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    off = row[:, None] + _bn_cols(c, HWV, CL)[None, :]
    m = r_ok[:, None] & c_ok[None, :]
    mean, rstd, w, b = _bn_channel_params(w_ptr, b_ptr, mean_ptr, var_ptr, c, c_ok, eps, HAS_W, HAS_B)
    dz, xhat = _bn_dz(go_ptr, x_ptr, r_ptr, off, m, mean, rstd, w, b, HAS_RES, ACT)
    if HAS_RES:
        tl.store(gr_ptr + off, dz.to(gr_ptr.dtype.element_ty), mask=m)
    scale = (w * rstd)[None, :]
    if TRAINING:
        mdz = tl.load(gb_ptr + c, mask=c_ok, other=0.0) * inv_m
        mdzx = tl.load(gw_ptr + c, mask=c_ok, other=0.0) * inv_m
        gx = scale * (dz - mdz[None, :] - xhat * mdzx[None, :])
    else:
        gx = scale * dz
    tl.store(gx_ptr + off, gx.to(gx_ptr.dtype.element_ty), mask=m)


# Host side ---------------------------------------------------------------------------------------

_interpreting = _common.interpreting


def _blocks(cl: bool, C: int, hw: int) -> Tuple[int, int]:
    """(BLOCK_M, BLOCK_C), ~2048 elements a tile: channels on the contiguous axis for channels_last (up to 64),
    pixels (up to 256) for NCHW."""
    if cl:
        bc = min(64, triton.next_power_of_2(max(C, 1)))
        return max(16, 2048 // bc), bc
    bm = min(256, max(16, triton.next_power_of_2(max(hw, 1))))
    return bm, min(2048 // bm, triton.next_power_of_2(max(C, 1)))


class _Geometry:
    """Unit walk of x: (cl, BLOCK_M, BLOCK_C, NPB, HWV, UNITS, channel blocks, M)."""

    def __init__(self, x):
        N, C, H, W = x.shape
        self.cl = is_channels_last(x)
        self.C = C
        self.M = N * H * W
        if self.M >= MAX_PIXELS:
            raise ValueError(f"fastops.bn_act: the triton backend indexes pixels in int32: N * H * W must be < "
                             f"{MAX_PIXELS}, got {self.M}")
        self.bm, self.bc = _blocks(self.cl, C, H * W)
        if self.cl:
            self.hwv = self.M
            self.npb = triton.cdiv(self.M, self.bm)
            self.units = self.npb
        else:
            self.hwv = H * W
            self.npb = triton.cdiv(H * W, self.bm)
            self.units = N * self.npb
        self.cblocks = triton.cdiv(C, self.bc)

    def splits(self) -> Tuple[int, int]:
        """(splits, units per split) of the reduction kernels."""
        if _interpreting():
            want = INTERP_MAX_SPLITS
        else:
            want = max(1, GPU_TARGET_PROGRAMS // self.cblocks)
        s = max(1, min(self.units, want))
        ups = triton.cdiv(self.units, s)
        return triton.cdiv(self.units, ups), ups


def limit_reason(dtype: torch.dtype, channels: Optional[int] = None) -> Optional[str]:
    """Why these kernels cannot take x of this dtype, or None (any shape and either layout works)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the triton backend takes float16, bfloat16 or float32, got {dtype}"
    return None


def _fail(op, msg):
    raise ValueError(f"fastops.{op}: {msg}")


def _check_x(op, x):
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        _fail(op, "x must be a 4-D (N, C, H, W) tensor")
    why = limit_reason(x.dtype)
    if why is not None:
        _fail(op, why)
    if not x.is_cuda and not _interpreting():
        raise RuntimeError(f"fastops.{op}: the triton backend needs CUDA tensors "
                           f"(or TRITON_INTERPRET=1 for CPU tensors), got x on {x.device}")
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return x.contiguous(memory_format=fmt), fmt


def _check_vec(op, name, t, C, device, required=False):
    if t is None:
        if required:
            _fail(op, f"{name} is required")
        return None
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != C or t.device != device \
            or t.dtype != torch.float32:
        got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
        _fail(op, f"{name} must be a float32 tensor of shape ({C},) on {device}, got {got}")
    return t.contiguous()


def _check_like_x(op, name, t, x, fmt):
    if t is None:
        return None
    if not isinstance(t, torch.Tensor) or t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
        _fail(op, f"{name} must match x ({tuple(x.shape)}, {x.dtype}, {x.device}), got {got}")
    return t.contiguous(memory_format=fmt)


def _launch_forward(x, weight, bias, mean, var, residual, eps, act, training):
    op = "bn_act"
    x, fmt = _check_x(op, x)
    code = _common.act_code(op, act)
    C = x.shape[1]
    weight = _check_vec(op, "weight", weight, C, x.device)
    bias = _check_vec(op, "bias", bias, C, x.device)
    mean = _check_vec(op, "mean", mean, C, x.device, required=not training) if not training else None
    var = _check_vec(op, "var", var, C, x.device, required=not training) if not training else None
    residual = _check_like_x(op, "residual", residual, x, fmt)
    out = torch.empty_like(x, memory_format=fmt)
    g = _Geometry(x)
    f32 = dict(dtype=torch.float32, device=x.device)
    if training:
        save_mean = torch.empty((C,), **f32)
        save_var = torch.empty((C,), **f32)
        if g.M == 0:
            return out, save_mean.fill_(float("nan")), save_var.fill_(float("nan"))
        s, ups = g.splits()
        part = torch.empty((s, 3, C), **f32)
        _bn_stats_kernel[(g.cblocks, s)](x, part, C, g.npb, g.hwv, g.units, ups,
                                         CL=g.cl, BLOCK_M=g.bm, BLOCK_C=g.bc, num_warps=4)
        cbc = min(1024, triton.next_power_of_2(C))
        _bn_stats_combine_kernel[(triton.cdiv(C, cbc),)](part, save_mean, save_var, C, s, BLOCK_C=cbc,
                                                         num_warps=4)
    else:
        save_mean, save_var = mean.clone(), var.clone()
    if g.M == 0 or C == 0:
        return out, save_mean, save_var
    dummy = save_mean
    _bn_fwd_kernel[(g.units, g.cblocks)](
        x, weight if weight is not None else dummy, bias if bias is not None else dummy, save_mean, save_var,
        residual if residual is not None else x, out, C, g.npb, g.hwv, float(eps),
        HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, ACT=code,
        CL=g.cl, BLOCK_M=g.bm, BLOCK_C=g.bc, num_warps=4)
    return out, save_mean, save_var


def _launch_backward(grad_out, x, weight, bias, save_mean, save_var, residual, eps, act, training):
    op = "bn_act_backward"
    x, fmt = _check_x(op, x)
    code = _common.act_code(op, act)
    C = x.shape[1]
    weight = _check_vec(op, "weight", weight, C, x.device)
    bias = _check_vec(op, "bias", bias, C, x.device)
    save_mean = _check_vec(op, "save_mean", save_mean, C, x.device, required=True)
    save_var = _check_vec(op, "save_var", save_var, C, x.device, required=True)
    residual = _check_like_x(op, "residual", residual, x, fmt)
    go = _check_like_x(op, "grad_out", grad_out, x, fmt)
    f32 = dict(dtype=torch.float32, device=x.device)
    gx = torch.empty_like(x, memory_format=fmt)
    gw = torch.empty((C,), **f32)
    gb = torch.empty((C,), **f32)
    gr = torch.empty_like(x, memory_format=fmt) if residual is not None else torch.empty((0,), dtype=x.dtype,
                                                                                          device=x.device)
    g = _Geometry(x)
    if g.M == 0 or C == 0:
        return gx, gw.zero_(), gb.zero_(), gr
    s, ups = g.splits()
    part = torch.empty((s, 2, C), **f32)
    dummy = save_mean
    ptrs = (go, x, weight if weight is not None else dummy, bias if bias is not None else dummy, save_mean,
            save_var, residual if residual is not None else x)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, HAS_RES=residual is not None, ACT=code,
                 CL=g.cl, BLOCK_M=g.bm, BLOCK_C=g.bc, num_warps=4)
    _bn_bwd_reduce_kernel[(g.cblocks, s)](*ptrs, part, C, g.npb, g.hwv, g.units, ups, float(eps), **flags)
    cbc = min(1024, triton.next_power_of_2(C))
    _bn_bwd_combine_kernel[(triton.cdiv(C, cbc),)](part, gb, gw, C, s, BLOCK_C=cbc, num_warps=4)
    _bn_bwd_kernel[(g.units, g.cblocks)](*ptrs, gb, gw, gx, gr if residual is not None else gx,
                                         C, g.npb, g.hwv, 1.0 / g.M, float(eps), TRAINING=bool(training), **flags)
    return gx, gw, gb, gr


@torch.library.custom_op("fastops::bn_act_triton", mutates_args=())
def bn_act_triton(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                  mean: Optional[torch.Tensor], var: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                  eps: float, act: str, training: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_forward(x, weight, bias, mean, var, residual, eps, act, training)


@torch.library.custom_op("fastops::bn_act_backward_triton", mutates_args=())
def bn_act_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor],
                           bias: Optional[torch.Tensor], save_mean: torch.Tensor, save_var: torch.Tensor,
                           residual: Optional[torch.Tensor], eps: float, act: str, training: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_backward(grad_out, x, weight, bias, save_mean, save_var, residual, eps, act, training)


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for the variants the launchers request (both layouts at ResNet /
    MobileNet channel counts, an odd C; every activation once; weight / bias / residual or not; training and
    eval backward), x-shaped tensors of element type `dtype`; tests compile each ahead of time for sm_80 /
    sm_90."""
    fp32 = "*fp32"
    elt = "*" + dtype
    vec = {"w_ptr": fp32, "b_ptr": fp32, "mean_ptr": fp32, "var_ptr": fp32, "part_ptr": fp32, "gb_ptr": fp32,
           "gw_ptr": fp32}
    specs = []
    # (channels_last, C, H * W, act, residual)
    for cl, C, hw, act, res in ((True, 64, 56 * 56, 1, True), (False, 64, 56 * 56, 3, False),
                                (True, 37, 29 * 17, 4, True), (False, 2048, 49, 5, True), (True, 2048, 49, 2, False),
                                (False, 37, 29 * 17, 0, False)):
        bm, bc = _blocks(cl, C, hw)
        blocks = {"CL": cl, "BLOCK_M": bm, "BLOCK_C": bc}
        fl = {"HAS_W": True, "HAS_B": True, "HAS_RES": res, "ACT": act}
        specs.append((_bn_stats_kernel, blocks))
        specs.append((_bn_fwd_kernel, {**fl, **blocks}))
        specs.append((_bn_bwd_reduce_kernel, {**fl, **blocks}))
        specs.append((_bn_bwd_kernel, {**fl, "TRAINING": C != 2048, **blocks}))
    bm, bc = _blocks(True, 64, 56 * 56)
    specs.append((_bn_fwd_kernel, {"HAS_W": False, "HAS_B": False, "HAS_RES": False, "ACT": 0, "CL": True,
                                   "BLOCK_M": bm, "BLOCK_C": bc}))
    specs.append((_bn_stats_combine_kernel, {"BLOCK_C": 1024}))
    specs.append((_bn_bwd_combine_kernel, {"BLOCK_C": 1024}))
    out = []
    for kernel, constexprs in specs:
        (k, sig, ce), = _common.aot_signatures([(kernel, constexprs)], lambda name: vec.get(name, elt))
        for name in ("eps", "inv_m"):
            if name in sig:
                sig[name] = "fp32"
        if (k, sig, ce) not in out:
            out.append((k, sig, ce))
    return out
