"""squeeze_excite benchmark cases: every SE position of timm ``seresnet50`` at 224x224, batch 8, fp32.

seresnet50 puts an ``SEModule`` after ``bn3`` of each of its 16 bottlenecks; they come in four shapes, one per
stage (``layer1.{0-2}.se`` C=256 at 56x56, ``layer2.{0-3}.se`` 512 at 28, ``layer3.{0-5}.se`` 1024 at 14,
``layer4.{0-2}.se`` 2048 at 7), with ``rd_channels = make_divisible(C / 16, 8)`` = 16 / 32 / 64 / 128 (checked
against ``timm.create_model("seresnet50")``: fc1.weight (R, C, 1, 1), both fc biases, ReLU, sigmoid gate).

Two variants per shape:

* ``seresnet50.layerN.se-c<C>h<H>``: the bare SEModule, ``x * sigmoid(fc2(relu(fc1(mean_hw x))))``;
* ``seresnet50.layerN.se+res+relu-c<C>h<H>``: the SE-ResNet bottleneck tail ``relu(se(x) + shortcut)``, what
  timm's ``Bottleneck.forward`` does after ``self.se`` (``x += shortcut; x = self.act3(x)``), i.e. the op with
  ``residual=shortcut, out_act="relu"``.

``eager`` is timm's own code path (``SEModule.forward``, and for the second variant the end of
``Bottleneck.forward``, from bench/baselines.py: the 1x1 conv fc layers timm runs, with the case's weights),
``compile`` is torch.compile of it, and every fastops backend is timed through ``fastops.squeeze_excite``. The
weights are the (R, C, 1, 1) / (C, R, 1, 1) tensors of timm's convs, as fastops' drop-in module passes them.
Layouts ``nchw`` (contiguous) and ``nhwc`` (torch.channels_last); modes ``fwd`` and ``fwd+bwd`` (gradients of x,
fc1 / fc2 weights and biases, and the residual).
"""
import torch

import fastops
from baselines import timm_se, timm_se_bottleneck_tail
from roofline import MODES, Case, add_summary, geomean, op_providers, parametrize

OP = "squeeze_excite"
BATCH = 8
DTYPE = torch.float32
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# (timm stage, SE modules of that stage, channels, height = width, rd channels)
LAYERS = [
    ("layer1", "layer1.{0,1,2}.se", 256, 56, 16),
    ("layer2", "layer2.{0,1,2,3}.se", 512, 28, 32),
    ("layer3", "layer3.{0,1,2,3,4,5}.se", 1024, 14, 64),
    ("layer4", "layer4.{0,1,2}.se", 2048, 7, 128),
]
# variant -> (residual, out_act)
VARIANTS = {"se": (False, "none"), "se+res+relu": (True, "relu")}


def _probe(device):
    return (torch.randn(1, 8, 4, 4, device=device, dtype=DTYPE),)


def _cost(C, H, R, residual, mode):
    """(FLOPs, fewest bytes).

    SE moves every element of x a handful of times and does ~2-3 FLOPs with it: ~0.5 FLOP/byte, far below any
    ridge point, so it is memory-bound and the bytes are what matter. With X = N*C*H*W elements and
    P = 2*R*C + R + C parameters:

    FLOPs (multiply-adds count 2; activations, gate and relu masks not counted):
      fwd      X (mean) + 4*N*R*C (the two 1x1 layers) + X (scale) [+ X (residual add)]
      backward 2X (dg = sum_hw dy*x) + 2X (gx = dy*g + dp/HW) + 8*N*R*C (both layers' input and weight grads)
    Fewest bytes (each tensor read or written once; a kernel that keeps no sample of x in cache reads x twice
    in the forward, once to pool and once to scale, so its bytes are X higher):
      fwd      read x [+ residual], write out, read params:                 (2 [+1]) X + P
      backward read grad_out, x [, out for the relu mask], write grad_x [+ grad_residual], read the params
               and write their grads:                                      (3 [+2]) X + 2P
    """
    X = BATCH * C * H * H
    P = 2 * R * C + R + C
    esz = torch.finfo(DTYPE).bits // 8
    flops = (2 + residual) * X + 4 * BATCH * R * C
    nbytes = (2 + residual) * X + P
    if mode == "fwd+bwd":
        flops += 4 * X + 8 * BATCH * R * C
        nbytes += (3 + 2 * residual) * X + 2 * P
    return flops, esz * nbytes


def _case(stage, modules, C, H, R, variant, layout, mode):
    residual, out_act = VARIANTS[variant]
    fmt = LAYOUTS[layout]
    flops, nbytes = _cost(C, H, R, residual, mode)

    def make_inputs(device):
        x = torch.randn(BATCH, C, H, H, device=device, dtype=DTYPE).contiguous(memory_format=fmt)
        w1 = torch.randn(R, C, 1, 1, device=device, dtype=DTYPE) / C ** 0.5
        b1 = torch.randn(R, device=device, dtype=DTYPE) * 0.1
        w2 = torch.randn(C, R, 1, 1, device=device, dtype=DTYPE) / R ** 0.5
        b2 = torch.randn(C, device=device, dtype=DTYPE) * 0.1
        res = None
        if residual:
            res = torch.randn(BATCH, C, H, H, device=device, dtype=DTYPE).contiguous(memory_format=fmt)
        return x, w1, b1, w2, b2, res

    def ref(x, w1, b1, w2, b2, res):
        if residual:
            return timm_se_bottleneck_tail(x, w1, b1, w2, b2, res)
        return timm_se(x, w1, b1, w2, b2)

    def fused(x, w1, b1, w2, b2, res):
        return fastops.squeeze_excite(x, w1, b1, w2, b2, act="relu", gate="sigmoid", residual=res, out_act=out_act)

    return Case(op=OP, name=f"seresnet50.{stage}.{variant}-c{C}h{H}", layout=layout, mode=mode, flops=flops,
                bytes=nbytes, make_inputs=make_inputs, providers=op_providers(OP, ref, fused, _probe),
                grad_inputs=(0, 1, 2, 3, 4, 5),
                meta={"model": "seresnet50", "module": modules, "variant": variant, "C": C, "H": H, "rd": R,
                      "residual": residual, "out_act": out_act, "batch": BATCH,
                      "dtype": str(DTYPE).replace("torch.", "")})


CASES = [_case(*layer, variant, layout, mode)
         for variant in VARIANTS for layer in LAYERS for layout in LAYOUTS for mode in MODES]


@parametrize(CASES)
def test_squeeze_excite(time_case, case, provider):
    time_case(case, provider)


def _speedup_summary(op, title, mine, variants, fused_backends=("cpu", "cuda", "triton")):
    """Lines of geomean / min speedups over eager and over compile, per fused provider, variant, layout, mode."""
    fused = [p for p in fused_backends if any(r.provider == p for r in mine)]
    if mine and not fused:
        return [f"{op} summary: no fastops backend ran here (`python -m fastops info` says why)"]
    lines = []
    for prov in fused:
        lines.append(f"{op} summary, provider {prov}: {title}")
        lines.append(f"  {'variant':<12} {'layout':<6} {'mode':<8} {'n':>2}  {'geomean ×eager':>14}  "
                     f"{'min ×eager':>10}  {'(at case)':<38} {'geomean ×compile':>16}  {'min ×compile':>12}  "
                     f"{'(at case)':<38}")
        for variant in variants:
            for layout in LAYOUTS:
                for mode in MODES:
                    rows = [r for r in mine if r.provider == prov and r.meta.get("variant") == variant
                            and r.layout == layout and r.mode == mode]
                    if not rows:
                        continue
                    cells = []
                    for attr in ("x_eager", "x_compile"):
                        sel = [r for r in rows if getattr(r, attr)]
                        xs = [getattr(r, attr) for r in sel]
                        worst = min(sel, key=lambda r: getattr(r, attr)) if sel else None
                        cells.append((f"{geomean(xs):.2f}" if xs else "-",
                                      f"{getattr(worst, attr):.2f}" if worst else "-", worst.case if worst else ""))
                    (ge, me, ce), (gc, mc, cc) = cells
                    lines.append(f"  {variant:<12} {layout:<6} {mode:<8} {len(rows):>2}  {ge:>14}  {me:>10}  "
                                 f"{ce:<38} {gc:>16}  {mc:>12}  {cc:<38}")
    return lines


@add_summary
def _summary(results, machine):
    mine = [r for r in results if r.op == OP]
    return _speedup_summary(OP, "speedup over eager (timm's SEModule code) and over torch.compile, across the "
                           "seresnet50 SE positions; bare SE and the SE+residual+relu bottleneck tail apart",
                           mine, list(VARIANTS))
