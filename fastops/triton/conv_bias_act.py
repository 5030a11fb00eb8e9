"""conv2d + bias + residual + activation in Triton (groups = 1 as an implicit GEMM, depthwise through the
depthwise kernels): forward and backward kernels + launchers.

Dense (groups = 1) forward, _cba_fwd_kernel: a GEMM with M = N * OH * OW output pixels, N = C_out, K =
C_in * kh * kw, walked tap by tap and in BLOCK_K chunks of input channels. A rows are gathered from x in place
(NCHW or channels_last, the CL constexpr), padding / stride / dilation by masks; B is wt = weight permuted to
(kh, kw, C_in, C_out), a small copy made once per call so every chunk reads contiguous output-channel runs. The
epilogue adds bias (fp32) and residual, applies the activation in fp32, and rounds once at the single store.

Backward:
  z (only silu / gelu / hardswish, whose derivative needs the pre-activation) is recomputed by the forward
  kernel with no activation into an fp32 buffer.
  _cba_dz_kernel: per (channel block, split of the pixel units): dz = grad_out * act'(from out or z) stored
                  in fp32 (channels_last order, an (M, C_out) matrix, for the dense GEMMs; out's layout for
                  the depthwise kernels), grad_residual = dz in x's dtype, and the split's column sums of dz;
                  _cba_sum_splits_kernel adds the splits in a fixed order -> grad_bias (deterministic).
  _cba_wgrad_kernel: per (C_out block, tap * C_in block, split of M): grad_weight = dz^T . A over the split's
                  output pixels; more than one split writes fp32 partials that _cba_sum_splits_kernel adds in
                  order (no float atomics).
  _cba_xgrad_kernel: per (block of input pixels, C_in block): the transposed conv as an implicit GEMM, dz rows
                  gathered for every tap whose (ih + pad - kh dil) divides by the stride and lands inside the
                  output; B = weight permuted to (kh, kw, C_out, C_in). Every input pixel is written once.
Depthwise (groups = C_in = C_out): fastops/triton/depthwise_conv2d.py's forward kernel with this epilogue,
and its backward kernels applied to dz.

Offsets are int64; accumulation fp32. fp16 / bf16 operands go to tl.dot as they are (dz is rounded to x's
dtype for the two backward GEMMs), fp32 ones with the 3-pass tf32 split (fp32-level error on tensor cores);
under the interpreter every dot operand is cast to fp32 first, since its low-precision dot is not reliable.

Exposed as the opaque custom ops ``fastops::conv_bias_act_triton`` and ``fastops::conv_bias_act_backward_triton``
(same arguments and results as ``fastops::conv_bias_act`` / ``fastops::conv_bias_act_backward``; fake kernels
and autograd are registered by the Python front).
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .._layout import is_channels_last
from . import _common
from . import depthwise_conv2d as _dw
from ._common import act_bwd, act_bwd_from_output, act_fwd

# Grid axis 1 of the GEMM kernels holds taps * input-channel blocks (at most 65535 programs).
MAX_GRID_Y = 65535
# Programs the split reductions aim for on a GPU; the interpreter runs programs one by one, so there only a
# few splits (still exercising the combine) are used.
GPU_TARGET_PROGRAMS = 1024
INTERP_MAX_SPLITS = 2
# The forward / grad_x GEMMs' grid size below which their row blocks shrink (about one program per SM).
FWD_TARGET_PROGRAMS = 128
# Pixel indices (not element offsets) are int32.
MAX_PIXELS = 1 << 31
# Cap on the fp32 grad_weight partials (elements).
MAX_PARTIAL_ELEMS = 1 << 26


@triton.jit
def _cba_fwd_kernel(
    x_ptr, wt_ptr, b_ptr, r_ptr, y_ptr,
    M, CIN, H, W, COUT, OH, OW, KH, KW,
    SH, SW, PT, PL, DH, DW,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, CL: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # pixel indices in int32 (the launcher checks M, N * H * W < 2^31), element offsets in int64
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    ohw = OH * OW
    n = m // ohw
    p = m - n * ohw
    oh = p // OW
    ow = p - oh * OW
    n64 = n.to(tl.int64)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < COUT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for t in range(KH * KW):
        kh = t // KW
        kw = t - kh * KW
        ih = oh * SH - PT + kh * DH
        iw = ow * SW - PL + kw * DW
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if CL:
            arow = ((n64 * H + ih) * W + iw) * CIN
        else:
            arow = n64 * CIN * H * W + (ih * W + iw)
        for c0 in range(0, CIN, BLOCK_K):
            ci = c0 + tl.arange(0, BLOCK_K)
            ci_ok = ci < CIN
            if CL:
                acol = ci.to(tl.int64)
            else:
                acol = ci.to(tl.int64) * H * W
            a = tl.load(x_ptr + arow[:, None] + acol[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
            b = tl.load(wt_ptr + ((t * CIN + ci).to(tl.int64) * COUT)[:, None] + co[None, :],
                        mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
            if DOT_F32:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += tl.dot(a, b, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    if CL:
        off = (m.to(tl.int64) * COUT)[:, None] + co[None, :]
    else:
        off = (n64 * COUT * ohw + p)[:, None] + (co.to(tl.int64) * ohw)[None, :]
    mask = m_ok[:, None] & co_ok[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + off, act_fwd(acc, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cba_rows(n, p, HWV, C, CL: tl.constexpr):
    if CL:
        row = (n * HWV + p) * C
    else:
        row = n * C * HWV + p
    return row


@triton.jit
def _cba_cols(c, HWV, CL: tl.constexpr):
    if CL:
        col = c.to(tl.int64)
    else:
        col = c.to(tl.int64) * HWV
    return col


@triton.jit
def _cba_dz_kernel(
    go_ptr, src_ptr, dz_ptr, gr_ptr, part_ptr,
    C, NPB, HWV, UNITS, UPS,
    FROM_OUT: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
    IN_CL: tl.constexpr, DZ_CL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # A unit is BLOCK_M consecutive pixels of one image (n is 0 and HWV = M when everything is channels_last).
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    col_in = _cba_cols(c, HWV, IN_CL)
    col_dz = _cba_cols(c, HWV, DZ_CL)
    s = tl.program_id(1)
    acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
    j0 = s * UPS
    j1 = tl.minimum(j0 + UPS, UNITS)
    for j in range(j0, j1):
        n = (j // NPB).to(tl.int64)
        p = (j - (j // NPB) * NPB) * BLOCK_M + tl.arange(0, BLOCK_M)
        m = (p < HWV)[:, None] & c_ok[None, :]
        off = _cba_rows(n, p, HWV, C, IN_CL)[:, None] + col_in[None, :]
        dz = tl.load(go_ptr + off, mask=m, other=0.0).to(tl.float32)
        if ACT != 0:
            v = tl.load(src_ptr + off, mask=m, other=0.0).to(tl.float32)
            if FROM_OUT:
                dz = dz * act_bwd_from_output(v, ACT)
            else:
                dz = dz * act_bwd(v, ACT)
        dz = tl.where(m, dz, 0.0)
        tl.store(dz_ptr + _cba_rows(n, p, HWV, C, DZ_CL)[:, None] + col_dz[None, :], dz, mask=m)
        if HAS_RES:
            tl.store(gr_ptr + off, dz.to(gr_ptr.dtype.element_ty), mask=m)
        acc += dz
    tl.store(part_ptr + s.to(tl.int64) * C + c, tl.sum(acc, axis=0), mask=c_ok)


@triton.jit
def _cba_sum_splits_kernel(src_ptr, dst_ptr, S, L, BLOCK: tl.constexpr):
    # dst[i] = sum_s src[s, i], splits in order (deterministic)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(S):
        acc += tl.load(src_ptr + s * L + i, mask=ok, other=0.0)
    tl.store(dst_ptr + i, acc.to(dst_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cba_wgrad_kernel(
    x_ptr, dz_ptr, gw_ptr,
    M, CIN, H, W, COUT, OH, OW, KH, KW,
    SH, SW, PT, PL, DH, DW,
    NCIB, MPS,
    CL: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    co_ok = co < COUT
    pid1 = tl.program_id(1)
    t = pid1 // NCIB
    ci = (pid1 - t * NCIB) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < CIN
    kh = t // KW
    kw = t - kh * KW
    if CL:
        acol = ci.to(tl.int64)
    else:
        acol = ci.to(tl.int64) * H * W
    s = tl.program_id(2)
    m_start = s * MPS
    m_end = tl.minimum(m_start + MPS, M)
    ohw = OH * OW
    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=tl.float32)
    for m0 in range(0, MPS, BLOCK_M):
        m = m_start + m0 + tl.arange(0, BLOCK_M)
        m_ok = m < m_end
        n = m // ohw
        p = m - n * ohw
        oh = p // OW
        ow = p - oh * OW
        ih = oh * SH - PT + kh * DH
        iw = ow * SW - PL + kw * DW
        ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        if CL:
            arow = ((n.to(tl.int64) * H + ih) * W + iw) * CIN
        else:
            arow = n.to(tl.int64) * CIN * H * W + (ih * W + iw)
        a = tl.load(x_ptr + arow[:, None] + acol[None, :], mask=ok[:, None] & ci_ok[None, :], other=0.0)
        g = tl.load(dz_ptr + (m.to(tl.int64) * COUT)[:, None] + co[None, :], mask=m_ok[:, None] & co_ok[None, :],
                    other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
        else:
            g = g.to(a.dtype)
        acc += tl.dot(tl.trans(g), a, input_precision=DOT_PREC)
    kk = KH * KW
    off = s.to(tl.int64) * COUT * CIN * kk + (co.to(tl.int64)[:, None] * CIN + ci[None, :]) * kk + t
    tl.store(gw_ptr + off, acc.to(gw_ptr.dtype.element_ty), mask=co_ok[:, None] & ci_ok[None, :])


@triton.jit
def _cba_xgrad_kernel(
    dz_ptr, wt_ptr, gx_ptr,
    NX, CIN, H, W, COUT, OH, OW, KH, KW,
    SH, SW, PT, PL, DH, DW,
    CL: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
):
    q = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    q_ok = q < NX
    hw = H * W
    n = q // hw
    r = q - n * hw
    ih = r // W
    iw = r - ih * W
    ci = tl.program_id(1) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    ci_ok = ci < CIN
    acc = tl.zeros((BLOCK_M, BLOCK_CI), dtype=tl.float32)
    for t in range(KH * KW):
        kh = t // KW
        kw = t - kh * KW
        th = ih + PT - kh * DH
        tw = iw + PL - kw * DW
        oh = th // SH
        ow = tw // SW
        ok = q_ok & (th >= 0) & (tw >= 0) & (oh * SH == th) & (ow * SW == tw) & (oh < OH) & (ow < OW)
        drow = ((n.to(tl.int64) * OH + oh) * OW + ow) * COUT
        for c0 in range(0, COUT, BLOCK_CO):
            co = c0 + tl.arange(0, BLOCK_CO)
            co_ok = co < COUT
            g = tl.load(dz_ptr + drow[:, None] + co[None, :], mask=ok[:, None] & co_ok[None, :], other=0.0)
            b = tl.load(wt_ptr + ((t * COUT + co).to(tl.int64) * CIN)[:, None] + ci[None, :],
                        mask=co_ok[:, None] & ci_ok[None, :], other=0.0)
            if DOT_F32:
                b = b.to(tl.float32)
            else:
                g = g.to(b.dtype)
            acc += tl.dot(g, b, input_precision=DOT_PREC)
    if CL:
        off = (q.to(tl.int64) * CIN)[:, None] + ci[None, :]
    else:
        off = (n.to(tl.int64) * CIN * hw + r)[:, None] + (ci.to(tl.int64) * hw)[None, :]
    tl.store(gx_ptr + off, acc.to(gx_ptr.dtype.element_ty), mask=q_ok[:, None] & ci_ok[None, :])


# Host side ---------------------------------------------------------------------------------------

_interpreting = _common.interpreting


_dot_precision = _common.dot_precision


def _p2(v: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, triton.next_power_of_2(max(int(v), 1))))


def _rows_block(rows: Optional[int], col_blocks: int) -> int:
    """BLOCK_M of a GEMM over `rows` output rows: 64, halved (down to 16) while the grid has fewer than
    FWD_TARGET_PROGRAMS programs, as late ResNet stages at small batch (M = N * 7 * 7) would leave most SMs
    idle."""
    bm = 64
    while rows is not None and bm > 16 and triton.cdiv(rows, bm) * col_blocks < FWD_TARGET_PROGRAMS:
        bm //= 2
    return bm


def _fwd_blocks(cin: int, cout: int, dtype: torch.dtype, rows: Optional[int] = None) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K): tl.dot wants every dim >= 16; fp32's 3-pass tf32 operands take ~3x the
    shared memory of fp16 ones, so its tiles are smaller."""
    f32 = dtype == torch.float32
    bn = _p2(cout, 16, 64 if f32 else 128)
    return _rows_block(rows, triton.cdiv(cout, bn)), bn, _p2(cin, 16, 32 if f32 else 64)


def _wgrad_blocks(cin: int, cout: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_CO, BLOCK_CI); BLOCK_M is the dot's K."""
    return (32 if dtype == torch.float32 else 64), _p2(cout, 16, 64), _p2(cin, 16, 64)


def _xgrad_blocks(cin: int, cout: int, dtype: torch.dtype, rows: Optional[int] = None) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_CI, BLOCK_CO); BLOCK_CO is the dot's K."""
    bci = _p2(cin, 16, 64)
    return _rows_block(rows, triton.cdiv(cin, bci)), bci, _p2(cout, 16, 32 if dtype == torch.float32 else 64)


def _is_depthwise(cin: int, cout: int, groups: int) -> bool:
    return groups > 1 and groups == cin == cout


def limit_reason(dtype: torch.dtype, in_channels: int, out_channels: int, groups: int,
                 kh: Optional[int] = None, kw: Optional[int] = None) -> Optional[str]:
    """Why these kernels cannot run this convolution (x of dtype, C_in = in_channels, C_out = out_channels,
    groups, optionally the kernel's kh, kw), or None."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the triton backend takes float16, bfloat16 or float32, got {dtype}"
    if groups != 1 and not _is_depthwise(in_channels, out_channels, groups):
        return (f"the triton backend takes groups = 1 or depthwise (groups = C_in = C_out), got groups={groups} "
                f"with C_in={in_channels}, C_out={out_channels}")
    if groups == 1 and kh is not None and kw is not None:
        _, _, bci = _wgrad_blocks(in_channels, out_channels, dtype)
        if int(kh) * int(kw) * triton.cdiv(in_channels, bci) > MAX_GRID_Y:
            return (f"the triton backend takes kh * kw * ceil(C_in / {bci}) <= {MAX_GRID_Y}, got kernel "
                    f"{kh}x{kw} with C_in={in_channels}")
    return None


def _fail(op, msg):
    raise ValueError(f"fastops.{op}: {msg}")


class _Conv:
    """Checked geometry of one call; tensors made contiguous in the layouts the kernels read."""

    def __init__(self, op, x, weight, bias, residual, stride, padding, dilation, groups, act):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            _fail(op, "x must be a 4-D (N, C_in, H, W) tensor")
        if not x.is_cuda and not _interpreting():
            raise RuntimeError(f"fastops.{op}: the triton backend needs CUDA tensors "
                               f"(or TRITON_INTERPRET=1 for CPU tensors), got x on {x.device}")
        if not isinstance(weight, torch.Tensor) or weight.dim() != 4 or weight.dtype != x.dtype \
                or weight.device != x.device:
            got = (tuple(weight.shape), weight.dtype, weight.device) if isinstance(weight, torch.Tensor) \
                else type(weight).__name__
            _fail(op, f"weight must be a 4-D (C_out, C_in / groups, kh, kw) {x.dtype} tensor on {x.device}, "
                      f"got {got}")
        if len(stride) != 2 or len(padding) != 4 or len(dilation) != 2:
            _fail(op, f"stride, padding, dilation must have 2, 4, 2 entries, got {list(stride)}, "
                      f"{list(padding)}, {list(dilation)}")
        if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
            _fail(op, f"stride and dilation must be >= 1 and padding >= 0, got {list(stride)}, "
                      f"{list(dilation)}, {list(padding)}")
        N, cin, H, W = x.shape
        cout, cpg, kh, kw = weight.shape
        if cin < 1 or kh < 1 or kw < 1:
            _fail(op, f"x must have C_in >= 1 and weight a non-empty kernel, got x {tuple(x.shape)}, "
                      f"weight {tuple(weight.shape)}")
        if groups < 1 or cin % groups or cout % groups or cpg * groups != cin:
            _fail(op, f"weight {tuple(weight.shape)} does not fit x with C_in={cin} and groups={groups}")
        why = limit_reason(x.dtype, cin, cout, groups, kh, kw)
        if why is not None:
            _fail(op, why)
        self.code = _common.act_code(op, act)
        self.act = act
        self.cl = is_channels_last(x)
        self.fmt = torch.channels_last if self.cl else torch.contiguous_format
        self.x = x.contiguous(memory_format=self.fmt)
        self.N, self.cin, self.H, self.W = N, cin, H, W
        self.cout, self.kh, self.kw = cout, kh, kw
        self.stride = [int(s) for s in stride]
        self.padding = [int(p) for p in padding]
        self.dilation = [int(d) for d in dilation]
        self.dw = _is_depthwise(cin, cout, groups)
        top, left, bottom, right = self.padding
        self.OH = (H + top + bottom - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        self.OW = (W + left + right - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if self.OH < 0 or self.OW < 0:
            _fail(op, f"the kernel {kh}x{kw} (dilation {self.dilation}) is larger than the padded input")
        self.out_shape = (N, cout, self.OH, self.OW)
        self.M = N * self.OH * self.OW
        if max(self.M, N * H * W) >= MAX_PIXELS:
            _fail(op, f"the triton backend indexes pixels in int32: N * H * W and N * OH * OW must be < "
                      f"{MAX_PIXELS}, got {N * H * W} and {self.M}")
        self.weight = weight.contiguous()
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (cout,) or bias.dtype != torch.float32 \
                    or bias.device != x.device:
                got = (tuple(bias.shape), bias.dtype, bias.device) if isinstance(bias, torch.Tensor) \
                    else type(bias).__name__
                _fail(op, f"bias must be a float32 tensor of shape ({cout},) on {x.device}, got {got}")
            bias = bias.contiguous()
        self.bias = bias
        self.residual = self.like_out(op, "residual", residual)

    def like_out(self, op, name, t):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != self.out_shape or t.dtype != self.x.dtype \
                or t.device != self.x.device:
            got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
            _fail(op, f"{name} must be a {self.x.dtype} tensor of shape {self.out_shape} on {self.x.device}, "
                      f"got {got}")
        return t.contiguous(memory_format=self.fmt)

    def geom(self):
        return (self.stride[0], self.stride[1], self.padding[0], self.padding[1], self.dilation[0], self.dilation[1])

    def empty_out(self, dtype=None):
        return torch.empty(self.out_shape, dtype=dtype or self.x.dtype, device=self.x.device,
                           memory_format=self.fmt)

    def forward_into(self, y, act_code, residual):
        """y = act(conv + bias + residual) (y may be an fp32 buffer)."""
        x, bias = self.x, self.bias
        if self.dw:
            bp, bc = _dw._tiles(self.cl, self.cin)
            grid = (self.N * triton.cdiv(self.OH * self.OW, bp), triton.cdiv(self.cin, bc))
            _dw._dw_fwd_kernel[grid](
                x, self.weight, bias if bias is not None else self.weight,
                residual if residual is not None else y, y,
                self.cin, self.H, self.W, self.OH, self.OW, self.kh, self.kw, *self.geom(),
                *x.stride(), *y.stride(),
                HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act_code, BLOCK_P=bp, BLOCK_C=bc)
            return y
        wt = self.weight.permute(2, 3, 1, 0).contiguous()
        bm, bn, bk = _fwd_blocks(self.cin, self.cout, x.dtype, self.M)
        _cba_fwd_kernel[(triton.cdiv(self.M, bm), triton.cdiv(self.cout, bn))](
            x, wt, bias if bias is not None else wt, residual if residual is not None else y, y,
            self.M, self.cin, self.H, self.W, self.cout, self.OH, self.OW, self.kh, self.kw, *self.geom(),
            HAS_BIAS=bias is not None, HAS_RES=residual is not None, ACT=act_code, CL=self.cl,
            DOT_F32=_interpreting(), DOT_PREC=_dot_precision(x.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
            num_warps=4)
        return y


def _splits(units: int, programs_per_split: int) -> int:
    want = INTERP_MAX_SPLITS if _interpreting() else max(1, GPU_TARGET_PROGRAMS // max(1, programs_per_split))
    return max(1, min(units, want))


def _sum_splits(src, s, length, dst):
    block = min(1024, triton.next_power_of_2(max(length, 1)))
    _cba_sum_splits_kernel[(triton.cdiv(length, block),)](src, dst, s, length, BLOCK=block, num_warps=4)
    return dst


def _launch_forward(x, weight, bias, residual, stride, padding, dilation, groups, act):
    g = _Conv("conv_bias_act", x, weight, bias, residual, stride, padding, dilation, groups, act)
    y = g.empty_out()
    if y.numel() == 0:
        return y
    return g.forward_into(y, g.code, g.residual)


def _launch_backward(grad_out, x, weight, bias, residual, out, stride, padding, dilation, groups, act):
    op = "conv_bias_act_backward"
    g = _Conv(op, x, weight, bias, residual, stride, padding, dilation, groups, act)
    go = g.like_out(op, "grad_out", grad_out)
    out = g.like_out(op, "out", out)
    dev, dt = g.x.device, g.x.dtype
    f32 = dict(dtype=torch.float32, device=dev)
    gx = torch.empty_like(g.x, memory_format=g.fmt)
    gw = torch.empty_like(g.weight)
    gb = torch.empty((g.cout,) if bias is not None else (0,), **f32)
    gr = g.empty_out() if residual is not None else torch.empty((0,), dtype=dt, device=dev)
    if g.M == 0 or g.cout == 0:
        return gx.zero_(), gw.zero_(), gb.zero_(), gr
    # dz = grad_out * act'(.)
    from_out = _common.act_grad_from_output(act)
    if from_out:
        src = out
    else:
        src = g.forward_into(g.empty_out(torch.float32), 0, g.residual)
    dz_cl = g.cl or not g.dw  # the dense GEMMs read dz as an (M, C_out) matrix
    dz = torch.empty(g.out_shape, memory_format=torch.channels_last if dz_cl else torch.contiguous_format, **f32)
    ohw = g.OH * g.OW
    C = g.cout
    if g.cl:
        bc = _p2(C, 1, 64)
        bm = _p2(2048 // bc, 16, 128)
        hwv = g.M
        npb = triton.cdiv(hwv, bm)
        units = npb
    else:
        bm = _p2(ohw, 16, 128)
        bc = _p2(C, 1, max(1, 2048 // bm)) if not dz_cl else _p2(C, 1, 32)
        hwv = ohw
        npb = triton.cdiv(hwv, bm)
        units = g.N * npb
    cblocks = triton.cdiv(C, bc)
    s = _splits(units, cblocks)
    ups = triton.cdiv(units, s)
    s = triton.cdiv(units, ups)
    part = torch.empty((s, C), **f32)
    _cba_dz_kernel[(cblocks, s)](
        go, src if g.code != 0 else go, dz, gr if residual is not None else dz, part,
        C, npb, hwv, units, ups,
        FROM_OUT=from_out, ACT=g.code, HAS_RES=residual is not None, IN_CL=g.cl, DZ_CL=dz_cl,
        BLOCK_M=bm, BLOCK_C=bc, num_warps=4)
    if bias is not None:
        _sum_splits(part, s, C, gb)
    if g.dw:
        gi, gwd, _ = _dw._launch_backward(dz, g.x, g.weight, g.stride, g.padding, g.dilation)
        gx.copy_(gi)
        gw.copy_(gwd)
        return gx, gw, gb, gr
    common = dict(CL=g.cl, DOT_F32=_interpreting(), DOT_PREC=_dot_precision(dt), num_warps=4)
    geom = (g.cin, g.H, g.W, g.cout, g.OH, g.OW, g.kh, g.kw, *g.geom())
    # grad_weight
    bmw, bco, bci = _wgrad_blocks(g.cin, g.cout, dt)
    ncib = triton.cdiv(g.cin, bci)
    kk = g.kh * g.kw
    wgrid01 = triton.cdiv(g.cout, bco) * kk * ncib
    ws = _splits(triton.cdiv(g.M, bmw), wgrid01)
    ws = max(1, min(ws, MAX_PARTIAL_ELEMS // max(1, gw.numel())))
    mps = triton.cdiv(triton.cdiv(g.M, ws), bmw) * bmw
    ws = triton.cdiv(g.M, mps)
    wdst = gw if ws == 1 else torch.empty((ws,) + tuple(gw.shape), **f32)
    _cba_wgrad_kernel[(triton.cdiv(g.cout, bco), kk * ncib, ws)](
        g.x, dz, wdst, g.M, *geom, ncib, mps, BLOCK_M=bmw, BLOCK_CO=bco, BLOCK_CI=bci, **common)
    if ws > 1:
        _sum_splits(wdst, ws, gw.numel(), gw)
    # grad_x
    if gx.numel():
        wt = g.weight.permute(2, 3, 0, 1).contiguous()
        nx = g.N * g.H * g.W
        bmx, bcix, bcox = _xgrad_blocks(g.cin, g.cout, dt, nx)
        _cba_xgrad_kernel[(triton.cdiv(nx, bmx), triton.cdiv(g.cin, bcix))](
            dz, wt, gx, nx, *geom, BLOCK_M=bmx, BLOCK_CI=bcix, BLOCK_CO=bcox, **common)
    return gx, gw, gb, gr


@torch.library.custom_op("fastops::conv_bias_act_triton", mutates_args=())
def conv_bias_act_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         residual: Optional[torch.Tensor], stride: List[int], padding: List[int],
                         dilation: List[int], groups: int, act: str) -> torch.Tensor:
    with _common.device_guard(x):
        return _launch_forward(x, weight, bias, residual, stride, padding, dilation, groups, act)


@torch.library.custom_op("fastops::conv_bias_act_backward_triton", mutates_args=())
def conv_bias_act_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                                  bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                                  out: torch.Tensor, stride: List[int], padding: List[int], dilation: List[int],
                                  groups: int, act: str
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    with _common.device_guard(x):
        return _launch_backward(grad_out, x, weight, bias, residual, out, stride, padding, dilation, groups, act)


# The first AOT_VARIANTS_PER_DTYPE variants (the three GEMMs, whose tiles and dot precision depend on the
# dtype) are compiled for bf16 and fp32 too, the rest for fp16 only.
AOT_VARIANTS_PER_DTYPE = 3


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for the variants the launchers request: the three GEMMs on ResNet-50 /
    MobileNet channel counts (64 -> 64 channels_last, 256 -> 512 NCHW, the 3 -> 64 stem, odd 37 -> 5) with the
    epilogues (every activation once, bias / residual or not, the fp32 z recompute), the dz kernel for both
    act' sources and its three layout pairs; x-shaped tensors of element type `dtype`. Tests compile each ahead
    of time for sm_80 / sm_90 and check that the GEMMs use MMA."""
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    dot = {"DOT_F32": False, "DOT_PREC": "tf32x3" if dtype == "fp32" else "tf32"}
    fp32 = "*fp32"
    elt = "*" + dtype
    specs = []  # (kernel, constexprs, pointer types that differ from x's dtype)

    def gemms(cin, cout, cl):
        bm, bn, bk = _fwd_blocks(cin, cout, tdtype)
        bmw, bco, bci = _wgrad_blocks(cin, cout, tdtype)
        bmx, bcix, bcox = _xgrad_blocks(cin, cout, tdtype)
        fwd = {"CL": cl, **dot, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}
        wgrad = {"CL": cl, **dot, "BLOCK_M": bmw, "BLOCK_CO": bco, "BLOCK_CI": bci}
        xgrad = {"CL": cl, **dot, "BLOCK_M": bmx, "BLOCK_CI": bcix, "BLOCK_CO": bcox}
        return fwd, wgrad, xgrad

    fwd, wgrad, xgrad = gemms(64, 64, True)
    specs.append((_cba_fwd_kernel, {"HAS_BIAS": True, "HAS_RES": True, "ACT": 1, **fwd}, {"b_ptr": fp32}))
    specs.append((_cba_wgrad_kernel, wgrad, {"dz_ptr": fp32}))
    specs.append((_cba_xgrad_kernel, xgrad, {"dz_ptr": fp32}))
    specs.append((_cba_fwd_kernel, {"HAS_BIAS": False, "HAS_RES": False, "ACT": 4, **fwd}, {}))
    specs.append((_cba_fwd_kernel, {"HAS_BIAS": True, "HAS_RES": True, "ACT": 0, **fwd},
                  {"b_ptr": fp32, "y_ptr": fp32}))  # z recompute
    fwd, wgrad, xgrad = gemms(256, 512, False)
    specs.append((_cba_fwd_kernel, {"HAS_BIAS": True, "HAS_RES": False, "ACT": 1, **fwd}, {"b_ptr": fp32}))
    for rows in (2 * 7 * 7, 32 * 7 * 7):  # ResNet-50 layer 4 at batch 2 and 32: smaller row blocks
        bm, bn, bk = _fwd_blocks(512, 512, tdtype, rows)
        specs.append((_cba_fwd_kernel, {"HAS_BIAS": True, "HAS_RES": True, "ACT": 1, "CL": True, **dot,
                                        "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, {"b_ptr": fp32}))
        bm, bci, bco = _xgrad_blocks(512, 512, tdtype, rows)
        specs.append((_cba_xgrad_kernel, {"CL": True, **dot, "BLOCK_M": bm, "BLOCK_CI": bci, "BLOCK_CO": bco},
                      {"dz_ptr": fp32}))
    specs.append((_cba_wgrad_kernel, wgrad, {"dz_ptr": fp32, "gw_ptr": fp32}))  # split partials
    specs.append((_cba_xgrad_kernel, xgrad, {"dz_ptr": fp32}))
    fwd, wgrad, xgrad = gemms(3, 64, True)
    specs.append((_cba_fwd_kernel, {"HAS_BIAS": True, "HAS_RES": False, "ACT": 5, **fwd}, {"b_ptr": fp32}))
    fwd, wgrad, xgrad = gemms(37, 5, False)
    specs.append((_cba_fwd_kernel, {"HAS_BIAS": True, "HAS_RES": True, "ACT": 3, **fwd}, {"b_ptr": fp32}))
    specs.append((_cba_xgrad_kernel, xgrad, {"dz_ptr": fp32}))
    # dz: (IN_CL, DZ_CL) = all channels_last, NCHW -> (M, C) for the dense GEMMs, NCHW depthwise
    for in_cl, dz_cl, bm, bc, act, has_res in ((True, True, 32, 64, 1, True), (True, True, 32, 64, 3, False),
                                               (False, True, 128, 32, 2, False), (False, True, 128, 32, 4, True),
                                               (False, False, 128, 16, 5, True), (False, False, 128, 16, 0, False)):
        from_out = act in (0, 1, 2)
        ptrs = {"dz_ptr": fp32, "part_ptr": fp32}
        if not from_out:
            ptrs["src_ptr"] = fp32
        specs.append((_cba_dz_kernel, {"FROM_OUT": from_out, "ACT": act, "HAS_RES": has_res, "IN_CL": in_cl,
                                       "DZ_CL": dz_cl, "BLOCK_M": bm, "BLOCK_C": bc}, ptrs))
    specs.append((_cba_sum_splits_kernel, {"BLOCK": 1024}, {"src_ptr": fp32, "dst_ptr": fp32}))
    specs.append((_cba_sum_splits_kernel, {"BLOCK": 1024}, {"src_ptr": fp32}))
    out = []
    for kernel, constexprs, ptrs in specs:
        (k, sig, ce), = _common.aot_signatures([(kernel, constexprs)], lambda name: ptrs.get(name, elt))
        if (k, sig, ce) not in out:
            out.append((k, sig, ce))
    return out
