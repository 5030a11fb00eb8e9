"""spatial_reduction benchmark cases: the key/value source reduction of every PVTv2-b2 stage at 224x224
(conv k = stride = sr_ratio + LayerNorm), of PVTv2-b2-li (AdaptiveAvgPool2d(7) + 1x1 conv + LayerNorm + GELU),
and a 512x512 segmentation-sized stage 1; batch 8.

* ``b2.stage1``  ``stages.0.blocks.*.attn.sr/norm``  56x56 map, C = 64,  sr 8 -> 7x7
* ``b2.stage2``                                      28x28,     C = 128, sr 4 -> 7x7
* ``b2.stage3``                                      14x14,     C = 320, sr 2 -> 7x7
* ``b2_li.stage1..4``  ``...attn.pool/sr/norm/act``  56x56 / 28x28 / 14x14 / 7x7 maps -> 7x7
* ``seg512.stage1``                                  128x128,   C = 64,  sr 8 -> 16x16

Inputs: ``x`` (8, H*W, C) (the block's normalised tokens), the conv weight and bias, the LayerNorm weight and
bias. Modes ``fwd`` and ``fwd+bwd`` (gradients of x and every parameter). fp32; on CUDA also fp16.
``eager`` is fastops.reference.spatial_reduction — timm's path: tokens -> (B, C, H, W) view, conv (or pool +
1x1 conv), back to tokens, ``F.layer_norm`` (+ ``F.gelu``) — ``compile`` is torch.compile of it.
"""

import pytest
import torch

import fastops
from fastops.reference import spatial_reduction as reference
from roofline import MODES, Case, acceptance_lines, add_summary, bench_device, op_providers, parametrize

OP = "spatial_reduction"
BATCH = 8
ACCEPT = {"x_eager": 1.5, "x_compile": None}

# (name, timm modules, H, W, C, sr_ratio, linear)
STAGES = [
    ("b2.stage1", "pvt_v2_b2 stages.0.blocks.*.attn.sr/norm", 56, 56, 64, 8, False),
    ("b2.stage2", "pvt_v2_b2 stages.1.blocks.*.attn.sr/norm", 28, 28, 128, 4, False),
    ("b2.stage3", "pvt_v2_b2 stages.2.blocks.*.attn.sr/norm", 14, 14, 320, 2, False),
    ("b2_li.stage1", "pvt_v2_b2_li stages.0.blocks.*.attn.pool/sr/norm/act", 56, 56, 64, 1, True),
    ("b2_li.stage2", "pvt_v2_b2_li stages.1.blocks.*.attn.pool/sr/norm/act", 28, 28, 128, 1, True),
    ("b2_li.stage3", "pvt_v2_b2_li stages.2.blocks.*.attn.pool/sr/norm/act", 14, 14, 320, 1, True),
    ("b2_li.stage4", "pvt_v2_b2_li stages.3.blocks.*.attn.pool/sr/norm/act", 7, 7, 512, 1, True),
    ("seg512.stage1", "pvt_v2_b2 stages.0.blocks.*.attn.sr/norm at 512x512", 128, 128, 64, 8, False),
]
DTYPES = [torch.float32] + ([torch.float16] if bench_device().type == "cuda" else [])


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _cost(H, W, C, sr, linear, dtype, mode):
    """(FLOPs, fewest bytes) per batch of BATCH.

    With Nr reduced tokens and K = C*k*k (k = sr, or 1 after the pool):
      fwd FLOPs  2 * Nr * C * K for the conv (+ H*W*C adds for the pool); the LayerNorm / GELU not counted
      fwd bytes  read x (the H*W*C values the conv reads) and the weight (C*K), write out (Nr*C)
      backward   4 * Nr * C * K more FLOPs (grad weight, grad input); reads grad_out and x again, writes
                 grad_x and grad_weight
    """
    esz = torch.finfo(dtype).bits // 8
    k = 1 if linear else sr
    nr = 49 if linear else (H // sr) * (W // sr)
    read = H * W * C if linear else (H // sr) * sr * (W // sr) * sr * C
    K = C * k * k
    flops = BATCH * (2 * nr * C * K + (H * W * C if linear else 0))
    nbytes = (BATCH * (read + nr * C) + C * K) * esz
    if mode == "fwd+bwd":
        flops += BATCH * 4 * nr * C * K
        nbytes += (BATCH * (2 * read + nr * C) + 2 * C * K) * esz
    return flops, nbytes


def _case(name, modules, H, W, C, sr, linear, dtype, mode):
    flops, nbytes = _cost(H, W, C, sr, linear, dtype, mode)
    k = 1 if linear else sr

    def make_inputs(device):
        f = dict(device=device, dtype=dtype)
        return (torch.randn(BATCH, H * W, C, **f), torch.randn(C, C, k, k, **f) / (C * k * k) ** 0.5,
                torch.randn(C, **f), 1 + 0.1 * torch.randn(C, **f), 0.1 * torch.randn(C, **f))

    def probe(device):
        return (torch.randn(1, 1, C, device=device, dtype=dtype),)

    def reason_args(args):
        # The registry's predicates for this op take (x, C, kernel size).
        return args[0], C, k

    def ref(x, w, b, nw, nb):
        return reference(x, (H, W), w, b, nw, nb, k, linear)

    def fused(x, w, b, nw, nb):
        return fastops.spatial_reduction(x, (H, W), w, b, nw, nb, k, linear)

    return Case(op=OP, name=f"pvt_v2.{name}-{H}x{W}c{C}" + ("-pool7" if linear else f"-sr{sr}")
                + f"-{_dtype_name(dtype)}", layout="bnc", mode=mode, flops=flops, bytes=nbytes,
                make_inputs=make_inputs, providers=op_providers(OP, ref, fused, probe, reason_args),
                grad_inputs=(0, 1, 2, 3, 4), marks=[pytest.mark.bench_gpu] if dtype == torch.float16 else [],
                meta={"module": modules, "stage": name, "H": H, "W": W, "C": C, "sr_ratio": sr, "linear": linear,
                      "batch": BATCH, "dtype": _dtype_name(dtype)})


CASES = [_case(*stage, dtype, mode) for mode in MODES for dtype in DTYPES for stage in STAGES]


@parametrize(CASES)
def test_spatial_reduction(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    return acceptance_lines(results, OP, "timm's view + conv + permute + LayerNorm path", ACCEPT)
