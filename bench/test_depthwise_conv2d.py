"""depthwise_conv2d benchmark cases: the depthwise layers of real models at 224x224, batch 8, fp32.

Each case is named after the timm module it comes from (``mbv2.b1.1`` is mobilenetv2_100
``blocks.1.1.conv_dw``; ``fastvit_t8.s0.mlp`` is fastvit_t8 ``stages.0.blocks.*.mlp.conv``;
``convnext_t.s0`` is convnext_tiny ``stages.0.blocks.*.conv_dw``; ``pvt_v2_b0.s0.mlp`` is pvt_v2_b0
``stages.0.blocks.*.mlp.dwconv``) plus its shape: ``c<channels>h<input size>k<kernel>s<stride>``.
Layouts: ``nchw`` (contiguous) and ``nhwc`` (torch.channels_last); modes ``fwd`` and ``fwd+bwd``
(gradients of input, weight and bias).
"""
import pytest
import torch

import fastops
from fastops.reference import depthwise_conv2d as reference
from roofline import MODES, Case, add_summary, geomean, op_providers, parametrize

OP = "depthwise_conv2d"
BATCH = 8
DTYPE = torch.float32
LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}

# (model, layer, timm module, channels, input height = width, kernel, stride, in the bench_gpu subset)
LAYERS = [
    # MobileNetV2-1.0: every distinct depthwise 3x3 shape, the first module that has it.
    ("mbv2", "b0.0", "blocks.0.0.conv_dw", 32, 112, 3, 1, True),
    ("mbv2", "b1.0", "blocks.1.0.conv_dw", 96, 112, 3, 2, False),
    ("mbv2", "b1.1", "blocks.1.1.conv_dw", 144, 56, 3, 1, False),
    ("mbv2", "b2.0", "blocks.2.0.conv_dw", 144, 56, 3, 2, True),
    ("mbv2", "b2.1", "blocks.2.1.conv_dw", 192, 28, 3, 1, False),
    ("mbv2", "b3.0", "blocks.3.0.conv_dw", 192, 28, 3, 2, False),
    ("mbv2", "b3.1", "blocks.3.1.conv_dw", 384, 14, 3, 1, False),
    ("mbv2", "b4.1", "blocks.4.1.conv_dw", 576, 14, 3, 1, False),
    ("mbv2", "b5.0", "blocks.5.0.conv_dw", 576, 14, 3, 2, False),
    ("mbv2", "b5.1", "blocks.5.1.conv_dw", 960, 7, 3, 1, True),
    # FastViT-T8 ConvFFN: depthwise 7x7 at each stage width.
    ("fastvit_t8", "s0.mlp", "stages.0.blocks.0.mlp.conv", 48, 56, 7, 1, False),
    ("fastvit_t8", "s1.mlp", "stages.1.blocks.0.mlp.conv", 96, 28, 7, 1, True),
    ("fastvit_t8", "s2.mlp", "stages.2.blocks.0.mlp.conv", 192, 14, 7, 1, False),
    ("fastvit_t8", "s3.mlp", "stages.3.blocks.0.mlp.conv", 384, 7, 7, 1, False),
    # ConvNeXt-T stage 0 block: depthwise 7x7.
    ("convnext_t", "s0", "stages.0.blocks.0.conv_dw", 96, 56, 7, 1, True),
    # PVTv2-b0 MLP: depthwise 3x3 on the 8x-expanded hidden width.
    ("pvt_v2_b0", "s0.mlp", "stages.0.blocks.0.mlp.dwconv", 256, 56, 3, 1, True),
    ("pvt_v2_b0", "s1.mlp", "stages.1.blocks.0.mlp.dwconv", 512, 28, 3, 1, False),
]


def _probe(device):
    return (torch.randn(1, 4, 8, 8, device=device, dtype=DTYPE), torch.randn(4, 1, 3, 3, device=device, dtype=DTYPE),
            torch.randn(4, device=device, dtype=DTYPE))


def _case(model, layer, module, C, H, k, s, gpu, layout, mode):
    pad = k // 2
    OH = (H + 2 * pad - k) // s + 1
    x_n, y_n, w_n, b_n = BATCH * C * H * H, BATCH * C * OH * OH, C * k * k, C
    esz = torch.finfo(DTYPE).bits // 8
    fwd_flops = 2 * BATCH * C * OH * OH * k * k
    if mode == "fwd":
        flops, nbytes = fwd_flops, esz * (x_n + w_n + b_n + y_n)
    else:
        # grad_input and grad_weight each repeat the forward's multiply-adds (bias add and its reduction are
        # left out, as in the forward); the backward reads grad_out, x and w once more and writes
        # grad_input, grad_weight and grad_bias.
        flops, nbytes = 3 * fwd_flops, esz * (3 * x_n + 2 * y_n + 3 * w_n + 2 * b_n)
    fmt = LAYOUTS[layout]

    def make_inputs(device):
        x = torch.randn(BATCH, C, H, H, device=device, dtype=DTYPE).contiguous(memory_format=fmt)
        w = torch.randn(C, 1, k, k, device=device, dtype=DTYPE) / k
        b = torch.randn(C, device=device, dtype=DTYPE)
        return x, w, b

    def ref(x, w, b):
        return reference(x, w, b, [s, s], [pad] * 4, [1, 1])

    def fused(x, w, b):
        return fastops.depthwise_conv2d(x, w, b, stride=s, padding=pad)

    return Case(op=OP, name=f"{model}.{layer}-c{C}h{H}k{k}s{s}", layout=layout, mode=mode, flops=flops,
                bytes=nbytes, make_inputs=make_inputs, providers=op_providers(OP, ref, fused, _probe),
                grad_inputs=(0, 1, 2), marks=[pytest.mark.bench_gpu] if gpu else [],
                meta={"model": model, "module": module, "C": C, "H": H, "k": k, "stride": s, "batch": BATCH,
                      "dtype": str(DTYPE).replace("torch.", "")})


CASES = [_case(*layer, layout, mode) for layer in LAYERS for layout in LAYOUTS for mode in MODES]


@parametrize(CASES)
def test_depthwise_conv2d(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    mine = [r for r in results if r.op == OP]
    fused = [p for p in ("cpu", "cuda", "triton") if any(r.provider == p for r in mine)]
    if mine and not fused:
        return ["depthwise_conv2d summary: no fastops backend ran here (`python -m fastops info` says why)"]
    lines = []
    for prov in fused:
        lines.append(f"depthwise_conv2d summary, provider {prov}: speedup over eager across the MobileNetV2 + "
                     f"FastViT-T8 cases; % of the copy bandwidth ({machine.copy_bytes_per_s / 1e9:.1f} GB/s) "
                     f"reached on the 3x3 cases (and by eager)")
        head = (f"  {'layout':<6} {'mode':<8} {'n':>3}  {'geomean ×eager':>14}  {'min ×eager':>10}  "
                f"{'(at case)':<30} {'geomean ×compile':>16}  {'3x3 %copy-BW: geomean [min..max]':>33}  "
                f"{'eager':>6}")
        lines.append(head)
        for layout in LAYOUTS:
            for mode in MODES:
                rows = [r for r in mine if r.provider == prov and r.layout == layout and r.mode == mode]
                if not rows:
                    continue
                sel = [r for r in rows if r.meta["model"] in ("mbv2", "fastvit_t8") and r.x_eager]
                xe = [r.x_eager for r in sel]
                xc = [r.x_compile for r in sel if r.x_compile]
                worst = min(sel, key=lambda r: r.x_eager) if sel else None
                bw = [r.pct_copy_bw for r in rows if r.meta["k"] == 3]
                bw_eager = [r.pct_copy_bw for r in mine if r.provider == "eager" and r.layout == layout
                            and r.mode == mode and r.meta["k"] == 3]
                lines.append(
                    f"  {layout:<6} {mode:<8} {len(sel):>3}  {(f'{geomean(xe):.2f}' if xe else '-'):>14}  "
                    f"{(f'{worst.x_eager:.2f}' if worst else '-'):>10}  {(worst.case if worst else ''):<30}"
                    f" {(f'{geomean(xc):.2f}' if xc else '-'):>16}  "
                    f"{(f'{geomean(bw):.0f}% [{min(bw):.0f}..{max(bw):.0f}%]' if bw else '-'):>33}  "
                    f"{(f'{geomean(bw_eager):.0f}%' if bw_eager else '-'):>6}")
    return lines
