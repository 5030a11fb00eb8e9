"""conv_bn_act benchmark cases: the conv -> BN -> act (+ shortcut) chains of ResNet-50's bottlenecks and
MobileNetV2's inverted residuals, batch 8, at the sizes a 224x224 input gives them.

* ``resnet50.layerN.convK``  1x1 reduce, 3x3 (stride 2 in the first block of layers 2-4), 1x1 expand whose
  BN output is added to the shortcut before the ReLU (``+res``), at 56/28/14/7
* ``mbv2.*.expand``  1x1 -> BN -> ReLU6;  ``.dw``  3x3 depthwise -> BN -> ReLU6 (stride 1 or 2);
  ``.project``  1x1 -> BN, + shortcut when the block has one

Two modes. ``eval`` ``fwd``: BN with running statistics, under torch.no_grad, as in inference;
``eager`` is ``act(bn(conv(x)) + shortcut)`` with nn.Conv2d / nn.BatchNorm2d modules, ``compile`` is
torch.compile of it, the fastops providers run :class:`fastops.nn.ConvBNAct` on the same modules (BN folded
once, cached; bias + shortcut + act in the conv's epilogue). ``train`` ``fwd+bwd``: batch statistics, gradients
of x, the conv weight and the BN parameters (the running statistics are updated on every call, by every
provider). fp32; on CUDA also fp16 (eval).
"""
import pytest
import torch
import torch.nn as nn

import fastops
from roofline import Case, acceptance_lines, add_summary, bench_device, op_providers, parametrize

OP = "conv_bn_act"
KERNEL_OP = "conv_bias_act"  # the registry entry whose backends run these cases
BATCH = 8
ACCEPT = {"x_eager": 1.3, "x_compile": 1.0}
ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "none": nn.Identity}

# (name, C_in, C_out, H (input), k, stride, groups, act, shortcut)
LAYERS = [
    ("resnet50.layer1.conv1", 256, 64, 56, 1, 1, 1, "relu", False),
    ("resnet50.layer1.conv2", 64, 64, 56, 3, 1, 1, "relu", False),
    ("resnet50.layer1.conv3", 64, 256, 56, 1, 1, 1, "relu", True),
    ("resnet50.layer2.0.conv2", 128, 128, 56, 3, 2, 1, "relu", False),
    ("resnet50.layer2.conv1", 512, 128, 28, 1, 1, 1, "relu", False),
    ("resnet50.layer2.conv2", 128, 128, 28, 3, 1, 1, "relu", False),
    ("resnet50.layer2.conv3", 128, 512, 28, 1, 1, 1, "relu", True),
    ("resnet50.layer3.conv1", 1024, 256, 14, 1, 1, 1, "relu", False),
    ("resnet50.layer3.conv2", 256, 256, 14, 3, 1, 1, "relu", False),
    ("resnet50.layer3.conv3", 256, 1024, 14, 1, 1, 1, "relu", True),
    ("resnet50.layer4.conv1", 2048, 512, 7, 1, 1, 1, "relu", False),
    ("resnet50.layer4.conv2", 512, 512, 7, 3, 1, 1, "relu", False),
    ("resnet50.layer4.conv3", 512, 2048, 7, 1, 1, 1, "relu", True),
    ("mbv2.blocks.1.expand", 24, 144, 56, 1, 1, 1, "relu6", False),
    ("mbv2.blocks.1.dw", 144, 144, 56, 3, 1, 144, "relu6", False),
    ("mbv2.blocks.1.project", 144, 24, 56, 1, 1, 1, "none", True),
    ("mbv2.blocks.2.0.dw", 144, 144, 56, 3, 2, 144, "relu6", False),
    ("mbv2.blocks.2.expand", 32, 192, 28, 1, 1, 1, "relu6", False),
    ("mbv2.blocks.2.dw", 192, 192, 28, 3, 1, 192, "relu6", False),
    ("mbv2.blocks.2.project", 192, 32, 28, 1, 1, 1, "none", True),
    ("mbv2.blocks.3.expand", 64, 384, 14, 1, 1, 1, "relu6", False),
    ("mbv2.blocks.3.dw", 384, 384, 14, 3, 1, 384, "relu6", False),
    ("mbv2.blocks.3.project", 384, 64, 14, 1, 1, 1, "none", True),
    ("mbv2.blocks.5.expand", 160, 960, 7, 1, 1, 1, "relu6", False),
    ("mbv2.blocks.5.dw", 960, 960, 7, 3, 1, 960, "relu6", False),
    ("mbv2.blocks.5.project", 960, 160, 7, 1, 1, 1, "none", True),
]
DEVICE = bench_device()
DTYPES = [torch.float32] + ([torch.float16] if DEVICE.type == "cuda" else [])


class EagerChain(nn.Module):
    """``act(bn(conv(x)) + shortcut)`` with torch modules: the eager baseline."""

    def __init__(self, conv, bn, act):
        super().__init__()
        self.conv, self.bn, self.act = conv, bn, ACTS[act]()

    def forward(self, x, shortcut=None):
        y = self.bn(self.conv(x))
        return self.act(y if shortcut is None else y + shortcut)


class FusedChain(nn.Module):
    def __init__(self, conv, bn, act):
        super().__init__()
        self.m = fastops.nn.ConvBNAct.from_modules(conv, bn, ACTS[act]())

    def forward(self, x, shortcut=None):
        return self.m(x, shortcut)


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def _cost(cin, cout, h, k, s, g, shortcut, dtype, mode):
    """(FLOPs, fewest bytes) per batch of BATCH: conv FLOPs 2 * OH * OW * C_out * (C_in / g) * k * k (x3 with
    the backward); bytes: read x (and the shortcut), the weight, write the output; the backward reads grad_out,
    x and the weight again and writes grad_x and grad_weight. BN and the activation add no bytes when fused."""
    esz = torch.finfo(dtype).bits // 8
    oh = (h + 2 * (k // 2) - k) // s + 1
    macs = oh * oh * cout * (cin // g) * k * k
    flops = 2 * BATCH * macs
    xs, ys, ws = BATCH * cin * h * h, BATCH * cout * oh * oh, cout * (cin // g) * k * k
    nbytes = (xs + ys * (2 if shortcut else 1) + ws) * esz
    if mode == "fwd+bwd":
        flops *= 3
        nbytes += (ys + 2 * xs + 2 * ws) * esz
    return flops, nbytes


def _case(name, cin, cout, h, k, s, g, act, shortcut, dtype, train):
    mode = "fwd+bwd" if train else "fwd"
    flops, nbytes = _cost(cin, cout, h, k, s, g, shortcut, dtype, mode)
    oh = (h + 2 * (k // 2) - k) // s + 1
    f = dict(device=DEVICE, dtype=dtype)
    conv = nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=False, **f)
    bn = nn.BatchNorm2d(cout, **f)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.1), bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0, 0.1)
    eager, fused = EagerChain(conv, bn, act), FusedChain(conv, bn, act)
    eager.train(train), fused.train(train)

    def make_inputs(device):
        x = torch.randn(BATCH, cin, h, h, device=device, dtype=dtype)
        r = torch.randn(BATCH, cout, oh, oh, device=device, dtype=dtype) if shortcut else None
        return x, r

    def probe(device):
        return (torch.randn(1, cin, 1, 1, device=device, dtype=dtype), conv.weight, g)

    def reason_args(args):
        return args[0], conv.weight, g

    return Case(op=OP, name=f"{name}-{cin}to{cout}-{h}x{h}-k{k}s{s}" + ("-dw" if g > 1 else "")
                + ("+res" if shortcut else "") + f"-{'train' if train else 'eval'}-{_dtype_name(dtype)}",
                layout="nchw", mode=mode, flops=flops, bytes=nbytes, make_inputs=make_inputs,
                providers=op_providers(KERNEL_OP, eager, fused, probe, reason_args), grad_inputs=(0,),
                grad_params=train, marks=[pytest.mark.bench_gpu] if dtype == torch.float16 else [],
                meta={"layer": name, "model": name.split(".")[0], "C_in": cin, "C_out": cout, "H": h, "k": k,
                      "stride": s, "groups": g, "act": act, "shortcut": shortcut, "batch": BATCH,
                      "dtype": _dtype_name(dtype), "bn": "train" if train else "eval"})


CASES = ([_case(*layer, dtype, False) for dtype in DTYPES for layer in LAYERS]
         + [_case(*layer, torch.float32, True) for layer in LAYERS])


@parametrize(CASES)
def test_conv_bias_act(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    return acceptance_lines(results, OP, "nn.Conv2d -> nn.BatchNorm2d -> act modules", ACCEPT)
