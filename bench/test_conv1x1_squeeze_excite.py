"""conv1x1_squeeze_excite benchmark cases: the tail of every seresnet50 bottleneck in eval, batch 8, fp32.

Each of seresnet50's 16 bottlenecks ends ``relu(se(bn3(conv3(x))) + shortcut)``: conv3 is a 1x1 convolution from
the block's width to 4x it (64 -> 256 at 56x56, 128 -> 512 at 28, 256 -> 1024 at 14, 512 -> 2048 at 7), the SE
as in bench/test_squeeze_excite.py. In eval bn3 folds into conv3's weight and bias, which is how every provider
gets it: ``eager`` is ``F.conv2d`` with the folded weight and bias, then timm's ``SEModule.forward`` and the end of
``Bottleneck.forward`` (bench/baselines.py); ``compile`` is torch.compile of that; fastops is
``fastops.conv1x1_squeeze_excite``. Forward only (the op exists for eval; its backward recomputes the conv and
runs conv_bias_act's and squeeze_excite's backward kernels). Layouts ``nchw`` and ``nhwc``.
"""
import torch
import torch.nn.functional as F

import fastops
from baselines import timm_se_bottleneck_tail
from roofline import Case, add_summary, parametrize, op_providers
from test_squeeze_excite import LAYOUTS, _speedup_summary

OP = "conv1x1_squeeze_excite"
BATCH = 8
DTYPE = torch.float32

# (timm stage, bottlenecks, conv3 input channels, output channels, height = width, SE rd channels)
LAYERS = [
    ("layer1", "layer1.{0,1,2}", 64, 256, 56, 16),
    ("layer2", "layer2.{0,1,2,3}", 128, 512, 28, 32),
    ("layer3", "layer3.{0,1,2,3,4,5}", 256, 1024, 14, 64),
    ("layer4", "layer4.{0,1,2}", 512, 2048, 7, 128),
]


def _probe(device):
    return (torch.randn(1, 8, 4, 4, device=device, dtype=DTYPE),)


def _cost(K, C, H, R):
    """(FLOPs, fewest bytes): the 1x1 conv (2 K C per pixel), the SE (mean, scale, residual add: 3 per output
    element, and the two small layers) in FLOPs; x and the shortcut read, the output written and the
    parameters read once in bytes (the conv's output need never reach memory)."""
    X = BATCH * C * H * H
    flops = 2 * BATCH * H * H * K * C + 3 * X + 4 * BATCH * R * C
    params = K * C + C + 2 * R * C + R + C
    esz = torch.finfo(DTYPE).bits // 8
    return flops, esz * (BATCH * K * H * H + 2 * X + params)


def _case(stage, blocks, K, C, H, R, layout):
    fmt = LAYOUTS[layout]
    flops, nbytes = _cost(K, C, H, R)

    def make_inputs(device):
        x = torch.randn(BATCH, K, H, H, device=device, dtype=DTYPE).contiguous(memory_format=fmt)
        w = torch.randn(C, K, 1, 1, device=device, dtype=DTYPE) / K ** 0.5
        b = torch.randn(C, device=device, dtype=DTYPE) * 0.1
        w1 = torch.randn(R, C, 1, 1, device=device, dtype=DTYPE) / C ** 0.5
        b1 = torch.randn(R, device=device, dtype=DTYPE) * 0.1
        w2 = torch.randn(C, R, 1, 1, device=device, dtype=DTYPE) / R ** 0.5
        b2 = torch.randn(C, device=device, dtype=DTYPE) * 0.1
        res = torch.randn(BATCH, C, H, H, device=device, dtype=DTYPE).contiguous(memory_format=fmt)
        return x, w, b, w1, b1, w2, b2, res

    def ref(x, w, b, w1, b1, w2, b2, res):
        return timm_se_bottleneck_tail(F.conv2d(x, w, b), w1, b1, w2, b2, res)

    def fused(x, w, b, w1, b1, w2, b2, res):
        return fastops.conv1x1_squeeze_excite(x, w, b, w1, b1, w2, b2, act="relu", gate="sigmoid", residual=res,
                                              out_act="relu")

    return Case(op=OP, name=f"seresnet50.{stage}.conv3+se+res+relu-k{K}c{C}h{H}", layout=layout, mode="fwd",
                flops=flops, bytes=nbytes, make_inputs=make_inputs, providers=op_providers(OP, ref, fused, _probe),
                grad_inputs=(0, 1, 2, 3, 4, 5, 6, 7),
                meta={"model": "seresnet50", "module": blocks, "variant": "conv3+se+res+relu", "K": K, "C": C,
                      "H": H, "rd": R, "batch": BATCH, "dtype": str(DTYPE).replace("torch.", "")})


CASES = [_case(*layer, layout) for layer in LAYERS for layout in LAYOUTS]


@parametrize(CASES)
def test_conv1x1_squeeze_excite(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    mine = [r for r in results if r.op == OP]
    return _speedup_summary(OP, "speedup over eager (F.conv2d with bn3 folded, then timm's SEModule code, + shortcut, "
                            "relu) and over torch.compile, across the seresnet50 bottleneck tails", mine,
                            ["conv3+se+res+relu"])
