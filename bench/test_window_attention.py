"""window_attention benchmark cases: the window attention of every Swin-T stage at 224x224, batch 8.

Swin-T (timm ``swin_tiny_patch4_window7_224``) runs window 7 (N = 49 tokens) and head_dim 32 in all four
stages; its blocks alternate W-MSA (even blocks, shift 0) and SW-MSA (odd blocks, shift 3):

* ``stage1`` ``layers.0.blocks.{0,1}.attn``            56x56 map, C=96,  3 heads
* ``stage2`` ``layers.1.blocks.{0,1}.attn``            28x28,     C=192, 6 heads
* ``stage3`` ``layers.2.blocks.{0,2,4 | 1,3,5}.attn``  14x14,     C=384, 12 heads
* ``stage4`` ``layers.3.blocks.{0,1}.attn``            7x7,       C=768, 24 heads

Each stage is timed with shift 0 (``shift0``, W-MSA) and shift 3 (``shift3``, SW-MSA: rolled map and timm's
region mask). Swin-T itself runs stage 4 unshifted (timm drops the shift when the window covers the map), so
``stage4.shift3`` is the op's shape rather than the model's. All four maps are multiples of the window: no
padding, so ``pad_qkv`` is None.

Inputs: ``qkv`` (8, H, W, 3C), the block's qkv projection of the whole map, and ``rel_pos_bias`` (heads, 49, 49)
fp32 (timm's ``relative_position_bias_table[relative_position_index]``, heads first). Modes ``fwd`` and
``fwd+bwd`` (gradients of qkv and rel_pos_bias). Cases are named ``swin_t.stage<i>.shift<s>-c<C>h<H>-<dtype>``;
the layout column reads ``bhwc``. fp32 everywhere; on CUDA also fp16 (the bias stays fp32 for the fused op; the
reference gets it cast to fp16, as the fp16 timm model holds it, since its matmul needs one dtype). The fp16
cases are the ``bench_gpu`` subset (bench/gpu_check.sh; every case compiles the reference there, so the subset
is kept to the dtype the GPU goal is about); forward cases come first so that a time-boxed run reaches the
acceptance numbers before the backward ones.

``eager`` is fastops.reference.window_attention (timm's path: roll -> pad -> partition -> attention -> reverse
-> crop -> roll back, from qkv), ``compile`` is torch.compile of it, and every fastops backend is timed through
``fastops.window_attention``.
"""

import pytest
import torch

import fastops
from fastops.reference import window_attention as reference
from roofline import (FUSED_BACKENDS, MODES, Case, add_summary, bench_device, geomean, op_providers,
                      parametrize, speedup_stats, verdict)

OP = "window_attention"
BATCH = 8
WINDOW = 7
N = WINDOW * WINDOW
HEAD_DIM = 32
SHIFTS = (0, 3)
ACCEPT_X_EAGER = 2.0
ACCEPT_X_COMPILE = 1.5
GOAL_X_EAGER_FP16_CUDA = 3.5

# (stage, timm modules, map height = width, channels, heads)
STAGES = [
    ("stage1", "layers.0.blocks.{0,1}.attn", 56, 96, 3),
    ("stage2", "layers.1.blocks.{0,1}.attn", 28, 192, 6),
    ("stage3", "layers.2.blocks.{0-5}.attn", 14, 384, 12),
    ("stage4", "layers.3.blocks.{0,1}.attn", 7, 768, 24),
]
DTYPES = [torch.float32] + ([torch.float16] if bench_device().type == "cuda" else [])

def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _cost(H, C, heads, dtype, mode):
    """(FLOPs, fewest bytes).

    With T = B*H*W tokens, nW = (H/7)^2 windows per image and B*nW*heads (window, head) pairs of N = 49 tokens:

    FLOPs (multiply-adds count 2; scale, bias, mask, softmax and its backward not counted)
      fwd      4*N*N*hd per (window, head): S = Q K^T and O = P V                     = 4*N*T*C
      backward 10*N*N*hd per (window, head): the recomputed S, dV = P^T dO, dP = dO V^T,
               dQ = dS K, dK = dS^T Q                                                 = 10*N*T*C
    Fewest bytes (each tensor read or written once; the bias is fp32; the forward's lse, if kept for the
    backward, is an implementation choice and not counted)
      fwd      read qkv (3C per token), write out (C), read the bias:               4C*T*esz + 4*heads*N*N
      backward read qkv, out and grad_out (5C), write grad_qkv (3C); read the bias and write its grad:
                                                                                     8C*T*esz + 8*heads*N*N
    So a window-7 forward does N*4C / (4C*esz) = 49 / esz FLOP per byte: ~12 in fp32, ~25 in fp16.
    """
    T = BATCH * H * H
    esz = torch.finfo(dtype).bits // 8
    bias = 4 * heads * N * N
    flops = 4 * N * T * C
    nbytes = 4 * C * T * esz + bias
    if mode == "fwd+bwd":
        flops += 10 * N * T * C
        nbytes += 8 * C * T * esz + 2 * bias
    return flops, nbytes


def _case(stage, modules, H, C, heads, shift, dtype, mode):
    flops, nbytes = _cost(H, C, heads, dtype, mode)

    def make_inputs(device):
        qkv = torch.randn(BATCH, H, H, 3 * C, device=device, dtype=dtype)
        bias = 0.5 * torch.randn(heads, N, N, device=device, dtype=torch.float32)
        return qkv, bias, None

    def probe(device):
        return (torch.randn(1, WINDOW, WINDOW, 3 * C, device=device, dtype=dtype),
                torch.randn(heads, N, N, device=device), None)

    def reason_args(args):
        # The registry's predicates for this op take (qkv, head_dim, n).
        return args[0], HEAD_DIM, N

    def ref(qkv, bias, pad):
        return reference(qkv, heads, (WINDOW, WINDOW), (shift, shift), bias.to(qkv.dtype), None, pad)

    def fused(qkv, bias, pad):
        return fastops.window_attention(qkv, heads, WINDOW, shift, rel_pos_bias=bias, pad_qkv=pad)

    providers = op_providers(OP, ref, fused, probe, reason_args)
    return Case(op=OP, name=f"swin_t.{stage}.shift{shift}-c{C}h{H}-{_dtype_name(dtype)}", layout="bhwc", mode=mode,
                flops=flops, bytes=nbytes, make_inputs=make_inputs, providers=providers, grad_inputs=(0, 1),
                marks=[pytest.mark.bench_gpu] if dtype == torch.float16 else [],
                meta={"model": "swin_tiny_patch4_window7_224", "module": modules, "stage": stage, "H": H, "W": H,
                      "C": C, "heads": heads, "head_dim": HEAD_DIM, "window": WINDOW, "shift": shift,
                      "in_model": shift == 0 or H > WINDOW, "batch": BATCH, "dtype": _dtype_name(dtype)})


CASES = [_case(*stage, shift, dtype, mode)
         for mode in MODES for dtype in DTYPES for stage in STAGES for shift in SHIFTS]


@parametrize(CASES)
def test_window_attention(time_case, case, provider):
    time_case(case, provider)


# Summary -------------------------------------------------------------------------------------------

@add_summary
def _summary(results, machine):
    mine = [r for r in results if r.op == OP]
    fused = [p for p in FUSED_BACKENDS if any(r.provider == p for r in mine)]
    if mine and not fused:
        return [f"{OP} summary: no fastops backend ran here (`python -m fastops info` says why)"]
    lines = []
    for prov in fused:
        lines.append(f"{OP} summary, provider {prov}: speedup over eager (timm's roll/pad/partition/attention "
                     f"path) and over torch.compile, across the four Swin-T stages (batch {BATCH}, window {WINDOW})")
        lines.append(f"  {'dtype':<7} {'mode':<8} {'shift':>5} {'n':>2}  {'geomean ×eager':>14}  {'min ×eager':>10}  "
                     f"{'(at case)':<36} {'geomean ×compile':>16}  {'min ×compile':>12}  {'(at case)':<36}")
        for dtype in DTYPES:
            dn = _dtype_name(dtype)
            for mode in MODES:
                for shift in SHIFTS:
                    rows = [r for r in mine if r.provider == prov and r.meta["dtype"] == dn and r.mode == mode
                            and r.meta["shift"] == shift]
                    if not rows:
                        continue
                    (ge, me, ce), (gc, mc, cc) = speedup_stats(rows, "x_eager"), speedup_stats(rows, "x_compile")
                    lines.append(f"  {dn:<7} {mode:<8} {shift:>5} {len(rows):>2}  {ge:>14}  {me:>10}  {ce:<36} "
                                 f"{gc:>16}  {mc:>12}  {cc:<36}")
        for dtype in DTYPES:
            dn = _dtype_name(dtype)
            fwd = [r for r in mine if r.provider == prov and r.meta["dtype"] == dn and r.mode == "fwd"]
            if not fwd:
                continue
            xe = [r.x_eager for r in fwd if r.x_eager]
            xc = [r.x_compile for r in fwd if r.x_compile]
            ge = geomean(xe) if xe else None
            gc = geomean(xc) if xc else None
            lines.append(f"  acceptance {prov} {dn} forward, geomean over {len(fwd)} of {len(STAGES) * len(SHIFTS)} "
                         f"cases (4 stages x shift 0/3): "
                         f"×eager {verdict(ge, ACCEPT_X_EAGER)}, ×compile {verdict(gc, ACCEPT_X_COMPILE)}")
            if machine.device == "cuda" and dtype == torch.float16:
                met = "-" if ge is None else ("MET" if ge >= GOAL_X_EAGER_FP16_CUDA else "NOT MET")
                lines.append(f"  goal {prov} float16 on CUDA forward: ×eager >= {GOAL_X_EAGER_FP16_CUDA:.1f}: "
                             f"{'-' if ge is None else f'{ge:.2f}'} {met}")
    return lines
