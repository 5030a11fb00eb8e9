"""sr_attention benchmark cases: the spatial-reduction attention of every PVTv2-b2 stage at 224x224, batch 8,
and a 512x512 segmentation-sized stage 1.

PVTv2-b2 (timm ``pvt_v2_b2``) reduces every stage's keys and values to a 7x7 map (Nr = 49; stage 4's map is
7x7 already and is not reduced), head_dim 64:

* ``stage1`` ``stages.0.blocks.*.attn``  N = 56x56 = 3136, C = 64,  1 head
* ``stage2`` ``stages.1.blocks.*.attn``  N = 784,          C = 128, 2 heads
* ``stage3`` ``stages.2.blocks.*.attn``  N = 196,          C = 320, 5 heads
* ``stage4`` ``stages.3.blocks.*.attn``  N = 49,           C = 512, 8 heads
* ``seg512.stage1``                      N = 128x128,      Nr = 16x16 = 256, C = 64, 1 head

Inputs: ``q`` (8, N, C) and ``kv`` (8, Nr, 2C), the q and kv Linear outputs. Modes ``fwd`` and ``fwd+bwd``
(gradients of q and kv). fp32; on CUDA also fp16 (the ``bench_gpu`` subset). ``eager`` is
fastops.reference.sr_attention — timm's path: reshape / permute into heads, ``F.scaled_dot_product_attention``,
transpose back — ``compile`` is torch.compile of it, and every fastops backend is timed through
``fastops.sr_attention``.
"""

import pytest
import torch

import fastops
from fastops.reference import sr_attention as reference
from roofline import MODES, Case, acceptance_lines, add_summary, bench_device, op_providers, parametrize

OP = "sr_attention"
BATCH = 8
ACCEPT = {"x_eager": 1.5, "x_compile": 1.5}

# (stage, timm modules, N, Nr, C, heads)
STAGES = [
    ("stage1", "stages.0.blocks.*.attn", 3136, 49, 64, 1),
    ("stage2", "stages.1.blocks.*.attn", 784, 49, 128, 2),
    ("stage3", "stages.2.blocks.*.attn", 196, 49, 320, 5),
    ("stage4", "stages.3.blocks.*.attn", 49, 49, 512, 8),
    ("seg512.stage1", "stages.0.blocks.*.attn at 512x512", 16384, 256, 64, 1),
]
DTYPES = [torch.float32] + ([torch.float16] if bench_device().type == "cuda" else [])


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _cost(N, nr, C, dtype, mode):
    """(FLOPs, fewest bytes) per batch of BATCH.

    FLOPs (multiply-adds count 2; scale and softmax not counted)
      fwd      S = Q K^T and O = P V per head:                   4 * N * Nr * C
      backward the recomputed S, dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q:  10 * N * Nr * C
    Fewest bytes (each tensor read or written once; the forward's lse is an implementation choice)
      fwd      read q (N*C) and kv (2*Nr*C), write out (N*C)
      backward read q, out, grad_out (3*N*C) and kv (2*Nr*C), write grad_q (N*C) and grad_kv (2*Nr*C)
    With Nr = 49 a forward does 4*Nr*C / (2*C*esz) = 98 / esz FLOP per byte: ~25 in fp32.
    """
    esz = torch.finfo(dtype).bits // 8
    flops = 4 * N * nr * C
    nbytes = (2 * N * C + 2 * nr * C) * esz
    if mode == "fwd+bwd":
        flops += 10 * N * nr * C
        nbytes += (4 * N * C + 4 * nr * C) * esz
    return BATCH * flops, BATCH * nbytes


def _case(stage, modules, N, nr, C, heads, dtype, mode):
    flops, nbytes = _cost(N, nr, C, dtype, mode)

    def make_inputs(device):
        return (torch.randn(BATCH, N, C, device=device, dtype=dtype),
                torch.randn(BATCH, nr, 2 * C, device=device, dtype=dtype))

    def probe(device):
        return torch.randn(1, 1, C, device=device, dtype=dtype), torch.randn(1, nr, 2 * C, device=device, dtype=dtype)

    def reason_args(args):
        # The registry's predicates for this op take (q, head_dim, Nr).
        return args[0], C // heads, nr

    def ref(q, kv):
        return reference(q, kv, heads)

    def fused(q, kv):
        return fastops.sr_attention(q, kv, heads)

    return Case(op=OP, name=f"pvt_v2_b2.{stage}-n{N}r{nr}c{C}h{heads}-{_dtype_name(dtype)}", layout="bnc",
                mode=mode, flops=flops, bytes=nbytes, make_inputs=make_inputs,
                providers=op_providers(OP, ref, fused, probe, reason_args), grad_inputs=(0, 1),
                marks=[pytest.mark.bench_gpu] if dtype == torch.float16 else [],
                meta={"model": "pvt_v2_b2", "module": modules, "stage": stage, "N": N, "Nr": nr, "C": C,
                      "heads": heads, "batch": BATCH, "dtype": _dtype_name(dtype)})


CASES = [_case(*stage, dtype, mode) for mode in MODES for dtype in DTYPES for stage in STAGES]


@parametrize(CASES)
def test_sr_attention(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    return acceptance_lines(results, OP, "timm's reshape/permute + SDPA + transpose path", ACCEPT)
