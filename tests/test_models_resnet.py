"""fastops.models ResNet family vs timm.models.resnet, with timm's weights loaded strictly.

Eval outputs (fp32, 224x224 and 160x192, NCHW and channels_last) and a training step (gradients of
every parameter, BN running stats) for ResNet-50, SE-ResNet-50 and CBAM-ResNet-50; registry, kwargs,
state_dict keys for every registered name; the fused models call the fastops ops, fused=False never does.

The training step runs in float64: in float32, even timm against timm in another memory layout differs
by ~1e-2 in the early layers' gradients (ReLU / max decisions flip on rounding; train-mode BN on a small
batch amplifies it), so full-network float32 gradients cannot be held to 1e-4. float32 training of the
modules themselves is checked in test_nn_attention.py.
"""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastops.nn.attention as attention
import fastops.nn.conv_bn as conv_bn
from fastops import backends
from fastops.models import create_model, list_models
from fastops.nn import CbamModule, SqueezeExcite

from ._util import count_calls, cpu_threads, rel_err

timm = pytest.importorskip("timm")

TOL = 1e-4
CL = torch.channels_last
CBAM = dict(block_args=dict(attn_layer="cbam"))
# id: (our name, our kwargs, timm name, timm kwargs)
CASES = {
    "resnet50": ("resnet50", {}, "resnet50", {}),
    "seresnet50": ("seresnet50", {}, "seresnet50", {}),
    "cbam_resnet50": ("resnet50", CBAM, "resnet50", CBAM),
}
TIMM_NAME = {"cbam_resnet50": ("resnet50", CBAM)}


def _calibrate_(model, shape=(2, 3, 64, 64)):
    """Random BN affine parameters (timm zero-inits the last BN of each block, which would make every
    attention input constant) and running stats taken from one batch, so eval activations stay O(1)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.reset_running_stats()
                m.momentum = None
        model.train()(torch.randn(shape))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = 0.1
                m.num_batches_tracked.fill_(7)
    return model.eval()


def _ours_from(theirs, name, fused=True, **kw):
    """Our model built on the meta device, then timm's state_dict loaded strictly (copies, not views)."""
    with torch.device("meta"):
        ours = create_model(name, fused=fused, **kw)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    return ours.train(theirs.training)


_CACHE = {}


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    """(case, timm model, our fused model, our name, our kwargs), eval mode, same weights."""
    case = request.param
    if case not in _CACHE:
        name, kw, timm_name, timm_kw = CASES[case]
        torch.manual_seed(0)
        theirs = _calibrate_(timm.create_model(timm_name, pretrained=False, **timm_kw))
        _CACHE.clear()  # one pair alive at a time
        _CACHE[case] = (case, theirs, _ours_from(theirs, name, **kw), name, kw)
    return _CACHE[case]


def test_eval_matches_timm(pair):
    _, theirs, ours, name, kw = pair
    torch.manual_seed(1)
    x224, x_ns = torch.randn(1, 3, 224, 224), torch.randn(1, 3, 160, 192)
    with torch.no_grad():
        ref224, ref_ns = theirs(x224), theirs(x_ns)
        assert ref224.shape == ref_ns.shape == (1, 1000)
        err = rel_err(ours(x224), ref224)
        assert err <= TOL, f"224x224: rel err {err:.2e}"
        ours_cl = copy.deepcopy(ours).to(memory_format=CL)
        err = rel_err(ours_cl(x_ns.contiguous(memory_format=CL)), ref_ns)
        assert err <= TOL, f"160x192 channels_last: rel err {err:.2e}"
        del ours_cl
        plain = _ours_from(theirs, name, fused=False, **kw)
        err = rel_err(plain(x_ns), ref_ns)
        assert err <= TOL, f"160x192 fused=False: rel err {err:.2e}"


def test_se_eval_batch8_fused_conv_se(pair, monkeypatch):
    """SE-ResNet-50 in eval at batch 8: each block's conv3 -> bn3 -> SE -> + shortcut -> relu is one
    fastops.conv1x1_squeeze_excite call, whose CPU schedule gates conv3's GEMM output in its epilogue. Output
    and (eval-mode) input / parameter gradients equal timm's."""
    case, theirs, ours, name, kw = pair
    if case != "seresnet50":
        pytest.skip("SE blocks only")
    if backends.forced_backend() not in (None, "cpu"):
        pytest.skip("the fused conv + SE op runs on the cpu backend only")
    calls = count_calls(monkeypatch, conv_bn, "conv1x1_squeeze_excite")
    torch.manual_seed(3)
    x = torch.randn(8, 3, 64, 64)
    with torch.no_grad(), cpu_threads(2), profile(activities=[ProfilerActivity.CPU]) as prof:
        ref = theirs(x)
        err = rel_err(ours(x), ref)
    assert err <= TOL, f"eval batch 8: rel err {err:.2e}"
    assert len(calls) == 16
    # The fused schedule ran: of the model's 53 convolutions only the 37 outside the SE blocks' tails
    # reach conv_bias_act (the other schedule calls it for conv3 too).
    convs = sum(e.count for e in prof.key_averages() if e.key == "fastops::conv_bias_act")
    assert convs == 37, convs
    # Eval-mode gradients through the op's backward, in float64 (see the module docstring for float32).
    theirs, ours = copy.deepcopy(theirs).double(), copy.deepcopy(ours).double()
    xt, xo = (x[:2].double().requires_grad_() for _ in range(2))
    theirs(xt).square().sum().backward()
    ours(xo).square().sum().backward()
    assert len(calls) == 32  # the float64 forward calls it too (its two-kernel schedule)
    assert rel_err(xo.grad, xt.grad) <= TOL, "grad x"
    p_t = dict(theirs.named_parameters())
    for k, p in ours.named_parameters():
        assert rel_err(p.grad, p_t[k].grad) <= TOL, f"grad {k}: rel err {rel_err(p.grad, p_t[k].grad):.2e}"


def _train_step(model, x, y):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
    bufs = {k: b.detach().clone() for k, b in model.named_buffers()}
    return out.detach(), loss.detach(), grads, bufs


def test_train_step_matches_timm(pair):
    """One training step (float64): loss, every gradient, BN running stats (incl. CBAM's spatial BN)."""
    case, theirs, ours, name, kw = pair
    forced = backends.forced_backend()
    why = forced and backends.reasons("squeeze_excite", torch.zeros(1, 8, 2, 2, dtype=torch.float64))[forced]
    if why:
        pytest.skip(f"forced backend {forced!r} cannot run float64: {why}")
    theirs, ours = copy.deepcopy(theirs).double(), copy.deepcopy(ours).double()
    torch.manual_seed(2)
    x, y = torch.randn(2, 3, 64, 64, dtype=torch.float64), torch.tensor([3, 977])
    out_t, loss_t, grads_t, bufs_t = _train_step(theirs, x, y)
    out_o, loss_o, grads_o, bufs_o = _train_step(ours, x.clone(), y)
    assert rel_err(out_o, out_t) <= TOL and rel_err(loss_o, loss_t) <= TOL
    assert list(bufs_o) == list(bufs_t) and list(grads_o) == list(grads_t)
    for k in bufs_t:
        if k.endswith("num_batches_tracked"):
            assert int(bufs_o[k]) == int(bufs_t[k]) == 8, k
        else:
            assert rel_err(bufs_o[k], bufs_t[k]) <= TOL, f"buffer {k}: rel err {rel_err(bufs_o[k], bufs_t[k]):.2e}"
    attn = [k for k in grads_t if ".se." in k]
    assert len(attn) == {"resnet50": 0, "seresnet50": 16 * 4, "cbam_resnet50": 16 * 5}[case]
    for k in grads_t:
        err = rel_err(grads_o[k], grads_t[k])
        assert err <= TOL, f"grad {k}: rel err {err:.2e}"


@pytest.mark.parametrize("name", list_models())
def test_state_dict_keys_match_timm(name):
    timm_name, kw = TIMM_NAME.get(name, (name, {}))
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(timm_name, pretrained=False, **kw)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]


def test_registry():
    assert {"resnet18", "resnet34", "resnet50", "seresnet50", "cbam_resnet50"} <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet0")


def test_kwargs_match_timm():
    """num_classes, in_chans, drop_rate (inactive in eval), drop_path_rate as timm."""
    kw = dict(num_classes=10, in_chans=1, drop_rate=0.5, drop_path_rate=0.1)
    torch.manual_seed(0)
    theirs = _calibrate_(timm.create_model("seresnet18", pretrained=False, **kw), shape=(2, 1, 64, 64))
    ours = _ours_from(theirs, "seresnet18", **kw)
    x = torch.randn(2, 1, 64, 96)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 10)
        assert rel_err(out, theirs(x)) <= TOL
    with torch.device("meta"):
        assert create_model("resnet50", num_classes=0).fc.__class__ is nn.Identity
        assert create_model("cbam_resnet50").layer1[0].se.__class__ is CbamModule
        assert create_model("seresnet50", fused=False).layer1[0].se.__class__ is not SqueezeExcite


@pytest.mark.parametrize("kw, exc", [(dict(pretrained=True), ValueError), (dict(drop_block_rate=0.1), TypeError),
                                     (dict(output_stride=16), TypeError), (dict(global_pool="max"), ValueError),
                                     (dict(block_args=dict(attn_layer="eca")), ValueError),
                                     (dict(block_args=dict(cardinality=32)), TypeError)])
def test_unsupported_kwargs_raise(kw, exc):
    with torch.device("meta"), pytest.raises(exc):
        create_model("resnet50", **kw)


@pytest.mark.parametrize("name, kw, op", [("resnet18", {}, None), ("seresnet18", {}, "squeeze_excite"),
                                        ("resnet18", CBAM, "cbam")])
def test_basic_block_models(monkeypatch, name, kw, op):
    """BasicBlock models match timm; fused=True: one op call per block; fused=False: no fastops op call."""
    calls = []
    if op is not None:
        real = getattr(attention, op)

        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(attention, op, spy)
    torch.manual_seed(0)
    theirs = _calibrate_(timm.create_model(name, pretrained=False, **kw))
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        ref = theirs(x)
        assert rel_err(_ours_from(theirs, name, **kw)(x), ref) <= TOL
    assert len(calls) == (8 if op else 0)

    def boom(*args, **kwargs):
        raise AssertionError("fused=False called a fastops op")

    monkeypatch.setattr(attention, "squeeze_excite", boom)
    monkeypatch.setattr(attention, "cbam", boom)
    with torch.no_grad():
        assert rel_err(_ours_from(theirs, name, fused=False, **kw)(x), ref) <= TOL


def test_se_block_is_one_fused_call(monkeypatch):
    """SE-ResNet blocks pass the shortcut as residual and out_act='relu'."""
    seen = []
    real = attention.squeeze_excite

    def spy(x, w1, b1, w2, b2, act, gate, residual, out_act):
        seen.append((residual is not None and residual.shape == x.shape, out_act))
        return real(x, w1, b1, w2, b2, act, gate, residual, out_act)

    monkeypatch.setattr(attention, "squeeze_excite", spy)
    with torch.no_grad():
        create_model("seresnet18", num_classes=5).eval()(torch.randn(1, 3, 32, 32))
    assert seen == [(True, "relu")] * 8
