"""PVT spatial-reduction attention in Triton: forward and backward kernels + launchers.

q (B, N, C) holds each token's heads side by side (head h at channels [h*hd, (h+1)*hd)); kv (B, Nr, 2C) holds
k at channels [h*hd, ...) and v at [C + h*hd, ...). Both are read in place through the head offset, and out /
grads are written the same way: no head-major copies.

Forward: one program per (batch * head, block of BLOCK_M query rows). It walks the keys in blocks of BLOCK_N
with the online softmax (running row max m and row sum l in fp32, base-2 exponentials of the scores scaled by
scale * log2(e)): s = q k^T, acc = acc * 2^(m_old - m) + 2^(s - m) v. For the PVT shapes (Nr = 49 .. 128) the
whole key set is one block, so that loop runs once: a single pass with a plain softmax. o = acc / l is stored
and lse = ln(sum_j exp(scale * q_i . k_j)) per row.

Backward recomputes p = exp(scale q k^T - lse), with D = rowsum(dO * O), dp = dO v^T, ds = p (dp - D):
  _sra_bwd_dq_kernel:   per (batch * head, query block), over every key block: dq = scale * ds k; it also
                        stores D for the second kernel (launched after it on the same stream).
  _sra_bwd_dkdv_kernel: per (batch * head, key block, query split): dv = p^T dO, dk = scale * ds^T q over the
                        split's query blocks. PVT has few keys (Nr = 49) and many queries (N up to 16384), so
                        one program per key block would leave the GPU nearly idle: the queries are split into
                        SPLITS ranges whose fp32 partial dk / dv go to a workspace that _sra_sum_splits_kernel
                        adds in a fixed order (deterministic, no atomics). With one split the kernel stores the
                        gradient directly.

Offsets are int64. fp16 / bf16 operands go to tl.dot as they are (fp32 accumulation), fp32 ones with the
3-pass tf32 split (see _dot_precision); under the interpreter every dot operand is cast to fp32 first, since its
low-precision dot is not reliable.

Exposed as the opaque custom ops ``fastops::sr_attention_triton`` and ``fastops::sr_attention_backward_triton``
(fake kernels and autograd: fastops/ops/sr_attention.py).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from . import _common

MAX_HEAD_DIM = {torch.float16: 256, torch.bfloat16: 256, torch.float32: 128}
# Programs the dk / dv pass aims for by splitting the queries (about two per SM on current GPUs), and the
# fewest query blocks per split (each split costs an fp32 copy of kv's size in the workspace).
TARGET_PROGRAMS = 256
MIN_BLOCKS_PER_SPLIT = 2


@triton.jit
def _sra_load_kv(kv_ptr, b, j, j_ok, ch, d_ok, NR, C, DOT_F32: tl.constexpr):
    m = j_ok[:, None] & d_ok[None, :]
    off = (b * NR + j)[:, None] * (2 * C) + ch[None, :]
    k = tl.load(kv_ptr + off, mask=m, other=0.0)
    v = tl.load(kv_ptr + off + C, mask=m, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _sra_query_block(N, C, NH, HD, NQB, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's (batch * head, query block): bh, batch b (int64), query rows i and their mask, the head's
    channels ch and their mask, and the (rows x channels) mask and offsets into q / out / grad_out."""
    pid = tl.program_id(0)
    bh = pid // NQB
    mb = pid - bh * NQB
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    i = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < N
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    ch = h * HD + d
    qm = i_ok[:, None] & d_ok[None, :]
    qoff = (b * N + i)[:, None] * C + ch[None, :]
    return bh, b, i, i_ok, ch, d_ok, qm, qoff


@triton.jit
def _sra_fwd_kernel(
    q_ptr, kv_ptr, out_ptr, lse_ptr,
    N, NR, C, NH, HD, NQB, scale,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, b, i, i_ok, ch, d_ok, qm, qoff = _sra_query_block(N, C, NH, HD, NQB, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + qoff, mask=qm, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    sl2 = scale * 1.4426950408889634
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, NR, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < NR
        k, v = _sra_load_kv(kv_ptr, b, j, j_ok, ch, d_ok, NR, C, DOT_F32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sl2
        # every block holds at least one real key (n0 < NR), so the row max below is finite
        s = tl.where(j_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(out_ptr + qoff, o.to(out_ptr.dtype.element_ty), mask=qm)
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(lse_ptr + bh.to(tl.int64) * N + i, lse, mask=i_ok)


@triton.jit
def _sra_bwd_dq_kernel(
    go_ptr, q_ptr, kv_ptr, out_ptr, lse_ptr, delta_ptr, gq_ptr,
    N, NR, C, NH, HD, NQB, scale,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh, b, i, i_ok, ch, d_ok, qm, qoff = _sra_query_block(N, C, NH, HD, NQB, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + qoff, mask=qm, other=0.0)
    do = tl.load(go_ptr + qoff, mask=qm, other=0.0)
    o = tl.load(out_ptr + qoff, mask=qm, other=0.0)
    Di = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    row = bh.to(tl.int64) * N + i
    tl.store(delta_ptr + row, Di, mask=i_ok)
    lse2 = tl.load(lse_ptr + row, mask=i_ok, other=0.0) * 1.4426950408889634
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    sl2 = scale * 1.4426950408889634
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, NR, BLOCK_N):
        j = n0 + tl.arange(0, BLOCK_N)
        j_ok = j < NR
        k, v = _sra_load_kv(kv_ptr, b, j, j_ok, ch, d_ok, NR, C, DOT_F32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sl2
        p = tl.where(j_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - Di[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(gq_ptr + qoff, (dq * scale).to(gq_ptr.dtype.element_ty), mask=qm)


@triton.jit
def _sra_bwd_dkdv_kernel(
    go_ptr, q_ptr, kv_ptr, lse_ptr, delta_ptr, gkv_ptr, part_ptr,
    N, NR, C, NH, HD, NKB, SPLITS, QB_PER_SPLIT, KV_NUMEL, scale,
    SPLIT: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    per_bh = NKB * SPLITS
    bh = pid // per_bh
    rem = pid - bh * per_bh
    split = rem // NKB
    nb = rem - split * NKB
    b = (bh // NH).to(tl.int64)
    h = bh % NH
    j = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < NR
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HD
    ch = h * HD + d
    k, v = _sra_load_kv(kv_ptr, b, j, j_ok, ch, d_ok, NR, C, DOT_F32)
    sl2 = scale * 1.4426950408889634
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    m_start = split * QB_PER_SPLIT * BLOCK_M
    m_end = tl.minimum(N, m_start + QB_PER_SPLIT * BLOCK_M)
    for m0 in range(m_start, m_end, BLOCK_M):
        i = m0 + tl.arange(0, BLOCK_M)
        i_ok = i < m_end
        qm = i_ok[:, None] & d_ok[None, :]
        qoff = (b * N + i)[:, None] * C + ch[None, :]
        q = tl.load(q_ptr + qoff, mask=qm, other=0.0)
        do = tl.load(go_ptr + qoff, mask=qm, other=0.0)
        row = bh.to(tl.int64) * N + i
        lse2 = tl.load(lse_ptr + row, mask=i_ok, other=0.0) * 1.4426950408889634
        Di = tl.load(delta_ptr + row, mask=i_ok, other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * sl2
        # padding keys (k = 0) would give exp(-lse), which may overflow: zero them with the padding rows
        p = tl.where(i_ok[:, None] & j_ok[None, :], tl.exp2(s - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - Di[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    dk = dk * scale
    km = j_ok[:, None] & d_ok[None, :]
    koff = (b * NR + j)[:, None] * (2 * C) + ch[None, :]
    if SPLIT:
        # workspace (SPLITS, B * Nr, 2C) fp32, in kv's layout
        base = part_ptr + split.to(tl.int64) * KV_NUMEL
        tl.store(base + koff, dk, mask=km)
        tl.store(base + koff + C, dv, mask=km)
    else:
        tl.store(gkv_ptr + koff, dk.to(gkv_ptr.dtype.element_ty), mask=km)
        tl.store(gkv_ptr + koff + C, dv.to(gkv_ptr.dtype.element_ty), mask=km)


@triton.jit
def _sra_sum_splits_kernel(part_ptr, gkv_ptr, TOTAL, SPLITS, BLOCK: tl.constexpr):
    # gkv = sum over the splits of the workspace, in split order (deterministic)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < TOTAL
    p = part_ptr + offs
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for _ in range(SPLITS):
        acc += tl.load(p, mask=ok, other=0.0)
        p += TOTAL
    tl.store(gkv_ptr + offs, acc.to(gkv_ptr.dtype.element_ty), mask=ok)


# Host side ---------------------------------------------------------------------------------------

_interpreting = _common.interpreting


_dot_precision = _common.dot_precision


def _block_d(hd: int) -> int:
    return max(16, triton.next_power_of_2(hd))


def _fwd_blocks(n: int, nr: int, hd: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) of the forward and the dq pass. tl.dot wants every dim >= 16. Up to 128 keys
    (64 in fp32, whose 3-pass tf32 operands take ~3x the shared memory) are one block: the short-KV single pass.
    Wider heads take smaller blocks so the fp32 accumulator and the pipelined K / V tiles stay within the
    registers of 4 warps and sm_80's 163 KB of shared memory."""
    bd = _block_d(hd)
    f32 = dtype == torch.float32
    if bd > 128 or (bd == 128 and f32):
        bm_cap, bn_cap = 32, 32
    elif bd == 128 or f32:
        bm_cap, bn_cap = 64, 64
    else:
        bm_cap, bn_cap = 64, 128
    return min(bm_cap, max(16, triton.next_power_of_2(n))), min(bn_cap, max(16, triton.next_power_of_2(nr))), bd


def _dkdv_blocks(n: int, nr: int, hd: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D) of the dk / dv pass: two BLOCK_N x BLOCK_D fp32 accumulators, the K / V
    block and the pipelined q / dO tiles per program."""
    bd = _block_d(hd)
    f32 = dtype == torch.float32
    if bd > 128:
        bm_cap, bn_cap = 16, 32
    elif bd == 128 and f32:
        bm_cap, bn_cap = 32, 32
    elif bd == 128 or f32:
        bm_cap, bn_cap = 32, 64
    else:
        bm_cap, bn_cap = 64, 64
    return min(bm_cap, max(16, triton.next_power_of_2(n))), min(bn_cap, max(16, triton.next_power_of_2(nr))), bd


def _splits(nqb: int, programs: int) -> Tuple[int, int]:
    """(splits, query blocks per split) so that programs * splits reaches TARGET_PROGRAMS where the query
    blocks allow; depends on the sizes only, so the summation order is fixed for given shapes."""
    want = max(1, min(nqb // MIN_BLOCKS_PER_SPLIT, -(-TARGET_PROGRAMS // max(1, programs))))
    per = -(-nqb // want)
    return -(-nqb // per), per


def limit_reason(dtype: torch.dtype, head_dim: int, nr: Optional[int] = None) -> Optional[str]:
    """Why these kernels cannot take heads of head_dim channels in dtype, or None (any N and Nr >= 1 work)."""
    cap = MAX_HEAD_DIM.get(dtype)
    if cap is None:
        return f"the triton backend takes float16, bfloat16 or float32, got {dtype}"
    if head_dim > cap:
        return (f"the triton backend takes head_dim <= {cap} in {dtype} (a query block's accumulator and a key "
                f"block stay on chip), got {head_dim}")
    return None


class _Geometry:
    def __init__(self, op, q, kv, num_heads):
        for name, t in (("q", q), ("kv", kv)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3:
                shape = "(B, N, C)" if name == "q" else "(B, Nr, 2*C)"
                raise ValueError(f"fastops.{op}: {name} must be a 3-D {shape} tensor")
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"fastops.{op}: the triton backend takes q in float16, bfloat16 or float32, "
                            f"got {q.dtype}")
        if kv.dtype != q.dtype:
            raise ValueError(f"fastops.{op}: kv must have q's dtype {q.dtype}, got {kv.dtype}")
        if not q.is_cuda and not _interpreting():
            raise RuntimeError(f"fastops.{op}: the triton backend needs CUDA tensors "
                               f"(or TRITON_INTERPRET=1 for CPU tensors), got q on {q.device}")
        if kv.device != q.device:
            raise ValueError(f"fastops.{op}: kv is on {kv.device} but q is on {q.device}")
        B, N, C = q.shape
        if not isinstance(num_heads, int) or num_heads < 1 or C % num_heads != 0 or C == 0:
            raise ValueError(f"fastops.{op}: num_heads must be a positive divisor of q.shape[-1] = {C}, "
                             f"got {num_heads}")
        if kv.shape[0] != B or kv.shape[2] != 2 * C:
            raise ValueError(f"fastops.{op}: kv must have shape (B, Nr, 2*C) = ({B}, Nr, {2 * C}) for q of shape "
                             f"{tuple(q.shape)}, got {tuple(kv.shape)}")
        if kv.shape[1] < 1:
            raise ValueError(f"fastops.{op}: kv must hold at least one token (Nr >= 1), got {tuple(kv.shape)}")
        hd = C // num_heads
        why = limit_reason(q.dtype, hd)
        if why is not None:
            raise ValueError(f"fastops.{op}: num_heads {num_heads}: {why}")
        self.B, self.N, self.C, self.nr, self.nh, self.hd = B, N, C, kv.shape[1], num_heads, hd


def _check_like(op, name, t, shape, dtype, device):
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtype or t.device != device:
        got = (tuple(t.shape), t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"fastops.{op}: {name} must be a {dtype} tensor of shape {shape} on {device}, got {got}")
    return t.contiguous()


def _launch_forward(q, kv, num_heads, scale):
    g = _Geometry("sr_attention", q, kv, num_heads)
    q, kv = q.contiguous(), kv.contiguous()
    out = torch.empty((g.B, g.N, g.C), dtype=q.dtype, device=q.device)
    lse = torch.empty((g.B, g.nh, g.N), dtype=torch.float32, device=q.device)
    if g.B * g.N == 0:
        return out, lse
    bm, bn, bd = _fwd_blocks(g.N, g.nr, g.hd, q.dtype)
    nqb = triton.cdiv(g.N, bm)
    _sra_fwd_kernel[(g.B * g.nh * nqb,)](
        q, kv, out, lse, g.N, g.nr, g.C, g.nh, g.hd, nqb, float(scale),
        DOT_F32=_interpreting(), DOT_PREC=_dot_precision(q.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
        num_warps=4)
    return out, lse


def _launch_backward(grad_out, q, kv, out, lse, num_heads, scale):
    op = "sr_attention_backward"
    g = _Geometry(op, q, kv, num_heads)
    q, kv = q.contiguous(), kv.contiguous()
    go = _check_like(op, "grad_out", grad_out, (g.B, g.N, g.C), q.dtype, q.device)
    out = _check_like(op, "out", out, (g.B, g.N, g.C), q.dtype, q.device)
    lse = _check_like(op, "lse", lse, (g.B, g.nh, g.N), torch.float32, q.device)
    gq = torch.empty_like(q)
    gkv = torch.empty_like(kv)
    if g.B == 0:
        return gq, gkv
    if g.N == 0:
        return gq, gkv.zero_()
    bh = g.B * g.nh
    f32 = dict(dtype=torch.float32, device=q.device)
    delta = torch.empty((g.B, g.nh, g.N), **f32)
    common = dict(DOT_F32=_interpreting(), DOT_PREC=_dot_precision(q.dtype), num_warps=4)
    bm, bn, bd = _fwd_blocks(g.N, g.nr, g.hd, q.dtype)
    nqb = triton.cdiv(g.N, bm)
    _sra_bwd_dq_kernel[(bh * nqb,)](
        go, q, kv, out, lse, delta, gq, g.N, g.nr, g.C, g.nh, g.hd, nqb, float(scale),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **common)
    bm, bn, bd = _dkdv_blocks(g.N, g.nr, g.hd, q.dtype)
    nkb = triton.cdiv(g.nr, bn)
    splits, per = _splits(triton.cdiv(g.N, bm), bh * nkb)
    part = torch.empty((splits, g.B, g.nr, 2 * g.C), **f32) if splits > 1 else delta
    _sra_bwd_dkdv_kernel[(bh * nkb * splits,)](
        go, q, kv, lse, delta, gkv, part, g.N, g.nr, g.C, g.nh, g.hd, nkb, splits, per, kv.numel(),
        float(scale),
        SPLIT=splits > 1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **common)
    if splits > 1:
        total = gkv.numel()
        block = 1024
        _sra_sum_splits_kernel[(triton.cdiv(total, block),)](part, gkv, total, splits, BLOCK=block, num_warps=4)
    return gq, gkv


@torch.library.custom_op("fastops::sr_attention_triton", mutates_args=())
def sr_attention_triton(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: float
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
    with _common.device_guard(q):
        return _launch_forward(q, kv, num_heads, scale)


@torch.library.custom_op("fastops::sr_attention_backward_triton", mutates_args=())
def sr_attention_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                                 lse: torch.Tensor, num_heads: int, scale: float
                                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    with _common.device_guard(q):
        return _launch_backward(grad_out, q, kv, out, lse, num_heads, scale)


# fp32 buffers (everything else pointer-typed is in q's dtype)
_FP32_PTRS = {"lse_ptr", "delta_ptr", "part_ptr"}


def aot_specs(dtype: str = "fp16"):
    """(kernel, signature, constexprs) for the variants the launchers request on the PVT shapes (head_dim 64,
    Nr = 49 as one key block, Nr = 256 streamed; head_dim 32; wide heads 128 / 256), with element type `dtype`
    for the q / kv-shaped tensors; tests compile each ahead of time for sm_80 / sm_90."""
    tdtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    common = {"DOT_F32": False, "DOT_PREC": "tf32x3" if dtype == "fp32" else "tf32"}
    # (N, Nr, head_dim, split): PVTv2-b2 stage 1 at 224^2 (a few programs: the queries are split), stage 1 at
    # 512^2, 4096 keys (enough key blocks to need no split), head_dim 32, wide heads
    cases = [(3136, 49, 64, True), (16384, 256, 64, True), (1000, 4096, 64, False), (3136, 49, 32, True),
             (49, 49, 128, True), (49, 49, 256, True)]
    specs = []
    for n, nr, hd, split in cases:  # forward / dq / dk-dv interleaved
        if limit_reason(tdtype, hd) is not None:
            continue
        bm, bn, bd = _fwd_blocks(n, nr, hd, tdtype)
        blocks = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd}
        specs.append((_sra_fwd_kernel, {**common, **blocks}))
        specs.append((_sra_bwd_dq_kernel, {**common, **blocks}))
        bm, bn, bd = _dkdv_blocks(n, nr, hd, tdtype)
        specs.append((_sra_bwd_dkdv_kernel, {"SPLIT": split, **common, "BLOCK_M": bm, "BLOCK_N": bn,
                                             "BLOCK_D": bd}))
    specs.append((_sra_sum_splits_kernel, {"BLOCK": 1024}))
    unique = []
    for kernel, constexprs in specs:
        if (kernel, constexprs) not in unique:
            unique.append((kernel, constexprs))
    out = _common.aot_signatures(unique, lambda name: "*fp32" if name in _FP32_PTRS else "*" + dtype)
    for _, sig, _ in out:
        if "scale" in sig:
            sig["scale"] = "fp32"
    return out
