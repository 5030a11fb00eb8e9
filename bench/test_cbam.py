"""cbam benchmark cases: every CBAM position of CBAM-ResNet-50 at 224x224, batch 8, fp32.

CBAM-ResNet-50 is timm ``resnet50`` with ``block_args=dict(attn_layer="cbam")``: a ``CbamModule`` (``ChannelAttn``
then ``SpatialAttn``) after ``bn3`` of each of the 16 bottlenecks, in four shapes, one per stage
(``layer1.{0-2}.se`` C=256 at 56x56, ``layer2.{0-3}.se`` 512 at 28, ``layer3.{0-5}.se`` 1024 at 14,
``layer4.{0-2}.se`` 2048 at 7). Checked against timm: ``rd_channels = C / 16`` (rd_divisor 1) = 16 / 32 / 64 /
128, fc1 / fc2 without bias, ReLU, sigmoid gates, spatial conv 7x7 (1, 2, 7, 7) without bias then
``BatchNorm2d(1)``.

Cases are named ``cbam_resnet50.layerN.se-c<C>h<H>.<bn>``: ``fwd`` cases run the module in eval mode (BN
normalises with its running stats, ``.eval``), ``fwd+bwd`` cases in train mode (BN uses the batch statistics
of the conv output and updates the running stats, ``.train``), as inference and training do.

``eager`` is timm's own code path (``CbamModule.forward``, from bench/baselines.py: its 1x1 conv fc layers, the
spatial conv and BatchNorm2d, with the case's weights), ``compile`` is torch.compile of it, and every fastops
backend is timed through ``fastops.cbam``. Layouts ``nchw`` (contiguous) and ``nhwc``
(torch.channels_last); ``fwd+bwd`` takes gradients of x, fc1 / fc2 weights, the spatial conv weight and the BN
weight and bias.
"""
import torch

import fastops
from baselines import timm_cbam
from roofline import MODES, Case, add_summary, geomean, op_providers, parametrize

OP = "cbam"
BATCH = 8
DTYPE = torch.float32
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
K = 7  # SpatialAttn kernel size
EPS, MOMENTUM = 1e-5, 0.1

# (timm stage, CBAM modules of that stage, channels, height = width, rd channels)
LAYERS = [
    ("layer1", "layer1.{0,1,2}.se", 256, 56, 16),
    ("layer2", "layer2.{0,1,2,3}.se", 512, 28, 32),
    ("layer3", "layer3.{0,1,2,3,4,5}.se", 1024, 14, 64),
    ("layer4", "layer4.{0,1,2}.se", 2048, 7, 128),
]
BN_MODE = {"fwd": "eval", "fwd+bwd": "train"}


def _probe(device):
    return (torch.randn(1, 8, 4, 4, device=device, dtype=DTYPE),)


def _cost(C, H, R, mode):
    """(FLOPs, fewest bytes).

    With X = N*C*H*W elements, S = N*H*W spatial positions and P = 2*R*C + 2*K*K + 4 parameters and BN stats
    (multiply-adds count 2; activations, gates and BN's per-position arithmetic not counted):

    FLOPs
      fwd      2X (avg + max pool over hw) + 8*N*R*C (the 2-layer MLP on both pooled vectors) + X (x1 = x*ca)
               + 2X (mean + max over c) + 4*K*K*S (the k x k conv on 2 maps) + X (x1*sa)     = 6X + 8NRC + 4K²S
      backward 2X (dsa = sum_c go*x1) + 3X (dx1) + 2X (dca = sum_hw dx1*x) + X (dx1*ca)
               + 2X (pooling grads) + 16*N*R*C (MLP input and weight grads, both branches)
               + 8*K*K*S (conv input and weight grads)                                      = 10X + 16NRC + 8K²S
    Fewest bytes (each tensor read or written once; the pooled vectors and the (N, 2, H, W) spatial maps are
    small enough to stay in cache and are left out; a kernel reads x about 3 times in the forward, to pool,
    to pool across channels and to scale, unless a sample stays in cache):
      fwd      read x, write out, read params:                                  2X + P
      backward read grad_out and x, write grad_x, read the params, write their grads: 3X + 2P
    """
    X = BATCH * C * H * H
    S = BATCH * H * H
    P = 2 * R * C + 2 * K * K + 4
    esz = torch.finfo(DTYPE).bits // 8
    flops = 6 * X + 8 * BATCH * R * C + 4 * K * K * S
    nbytes = 2 * X + P
    if mode == "fwd+bwd":
        flops += 10 * X + 16 * BATCH * R * C + 8 * K * K * S
        nbytes += 3 * X + 2 * P
    return flops, esz * nbytes


def _case(stage, modules, C, H, R, layout, mode):
    fmt = LAYOUTS[layout]
    bn = BN_MODE[mode]
    training = bn == "train"
    flops, nbytes = _cost(C, H, R, mode)

    def make_inputs(device):
        def t(*shape):
            return torch.randn(*shape, device=device, dtype=DTYPE)

        x = t(BATCH, C, H, H).contiguous(memory_format=fmt)
        w1 = t(R, C, 1, 1) / C ** 0.5
        w2 = t(C, R, 1, 1) / R ** 0.5
        conv_w = t(1, 2, K, K) / (2 * K * K) ** 0.5
        bn_w = 1 + 0.1 * t(1)
        bn_b = 0.1 * t(1)
        # Running stats: float32, as timm's BatchNorm2d keeps them.
        bn_mean = 0.1 * torch.randn(1, device=device, dtype=torch.float32)
        bn_var = 0.5 + torch.rand(1, device=device, dtype=torch.float32)
        return x, w1, w2, conv_w, bn_w, bn_b, bn_mean, bn_var

    def ref(x, w1, w2, conv_w, bn_w, bn_b, bn_mean, bn_var):
        return timm_cbam(x, w1, w2, conv_w, bn_w, bn_b, bn_mean, bn_var, training, MOMENTUM, EPS)

    def fused(x, w1, w2, conv_w, bn_w, bn_b, bn_mean, bn_var):
        return fastops.cbam(x, w1, None, w2, None, conv_w, bn_w, bn_b, bn_mean, bn_var, bn_eps=EPS,
                            training=training, momentum=MOMENTUM, act="relu", gate="sigmoid")

    return Case(op=OP, name=f"cbam_resnet50.{stage}.se-c{C}h{H}.{bn}", layout=layout, mode=mode, flops=flops,
                bytes=nbytes, make_inputs=make_inputs, providers=op_providers(OP, ref, fused, _probe),
                grad_inputs=(0, 1, 2, 3, 4, 5),
                meta={"model": "cbam_resnet50", "timm": 'resnet50, block_args=dict(attn_layer="cbam")',
                      "module": modules, "C": C, "H": H, "rd": R, "k": K, "bn": bn, "batch": BATCH,
                      "dtype": str(DTYPE).replace("torch.", "")})


# Mode before layout: a case name carries its BN mode, so this keeps each name's rows together in the table.
CASES = [_case(*layer, layout, mode) for layer in LAYERS for mode in MODES for layout in LAYOUTS]


@parametrize(CASES)
def test_cbam(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    mine = [r for r in results if r.op == OP]
    fused = [p for p in ("cpu", "cuda", "triton") if any(r.provider == p for r in mine)]
    if mine and not fused:
        return [f"{OP} summary: no fastops backend ran here (`python -m fastops info` says why)"]
    lines = []
    for prov in fused:
        lines.append(f"{OP} summary, provider {prov}: speedup over eager (timm's CbamModule code) and over "
                     f"torch.compile across the CBAM-ResNet-50 positions (fwd: BN eval, fwd+bwd: BN train)")
        lines.append(f"  {'layout':<6} {'mode':<8} {'n':>2}  {'geomean ×eager':>14}  {'min ×eager':>10}  "
                     f"{'(at case)':<38} {'geomean ×compile':>16}  {'min ×compile':>12}  {'(at case)':<38}")
        for layout in LAYOUTS:
            for mode in MODES:
                rows = [r for r in mine if r.provider == prov and r.layout == layout and r.mode == mode]
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
                lines.append(f"  {layout:<6} {mode:<8} {len(rows):>2}  {ge:>14}  {me:>10}  {ce:<38} {gc:>16}  "
                             f"{mc:>12}  {cc:<38}")
    return lines
