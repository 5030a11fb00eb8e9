"""fastops.nn.SqueezeExcite / CbamModule vs timm's SEModule / CbamModule (fp32, NCHW and channels_last,
eval and train, gradients, BN running stats), from_timm / is_convertible, fastops.optimize, state_dicts.

Runs on whatever backend ``auto`` (or FASTOPS_BACKEND) picks."""
import copy
import io
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastops
from fastops.nn import CbamModule, SqueezeExcite

from ._util import rel_err

timm = pytest.importorskip("timm")
from timm.layers.cbam import CbamModule as TimmCbam  # noqa: E402
from timm.layers.cbam import LightCbamModule  # noqa: E402
from timm.layers import SEModule as TimmSE  # noqa: E402
from timm.layers.activations import GELU as TimmGELU  # noqa: E402

OUT_TOL = 1e-5   # fp32, relative L2
GRAD_TOL = 1e-4
CL = torch.channels_last


def _x(shape, layout, requires_grad=True):
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.contiguous(memory_format=CL)
    return x.requires_grad_(requires_grad)


def _randomize_(module):
    """Non-trivial values for every parameter / BN buffer (timm's init leaves biases 0, BN at identity)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.dim() > 1 else 0.3) + (1.0 if name.endswith("bn.weight") else 0.0))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return module


def _grads(module, *inputs):
    return [t.grad for t in inputs] + [p.grad for _, p in sorted(module.named_parameters())]


def _check_pair(ours, theirs, x, fwd_ours=None, fwd_theirs=None, extra=()):
    """Same output (value and layout) as timm and gradients for x, extra inputs and every parameter.

    Gradients are held against timm in float64: within GRAD_TOL, or no worse than 3x timm's own float32
    error (some, e.g. CBAM's scalar BN weight in training, are sums that cancel, where timm's float32
    is itself ~1e-3 off)."""
    fwd_ours = fwd_ours or (lambda m, x: m(x))
    fwd_theirs = fwd_theirs or (lambda m, x: m(x))
    theirs64 = copy.deepcopy(theirs).double()
    inputs = {"ours": [t.detach().clone().requires_grad_(True) for t in (x, *extra)],
              "theirs": [x, *extra],
              "theirs64": [t.detach().double().requires_grad_(True) for t in (x, *extra)]}
    out_t = fwd_theirs(theirs, *inputs["theirs"])
    out_64 = fwd_theirs(theirs64, *inputs["theirs64"])
    out_o = fwd_ours(ours, *inputs["ours"])
    assert out_o.shape == out_t.shape
    assert rel_err(out_o, out_t) <= OUT_TOL, f"output rel err {rel_err(out_o, out_t):.2e}"
    assert out_o.is_contiguous(memory_format=CL) == out_t.is_contiguous(memory_format=CL)
    go = torch.randn_like(out_t)
    out_t.backward(go)
    out_64.backward(go.double())
    out_o.backward(go)
    names = ["x"] + [f"extra{i}" for i in range(len(extra))] + [n for n, _ in sorted(theirs.named_parameters())]
    assert [n for n, _ in sorted(ours.named_parameters())] == names[1 + len(extra):]
    grads = {k: _grads(m, *inputs[k]) for k, m in (("ours", ours), ("theirs", theirs), ("theirs64", theirs64))}
    for name, g_o, g_t, g_64 in zip(names, grads["ours"], grads["theirs"], grads["theirs64"]):
        assert g_o is not None and g_t is not None, name
        err, timm_err = rel_err(g_o, g_64), rel_err(g_t, g_64)
        assert err <= max(GRAD_TOL, 3 * timm_err), f"grad {name}: rel err {err:.2e} (timm fp32: {timm_err:.2e})"


# SqueezeExcite ---------------------------------------------------------------------------------------

SE_CASES = [
    dict(),
    dict(act_layer=nn.SiLU, gate_layer="hard_sigmoid"),
    dict(act_layer="gelu", bias=False, rd_ratio=0.25),
    dict(act_layer=nn.GELU, gate_layer=nn.Sigmoid, rd_channels=12),
    dict(act_layer="swish", gate_layer=nn.Hardsigmoid, rd_divisor=1),
]


def _case_id(kw):
    return "-".join(f"{k}={getattr(v, '__name__', v)}" for k, v in kw.items()) or "default"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kw", SE_CASES, ids=_case_id)
def test_se_matches_timm(kw, layout):
    theirs = _randomize_(TimmSE(64, **kw))
    ours = SqueezeExcite(64, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for train in (False, True):
        ours.train(train), theirs.train(train)
        ours.zero_grad(), theirs.zero_grad()
        _check_pair(ours, theirs, _x((2, 64, 7, 9), layout))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_se_residual_out_act(layout):
    """SE-ResNet's relu(se(x) + shortcut) in one call."""
    theirs = _randomize_(TimmSE(32))
    ours = SqueezeExcite.from_timm(copy.deepcopy(theirs))
    r = _x((2, 32, 5, 6), layout)
    _check_pair(ours, theirs, _x((2, 32, 5, 6), layout), extra=(r,),
                fwd_ours=lambda m, x, r: m(x, residual=r, out_act="relu"),
                fwd_theirs=lambda m, x, r: F.relu(m(x) + r))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_se_resnet_sized(layout):
    """A ResNet-50 layer2-like shape (C=256, 28x28) with the fused residual + relu, fp32."""
    theirs = _randomize_(TimmSE(256))
    ours = SqueezeExcite.from_timm(copy.deepcopy(theirs))
    _check_pair(ours, theirs, _x((1, 256, 28, 28), layout), extra=(_x((1, 256, 28, 28), layout),),
                fwd_ours=lambda m, x, r: m(x, residual=r, out_act="relu"),
                fwd_theirs=lambda m, x, r: F.relu(m(x) + r))


def test_se_from_timm_shares_parameters():
    theirs = _randomize_(TimmSE(48, act_layer=nn.SiLU, gate_layer="hard_sigmoid")).eval()
    assert SqueezeExcite.is_convertible(theirs)
    ours = SqueezeExcite.from_timm(theirs)
    assert not ours.training
    for (n_o, p_o), (n_t, p_t) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert n_o == n_t and p_o is p_t
    assert (ours.act_name, ours.gate_name) == ("silu", "hard_sigmoid")
    x = torch.randn(1, 48, 4, 4)
    assert rel_err(ours(x), theirs(x)) <= OUT_TOL


def test_se_state_dict_round_trip():
    theirs = _randomize_(TimmSE(64, rd_ratio=1 / 8))
    ours = SqueezeExcite(64, rd_ratio=1 / 8)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    back = TimmSE(64, rd_ratio=1 / 8)
    back.load_state_dict(torch.load(io.BytesIO(buf.getvalue())), strict=True)
    x = torch.randn(2, 64, 3, 5)
    assert rel_err(ours(x), back(x)) <= OUT_TOL


@pytest.mark.parametrize("C, kw", [(64, {}), (24, {}), (256, dict(rd_ratio=0.25)), (100, dict(rd_divisor=1)),
                                   (96, dict(rd_channels=7))])
def test_se_reduced_channels_match_timm(C, kw):
    assert SqueezeExcite(C, **kw).fc1.out_channels == TimmSE(C, **kw).fc1.out_channels


@pytest.mark.parametrize("kw", [dict(add_maxpool=True), dict(norm_layer=nn.BatchNorm2d), dict(act_layer="mish"),
                                dict(act_layer=nn.Tanh), dict(gate_layer="tanh"), dict(gate_layer=nn.ReLU)])
def test_se_unsupported_options(kw):
    with pytest.raises(ValueError, match="SqueezeExcite"):
        SqueezeExcite(32, **kw)
    assert not SqueezeExcite.is_convertible(TimmSE(32, **kw))


def test_se_is_convertible_exact_type():
    assert SqueezeExcite.is_convertible(TimmSE(32))
    assert SqueezeExcite.is_convertible(TimmSE(32, act_layer="gelu"))
    assert not SqueezeExcite.is_convertible(TimmSE(32, act_layer="gelu_tanh"))
    assert not SqueezeExcite.is_convertible(TimmSE(32, act_layer=lambda inplace=False: nn.GELU("tanh")))
    assert not SqueezeExcite.is_convertible(SqueezeExcite(32))
    assert not SqueezeExcite.is_convertible(nn.Conv2d(4, 4, 1))
    assert not SqueezeExcite.is_convertible(timm.layers.EffectiveSEModule(32))

    class Sub(TimmSE):
        pass
    assert not SqueezeExcite.is_convertible(Sub(32))
    with pytest.raises(ValueError):
        SqueezeExcite.from_timm(Sub(32))


def test_is_convertible_without_timm(monkeypatch):
    """timm's modules unimportable: nothing is convertible (and nothing raises)."""
    se, cb = TimmSE(16), TimmCbam(16)
    for mod in ("timm.layers.squeeze_excite", "timm.layers.cbam"):
        monkeypatch.setitem(sys.modules, mod, None)
    assert not SqueezeExcite.is_convertible(se)
    assert not CbamModule.is_convertible(cb)


# CbamModule ------------------------------------------------------------------------------------------

CBAM_CASES = [
    dict(),
    dict(act_layer=nn.SiLU, gate_layer="hard_sigmoid", mlp_bias=True, spatial_kernel_size=3),
    dict(act_layer=TimmGELU, rd_ratio=0.25, spatial_kernel_size=5),
]


def _cbam_pair(kw, C=64):
    theirs = _randomize_(TimmCbam(C, **kw))
    ours = CbamModule(C, **kw)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _bn_state(m):
    bn = m.spatial.conv.bn
    return bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("kw", CBAM_CASES, ids=["default", "silu-hsig-bias-k3", "gelu-k5"])
def test_cbam_matches_timm(kw, layout):
    ours, theirs = _cbam_pair(kw)
    for train in (False, True, True):
        ours.train(train), theirs.train(train)
        ours.zero_grad(), theirs.zero_grad()
        _check_pair(ours, theirs, _x((2, 64, 9, 7), layout))
        (m_o, v_o, n_o), (m_t, v_t, n_t) = _bn_state(ours), _bn_state(theirs)
        assert n_o == n_t
        assert rel_err(m_o, m_t) <= OUT_TOL and rel_err(v_o, v_t) <= OUT_TOL
    assert n_o == 2


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cbam_resnet_sized(layout):
    """A ResNet-50 layer2-like shape (C=256, 28x28), training mode, fp32."""
    ours, theirs = _cbam_pair({}, C=256)
    _check_pair(ours, theirs, _x((1, 256, 28, 28), layout))
    (m_o, v_o, n_o), (m_t, v_t, n_t) = _bn_state(ours), _bn_state(theirs)
    assert n_o == n_t == 1 and rel_err(m_o, m_t) <= OUT_TOL and rel_err(v_o, v_t) <= OUT_TOL


def test_cbam_cumulative_momentum():
    """bn.momentum None: running stats are the cumulative average, as nn.BatchNorm2d."""
    ours, theirs = _cbam_pair({}, C=32)
    ours.spatial.conv.bn.momentum = theirs.spatial.conv.bn.momentum = None
    ours.train(), theirs.train()
    for _ in range(3):
        x = torch.randn(2, 32, 6, 6)
        assert rel_err(ours(x), theirs(x)) <= OUT_TOL
    (m_o, v_o, n_o), (m_t, v_t, n_t) = _bn_state(ours), _bn_state(theirs)
    assert n_o == n_t == 3
    assert rel_err(m_o, m_t) <= OUT_TOL and rel_err(v_o, v_t) <= OUT_TOL


def test_cbam_bn_mode_follows_bn():
    """A frozen BN (bn.eval() inside a training model) uses and keeps the running stats, as in timm."""
    ours, theirs = _cbam_pair({}, C=32)
    ours.train(), theirs.train()
    ours.spatial.conv.bn.eval(), theirs.spatial.conv.bn.eval()
    before = _bn_state(ours)
    x = torch.randn(2, 32, 6, 6)
    assert rel_err(ours(x), theirs(x)) <= OUT_TOL
    after = _bn_state(ours)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1]) and before[2] == after[2]


def test_cbam_from_timm_shares_parameters_and_buffers():
    theirs = _randomize_(TimmCbam(32, mlp_bias=True, spatial_kernel_size=5))
    theirs.spatial.conv.bn.momentum = 0.3
    assert CbamModule.is_convertible(theirs)
    ours = CbamModule.from_timm(theirs)
    sd_o, sd_t = ours.state_dict(keep_vars=True), theirs.state_dict(keep_vars=True)
    assert list(sd_o) == list(sd_t)
    for k in sd_o:
        assert sd_o[k] is sd_t[k], k
    assert ours.spatial.conv.bn.momentum == 0.3 and ours.spatial.conv.bn.eps == theirs.spatial.conv.bn.eps
    ref = copy.deepcopy(theirs)
    x = torch.randn(2, 32, 5, 5)
    assert rel_err(ours(x), ref(x)) <= OUT_TOL
    # A training step through ours updates timm's (shared) running stats like timm's own step.
    (m_s, v_s, n_s), (m_r, v_r, n_r) = _bn_state(theirs), _bn_state(ref)
    assert n_s == n_r == 1 and rel_err(m_s, m_r) <= OUT_TOL and rel_err(v_s, v_r) <= OUT_TOL


def test_cbam_state_dict_round_trip():
    ours, theirs = _cbam_pair(dict(mlp_bias=True), C=48)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    back = TimmCbam(48, mlp_bias=True).eval()
    back.load_state_dict(torch.load(io.BytesIO(buf.getvalue())), strict=True)
    ours.eval()
    x = torch.randn(1, 48, 6, 4)
    assert rel_err(ours(x), back(x)) <= OUT_TOL


@pytest.mark.parametrize("kw", [dict(spatial_kernel_size=4), dict(spatial_kernel_size=17), dict(act_layer="mish"),
                                dict(gate_layer="tanh")])
def test_cbam_unsupported_options(kw):
    with pytest.raises(ValueError, match="CbamModule"):
        CbamModule(32, **kw)


def test_cbam_is_convertible():
    assert CbamModule.is_convertible(TimmCbam(32))
    assert not CbamModule.is_convertible(TimmCbam(32, spatial_kernel_size=17))
    assert not CbamModule.is_convertible(LightCbamModule(32))
    assert not CbamModule.is_convertible(CbamModule(32))
    m = TimmCbam(32)
    m.spatial.gate = nn.Hardsigmoid()   # gates differ between the two branches
    assert not CbamModule.is_convertible(m)
    m = TimmCbam(32)
    m.spatial.conv.bn.act = nn.ReLU()
    assert not CbamModule.is_convertible(m)
    m = TimmCbam(32)
    m.channel.act = nn.Tanh()
    assert not CbamModule.is_convertible(m)
    with pytest.raises(ValueError):
        CbamModule.from_timm(m)


# fastops.optimize ------------------------------------------------------------------------------------

def _calibrated(model, shape=(2, 3, 64, 64)):
    """Random BN affine params and running stats taken from one batch, so eval activations stay O(1)."""
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
    return model.eval()


@pytest.mark.parametrize("name, kw, cls, timm_cls", [
    ("seresnet18", {}, SqueezeExcite, TimmSE),
    ("resnet18", dict(block_args=dict(attn_layer="cbam")), CbamModule, TimmCbam),
])
def test_optimize_timm_model(name, kw, cls, timm_cls):
    theirs = _calibrated(timm.create_model(name, pretrained=False, **kw))
    ref = copy.deepcopy(theirs)
    ours = fastops.optimize(theirs)
    assert ours is theirs
    assert sum(type(m) is cls for m in ours.modules()) == 8
    assert not any(type(m) is timm_cls for m in ours.modules())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        assert rel_err(ours(x), ref(x)) <= 1e-4
        ours.train(), ref.train()
        assert rel_err(ours(x), ref(x)) <= 1e-4
    for (k, b_o), b_r in zip(ours.named_buffers(), ref.buffers()):
        assert rel_err(b_o, b_r) <= 1e-4, k


def test_optimize_module_itself():
    assert type(fastops.optimize(TimmSE(16))) is SqueezeExcite
    assert type(fastops.optimize(TimmCbam(16))) is CbamModule
    plain = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())
    assert [type(m) for m in fastops.optimize(plain)] == [nn.Conv2d, nn.ReLU]
