"""bench/baselines.py, the eager providers of the SE and CBAM benchmarks, is timm's modules' forward code: same
outputs, gradients and BN running stats as the timm modules holding the same weights."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch

timm_layers = pytest.importorskip("timm.layers")
timm_cbam = pytest.importorskip("timm.layers.cbam")

_spec = importlib.util.spec_from_file_location("baselines", Path(__file__).parents[1] / "bench" / "baselines.py")
baselines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(baselines)


def _randomize(module):
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
    return module


def _grads(out, leaves):
    out.square().sum().backward()
    return [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("tail", [False, True], ids=["se", "se+res+relu"])
def test_timm_se(cl, tail):
    se = _randomize(timm_layers.SEModule(32))
    x = torch.randn(2, 32, 5, 6)
    x = x.contiguous(memory_format=torch.channels_last) if cl else x
    res = torch.randn_like(x)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = se(xa)
    if tail:
        want = torch.relu(want + res)
    params = [p.detach().clone().requires_grad_() for p in (se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias)]
    got = (baselines.timm_se_bottleneck_tail(xb, *params, res) if tail else baselines.timm_se(xb, *params))
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    gw = _grads(want, [xa, se.fc1.weight, se.fc1.bias, se.fc2.weight, se.fc2.bias])
    gg = _grads(got, [xb] + params)
    for a, b in zip(gg, gw):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_timm_cbam(training):
    cbam = _randomize(timm_cbam.CbamModule(32, rd_ratio=1 / 16)).train(training)
    ref = copy.deepcopy(cbam)
    x = torch.randn(2, 32, 7, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = cbam(xa)
    bn = ref.spatial.conv.bn
    params = [p.detach().clone().requires_grad_() for p in (ref.channel.fc1.weight, ref.channel.fc2.weight,
                                                            ref.spatial.conv.conv.weight, bn.weight, bn.bias)]
    got = baselines.timm_cbam(xb, *params, bn.running_mean, bn.running_var, training, bn.momentum, bn.eps)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_mean, cbam.spatial.conv.bn.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(bn.running_var, cbam.spatial.conv.bn.running_var, rtol=0, atol=0)
    timm_leaves = [xa, cbam.channel.fc1.weight, cbam.channel.fc2.weight, cbam.spatial.conv.conv.weight,
                   cbam.spatial.conv.bn.weight, cbam.spatial.conv.bn.bias]
    for a, b in zip(_grads(got, [xb] + params), _grads(want, timm_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
