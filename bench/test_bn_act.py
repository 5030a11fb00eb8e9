"""bn_act benchmark cases: DenseNet-121's pre-activation BN -> ReLU (``norm1`` of the dense layers at the
smallest and largest channel count of each block, ``norm2`` at 56x56, the transitions' ``norm``), batch 8,
224x224 input; and, eval only, BN -> SiLU at EfficientNet-B0's first expansion / depthwise layers (an
activation bound by its arithmetic, not by memory), summarised apart.

Modes: ``eval`` ``fwd`` (running statistics, under torch.no_grad) and ``train`` ``fwd+bwd`` (batch
statistics, running statistics updated, gradients of x, weight and bias). ``eager`` is
``F.relu(F.batch_norm(...))`` (fastops.reference.bn_act), ``compile`` torch.compile of it. fp32; on CUDA also
fp16.
"""
import pytest
import torch

import fastops
from fastops.reference import bn_act as reference
from roofline import Case, acceptance_lines, add_summary, bench_device, op_providers, parametrize

OP = "bn_act"
BATCH = 8
ACCEPT = {"x_eager": 1.5, "x_compile": None}  # train fwd+bwd over eager

# (name, C, H): BN -> ReLU
LAYERS = [
    ("densenet121.denseblock1.norm1.first", 64, 56), ("densenet121.denseblock1.norm1.last", 224, 56),
    ("densenet121.denseblock1.norm2", 128, 56), ("densenet121.transition1.norm", 256, 56),
    ("densenet121.denseblock2.norm1.first", 128, 28), ("densenet121.denseblock2.norm1.last", 480, 28),
    ("densenet121.denseblock3.norm1.first", 256, 14), ("densenet121.denseblock3.norm1.last", 992, 14),
    ("densenet121.denseblock4.norm1.last", 992, 7), ("densenet121.norm5", 1024, 7),
]
# (name, C, H): BN -> SiLU, eval
SILU_LAYERS = [
    ("efficientnet_b0.bn1", 32, 112), ("efficientnet_b0.blocks.1.0.bn1", 96, 112),
    ("efficientnet_b0.blocks.1.0.bn2", 96, 56), ("efficientnet_b0.blocks.2.0.bn1", 144, 56),
    ("efficientnet_b0.blocks.3.0.bn1", 240, 28),
]
DEVICE = bench_device()
DTYPES = [torch.float32] + ([torch.float16] if DEVICE.type == "cuda" else [])


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _cost(C, H, dtype, mode):
    """(FLOPs, fewest bytes) per batch: ~4 FLOPs per element forward (scale, shift, max), ~8 more backward;
    bytes: read x, write out (training reads x twice: statistics, then normalisation); the backward reads
    grad_out and x twice (reduction, then grad_x) and writes grad_x."""
    esz = torch.finfo(dtype).bits // 8
    n = BATCH * C * H * H
    if mode == "fwd":
        return 4 * n, 2 * n * esz
    return 12 * n, (3 + 5) * n * esz


def _case(name, C, H, dtype, train, act="relu"):
    mode = "fwd+bwd" if train else "fwd"
    flops, nbytes = _cost(C, H, dtype, mode)
    f = dict(device=DEVICE, dtype=torch.float32)
    rm, rv = torch.randn(C, **f) * 0.1, torch.rand(C, **f) + 0.5

    def make_inputs(device):
        return (torch.randn(BATCH, C, H, H, device=device, dtype=dtype), 1 + 0.1 * torch.randn(C, **f),
                0.1 * torch.randn(C, **f))

    def probe(device):
        return (torch.randn(1, C, 1, 1, device=device, dtype=dtype),)

    def ref(x, w, b):
        return reference(x, w, b, rm, rv, 1e-5, act, None, train)

    def fused(x, w, b):
        return fastops.bn_act(x, w, b, rm, rv, 1e-5, act, None, train)

    return Case(op=OP, name=f"{name}-c{C}-{H}x{H}-{'train' if train else 'eval'}-{_dtype_name(dtype)}",
                layout="nchw", mode=mode, flops=flops, bytes=nbytes, make_inputs=make_inputs,
                providers=op_providers(OP, ref, fused, probe), grad_inputs=(0, 1, 2),
                marks=[pytest.mark.bench_gpu] if dtype == torch.float16 else [],
                meta={"layer": name, "C": C, "H": H, "batch": BATCH, "dtype": _dtype_name(dtype),
                      "bn": "train" if train else "eval", "act": act})


CASES = ([_case(*layer, dtype, train) for train in (False, True) for dtype in DTYPES for layer in LAYERS]
         + [_case(*layer, dtype, False, "silu") for dtype in DTYPES for layer in SILU_LAYERS])


@parametrize(CASES)
def test_bn_act(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    relu = [r for r in results if r.meta.get("act", "relu") == "relu"]
    silu = [r for r in results if r.meta.get("act") == "silu"]
    return (acceptance_lines(relu, OP, "F.batch_norm + F.relu", ACCEPT, modes=("fwd+bwd",))
            + acceptance_lines(silu, OP, "F.batch_norm + F.silu, EfficientNet-B0 layers",
                               {"x_eager": None, "x_compile": None}))
