"""fastops.nn.layers.linear_act: act(linear(x)) through a 1x1 conv_bias_act on the CPU when no gradient is needed
(a GEMM on a packed weight), plain F.linear otherwise; values against float64 PyTorch in every mode, and a
weight changed in place, replaced or moved never served stale."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastops
from fastops.nn.layers import linear_act

from ._util import assert_close


def _ref(x, lin, act):
    y = F.linear(x.double(), lin.weight.double(), None if lin.bias is None else lin.bias.double())
    return F.gelu(y) if act == "gelu" else y


def _ran_conv(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, any(e.name == "fastops::conv_bias_act" for e in prof.events())


@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 24), (2, 9, 24), (2, 5, 7, 24), (1, 24)])
def test_values_in_every_mode(shape, bias, act):
    torch.manual_seed(1)
    lin = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            y, fused = _ran_conv(lambda: linear_act(x, lin, act))
        assert fused or not fastops._ext.C_LOADED
        assert y.shape == (*shape[:-1], 40)
        assert_close(y, _ref(x, lin, act), torch.float32)
    # autograd wants the graph: F.linear, gradients as PyTorch's
    xg = x.clone().requires_grad_()
    y, fused = _ran_conv(lambda: linear_act(xg, lin, act))
    assert not fused and y.requires_grad
    assert_close(y, _ref(x, lin, act), torch.float32)
    y.square().sum().backward()
    ref_x = x.double().requires_grad_()
    _ref(ref_x, lin, act).square().sum().backward()
    assert_close(xg.grad, ref_x.grad, torch.float32)


def test_weight_changes_are_seen():
    torch.manual_seed(2)
    lin = nn.Linear(16, 32)
    x = torch.randn(3, 11, 16)
    with torch.no_grad():
        for step in range(4):
            if step == 1:
                lin.weight.mul_(-2.0)  # in place
            elif step == 2:
                lin.weight.data = torch.randn(32, 16)  # new storage, same Parameter
            elif step == 3:
                lin.weight = nn.Parameter(torch.randn(32, 16))  # a new Parameter
            for _ in range(2):
                assert_close(linear_act(x, lin, "gelu"), _ref(x, lin, "gelu"), torch.float32)
        lin.double()  # float64: plain F.linear
        y, fused = _ran_conv(lambda: linear_act(x.double(), lin, "gelu"))
        assert not fused and y.dtype == torch.float64
        assert_close(y, _ref(x, lin, "gelu"), torch.float64)


def test_reused_arguments_follow_every_change(monkeypatch):
    """linear_act keeps the checked arguments of its last call for its Linear; a different token count,
    strided tokens, another act or bias tensor, an in-place bias change or autocast must all be served
    fresh, and copies of the module start without them."""
    import fastops.nn.layers as layers

    planned = []
    real_plan = layers.plan_conv_bias_act
    monkeypatch.setattr(layers, "plan_conv_bias_act", lambda *a: planned.append(1) or real_plan(*a))

    def check(x, act, full):
        n = len(planned)
        assert_close(linear_act(x, lin, act), _ref(x, lin, act), torch.float32)
        assert len(planned) == n + full, "full path" if full else "reused"

    torch.manual_seed(3)
    lin = nn.Linear(16, 24)
    big = torch.randn(2, 9, 40)
    x = torch.randn(2, 9, 16)
    with torch.no_grad():
        for xi, act, full in [(x, "none", 1), (torch.randn(2, 9, 16), "none", 0), (x, "gelu", 1), (x, "gelu", 0),
                              (torch.randn(5, 16), "gelu", 1), (big[..., 3:19], "none", 1),
                              (big[..., 3:19], "none", 1),  # strided tokens are copied: never reused
                              (x, "none", 1)]:
            check(xi, act, full)
        lin.bias.add_(1.0)  # in place: the same tensor, reused, the new values seen
        check(x, "none", 0)
        lin.bias = nn.Parameter(torch.randn(24))  # replaced
        check(x, "none", 1)
        lin.bias = None
        check(x, "none", 1)
        check(x, "none", 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the full path, in bf16
            n = len(planned)
            assert linear_act(x, lin, "none").dtype == torch.bfloat16
            assert len(planned) == n + 1
        check(x, "none", 0)
        y = linear_act(x, lin, "gelu")
        for c in (pickle.loads(pickle.dumps(lin)), copy.deepcopy(lin)):  # copies start without a plan
            n = len(planned)
            assert torch.equal(linear_act(x, c, "gelu"), y)
            assert len(planned) == n + 1


@pytest.mark.parametrize("act", ["none", "gelu"])
def test_residual(act, monkeypatch):
    """act(linear(x) + residual): fused (the residual in the GEMM's epilogue) without grad, through F.linear with
    it; a plan made without a residual is not reused with one, nor the other way round, nor for a residual of
    rows with gaps between them; a residual of another shape falls back to PyTorch's broadcasting add."""
    import fastops.nn.layers as layers

    planned = []
    real_plan = layers.plan_conv_bias_act
    monkeypatch.setattr(layers, "plan_conv_bias_act", lambda *a: planned.append(1) or real_plan(*a))
    torch.manual_seed(4)
    lin = nn.Linear(24, 40)
    x = torch.randn(2, 7, 24)
    r = torch.randn(2, 7, 40)

    def ref(res):
        y = F.linear(x.double(), lin.weight.double(), lin.bias.double()) + res.double()
        return F.gelu(y) if act == "gelu" else y

    with torch.no_grad():
        wide = torch.randn(2, 7, 80)
        for res, full in [(r, 1), (torch.randn(2, 7, 40), 0), (None, 1), (r, 1),
                          (r.transpose(0, 1).contiguous().transpose(0, 1), 0),  # copied into token rows: reused
                          (wide[..., 10:50], 1), (wide[..., 10:50], 1)]:  # rows with gaps: never reused
            n = len(planned)
            y, fused = _ran_conv(lambda: linear_act(x, lin, act, res))
            assert fused or not fastops._ext.C_LOADED
            assert_close(y, ref(res) if res is not None else _ref(x, lin, act), torch.float32)
            assert len(planned) == n + full
        row = torch.randn(40)  # broadcast: PyTorch's add
        assert_close(linear_act(x, lin, act, row), ref(row.expand(2, 7, 40)), torch.float32)
    rg = r.clone().requires_grad_()
    y = linear_act(x, lin, act, rg)
    y.sum().backward()
    ref_r = r.double().requires_grad_()
    ref(ref_r).sum().backward()
    assert_close(rg.grad, ref_r.grad, torch.float32)
