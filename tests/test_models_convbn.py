"""fastops.models ResNet-50, MobileNetV2 and DenseNet-121 (conv -> BN -> act through
fastops.nn.conv_bn_act_modules / fastops.nn.bn_act_module) vs timm, with timm's weights loaded strictly.

Per model: eval outputs (fused, fused channels_last, fused=False) at 64x64 and a non-square 64x96; one
float64 training step at 48x64 (output, loss, every parameter's gradient, every BN's running stats and
num_batches_tracked, with half the BNs on momentum=None, the cumulative average); how many fused calls a
forward makes and that residuals go into them (fused) or that no fastops op is called (fused=False);
stochastic depth in training (the residual then stays out of the call); state_dict keys, conv geometry, BN
settings and activations of one model of each MobileNetV2 / DenseNet variant kind (built on the meta device,
never run); kwargs.

Small inputs (batch 2, at most 64x96) keep the file to well under a minute of CPU time on a 2-core CPU.
"""
import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastops.nn as fnn
from fastops import backends
from fastops.models import create_model, list_models

from ._util import forbid_calls, rel_err

timm = pytest.importorskip("timm")

TOL = 1e-4
CL = torch.channels_last
MODELS = ("resnet50", "mobilenetv2_100", "densenet121")
# Structure checks: one of each way the generators differ (width only; width + depth with the stem and head
# fixed; the deep DenseNet stem). Keys of every registered name are also checked by test_models_resnet.py.
STRUCTURE_NAMES = ["mobilenetv2_050", "mobilenetv2_120d", "densenet121", "densenet264d"]


def _calibrate_(model, shape=(2, 3, 64, 64)):
    """Random BN affine parameters (timm zero-inits some of them) and running stats taken from one batch, so
    eval activations stay O(1); then every other BN gets momentum None (cumulative average) and the rest 0.1,
    and num_batches_tracked 7, so that a training step exercises both update rules."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for m in bns:
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)
            m.reset_running_stats()
            m.momentum = None
        model.train()(torch.randn(shape))
        for i, m in enumerate(bns):
            m.momentum = None if i % 2 else 0.1
            m.num_batches_tracked.fill_(7)
    return model.eval()


def _ours_from(theirs, name, fused=True, **kw):
    """Our model built on the meta device, then timm's state_dict loaded strictly (copies, not views) and
    timm's BN momenta copied (they are module attributes, not state)."""
    with torch.device("meta"):
        ours = create_model(name, fused=fused, **kw)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    mom = {k: m.momentum for k, m in theirs.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for k, m in ours.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = mom[k]
    return ours.train(theirs.training)


@functools.lru_cache(maxsize=None)
def _timm_model(name):
    """timm's model, seeded and calibrated, built once per name (the tests only read it or copy it)."""
    torch.manual_seed(0)
    return _calibrate_(timm.create_model(name, pretrained=False))


@pytest.mark.parametrize("name", MODELS)
def test_eval_matches_timm(name):
    theirs = _timm_model(name)
    ours = _ours_from(theirs, name)
    torch.manual_seed(1)
    x, x_ns = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ref, ref_ns = theirs(x), theirs(x_ns)
        assert ref.shape == ref_ns.shape == (2, 1000)
        err = rel_err(ours(x), ref)
        assert err <= TOL, f"64x64: rel err {err:.2e}"
        err = rel_err(ours(x_ns), ref_ns)
        assert err <= TOL, f"64x96: rel err {err:.2e}"
        ours_cl = copy.deepcopy(ours).to(memory_format=CL)
        err = rel_err(ours_cl(x_ns.contiguous(memory_format=CL)), ref_ns)
        assert err <= TOL, f"64x96 channels_last: rel err {err:.2e}"
        plain = _ours_from(theirs, name, fused=False)
        err = rel_err(plain(x_ns), ref_ns)
        assert err <= TOL, f"64x96 fused=False: rel err {err:.2e}"
        # The fused model runs in channels_last from the stem whatever the input's layout; the plain one keeps
        # the input's layout, as timm does.
        feats = ours.forward_features(x_ns)
        assert feats.is_contiguous(memory_format=CL) and not feats.is_contiguous()
        assert rel_err(feats, theirs.forward_features(x_ns)) <= TOL
        assert plain.forward_features(x_ns).is_contiguous()


def _train_step(model, x, y, seed=7):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same stochastic-depth draws for both models
    out = model(x)
    loss = F.cross_entropy(out, y)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}
    bufs = {k: b.detach().clone() for k, b in model.named_buffers()}
    return out.detach(), loss.detach(), grads, bufs


def _grad_err(k, g_o, g_t, grads_t):
    """Relative error of one gradient. A BN bias is measured against the larger of its own gradient and its
    module's weight gradient: in training mode a BN bias whose output reaches only train-mode BNs through
    linear ops (MobileNetV2's projection BNs bn3, the first block's bn2) has a gradient that is mathematically
    zero, and what both models compute there is rounding noise with no relative bound of its own."""
    denom = g_t.double().norm().item()
    if k.endswith(".bias") and k[:-len("bias")] + "weight" in grads_t and g_t.dim() == 1:
        denom = max(denom, grads_t[k[:-len("bias")] + "weight"].double().norm().item())
    if not torch.isfinite(g_o).all():
        return float("inf")
    return (g_o.double() - g_t.double()).norm().item() / (denom if denom > 0 else 1.0)


def _check_step(theirs, ours, x, y):
    out_t, loss_t, grads_t, bufs_t = _train_step(theirs, x, y)
    out_o, loss_o, grads_o, bufs_o = _train_step(ours, x.clone(), y)
    assert rel_err(out_o, out_t) <= TOL, f"output: rel err {rel_err(out_o, out_t):.2e}"
    assert rel_err(loss_o, loss_t) <= TOL
    assert list(bufs_o) == list(bufs_t) and list(grads_o) == list(grads_t)
    for k in bufs_t:
        if k.endswith("num_batches_tracked"):
            assert int(bufs_o[k]) == int(bufs_t[k]) == 8, k
        else:
            err = rel_err(bufs_o[k], bufs_t[k])
            assert err <= TOL, f"buffer {k}: rel err {err:.2e}"
    for k in grads_t:
        assert grads_o[k] is not None, k
        err = _grad_err(k, grads_o[k], grads_t[k], grads_t)
        assert err <= TOL, f"grad {k}: rel err {err:.2e}"


def _skip_unless_float64():
    forced = backends.forced_backend()
    x = torch.zeros(1, 8, 4, 4, dtype=torch.float64)
    why = forced and backends.reasons("conv_bias_act", x, torch.zeros(8, 8, 1, 1, dtype=torch.float64), 1)[forced]
    if why:
        pytest.skip(f"forced backend {forced!r} cannot run float64: {why}")


@pytest.mark.parametrize("name", MODELS)
def test_train_step_matches_timm(name):
    """One training step (48x64): output, loss, every gradient, every BN's running stats and
    num_batches_tracked (half the BNs momentum 0.1, half None). float64, as in test_models_resnet.py: in
    float32 any change of rounding flips ReLU / ReLU6 / max-pool decisions that train-mode BN on a small batch
    amplifies; seen here, timm against timm in channels_last differs by ~3e-2 (ResNet-50), ~2e-2
    (MobileNetV2) and ~2e-2 (DenseNet-121) in its worst gradients, so no float32 run of a whole network can
    be held to 1e-4 there. The fused kernels' own float32 accuracy is checked op by op in
    test_conv_bias_act.py / test_bn_act.py."""
    _skip_unless_float64()
    theirs = copy.deepcopy(_timm_model(name)).double()
    ours = _ours_from(theirs, name)
    torch.manual_seed(2)
    x, y = torch.randn(2, 3, 48, 64, dtype=torch.float64), torch.tensor([3, 977])
    _check_step(theirs, ours, x, y)


@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100"])
def test_train_step_drop_path_matches_timm(monkeypatch, name):
    """Stochastic depth active (drop_path_rate 0.3, same seed, float64): the residual must stay out of the
    fused call (the branch is scaled before the add) and the step still equals timm's."""
    _skip_unless_float64()
    small = dict(drop_path_rate=0.3)
    torch.manual_seed(0)
    theirs = _calibrate_(timm.create_model(name, pretrained=False, **small)).double()
    ours = _ours_from(theirs, name, **small)
    residuals = []
    real = fnn.conv_bn_act_modules

    def spy(x, conv, bn, act="relu", residual=None, **kw):
        residuals.append(residual is not None)
        return real(x, conv, bn, act=act, residual=residual, **kw)

    monkeypatch.setattr(fnn, "conv_bn_act_modules", spy)
    torch.manual_seed(3)
    # 32x32: the last stage's maps are 1x1, two values per BN channel in training, enough for a step.
    _check_step(theirs, ours, torch.randn(2, 3, 32, 32, dtype=torch.float64), torch.tensor([5, 6]))
    # only the first block has drop-path rate 0 (timm: rate * i / n): its residual may still go in.
    assert sum(residuals) <= 1, residuals


# Calls: name -> (conv_bn_act_modules calls, calls with a residual, bn_act_module calls, acts seen)
CALLS = {
    # stem 1 + 3 per bottleneck (16) + 4 downsamples; every bottleneck's last call takes the shortcut
    "resnet50": (53, 16, 0, {"relu", "none"}),
    # stem 1 + depthwise-separable 2 + 3 per inverted residual (16) + head 1; skips in 10 of the 16
    "mobilenetv2_100": (52, 10, 0, {"relu6", "none"}),
    # stem 1 + 1 per dense layer (58); bn_act: norm1 of each layer, 3 transitions, norm5
    "densenet121": (59, 0, 62, {"relu"}),
}


@pytest.mark.parametrize("name", MODELS)
def test_fused_calls_ops_plain_never(monkeypatch, name):
    """fused=True: the expected number of conv_bn_act_modules / bn_act_module calls, shortcuts passed as
    residual with act "none" (MobileNetV2) or "relu" (ResNet); fused=False: no call."""
    seen = {"cba": [], "ba": []}
    real_cba, real_ba = fnn.conv_bn_act_modules, fnn.bn_act_module

    def spy_cba(x, conv, bn, act="relu", residual=None, fold_cache=None):
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        assert fold_cache is not None  # eval folds once per weight change, not per call
        seen["cba"].append((act, residual is not None))
        return real_cba(x, conv, bn, act=act, residual=residual, fold_cache=fold_cache)

    def spy_ba(x, bn, act="relu", residual=None):
        seen["ba"].append((act, residual is not None))
        return real_ba(x, bn, act=act, residual=residual)

    monkeypatch.setattr(fnn, "conv_bn_act_modules", spy_cba)
    monkeypatch.setattr(fnn, "bn_act_module", spy_ba)
    with torch.device("meta"):
        fused = create_model(name).eval()
        plain = create_model(name, fused=False).eval()
    fused.to_empty(device="cpu")
    plain.to_empty(device="cpu")
    for m in (fused, plain):
        with torch.no_grad():
            for k, t in m.state_dict().items():
                if k.endswith("running_var"):
                    t.uniform_(0.5, 1.5)
                elif not k.endswith("num_batches_tracked"):
                    t.normal_(0.0, 0.05)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        fused(x)
    n_cba, n_res, n_ba, acts = CALLS[name]
    assert len(seen["cba"]) == n_cba and len(seen["ba"]) == n_ba
    assert sum(r for _, r in seen["cba"]) == n_res
    assert {a for a, _ in seen["cba"] + seen["ba"]} == acts
    res_act = {a for a, r in seen["cba"] if r}
    assert res_act <= ({"relu"} if name == "resnet50" else {"none"})

    forbid_calls(monkeypatch, fnn, "conv_bn_act_modules")
    forbid_calls(monkeypatch, fnn, "bn_act_module")
    with torch.no_grad():
        plain(x)


@pytest.mark.parametrize("name", STRUCTURE_NAMES)
def test_state_dict_keys_match_timm(name):
    """Keys, shapes, every conv's geometry, BN eps / momentum and the activation after each BN."""
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(name, pretrained=False)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]
    mods_t = dict(theirs.named_modules())
    for k, m in ours.named_modules():
        if isinstance(m, nn.Conv2d):
            t = mods_t[k]
            assert (m.stride, m.padding, m.dilation, m.groups) == (t.stride, t.padding, t.dilation, t.groups), k
        elif isinstance(m, nn.BatchNorm2d):
            t = mods_t[k]
            assert (m.eps, m.momentum) == (t.eps, t.momentum), k
            assert type(m.act) is type(t.act), k


def test_registry():
    assert set(STRUCTURE_NAMES) <= set(list_models())
    assert {"mobilenetv2_100", "mobilenetv2_050", "mobilenetv2_110d", "mobilenetv2_120d", "mobilenetv2_140",
            "densenet121", "densenet169", "densenet201", "densenet161"} <= set(list_models())


@pytest.mark.parametrize("name", ["mobilenetv2_050", "densenet121"])
def test_kwargs_match_timm(name):
    """num_classes, in_chans, drop_rate (inactive in eval); MobileNetV2 also bn_eps / bn_momentum."""
    kw = dict(num_classes=10, in_chans=1, drop_rate=0.5)
    if name.startswith("mobilenetv2"):
        kw.update(bn_eps=1e-3, bn_momentum=0.01)
    torch.manual_seed(0)
    theirs = _calibrate_(timm.create_model(name, pretrained=False, **kw), shape=(2, 1, 64, 64))
    ours = _ours_from(theirs, name, **kw)
    x = torch.randn(2, 1, 48, 64)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 10)
        assert rel_err(out, theirs(x)) <= TOL
    with torch.device("meta"):
        assert create_model(name, num_classes=0).classifier.__class__ is nn.Identity


@pytest.mark.parametrize("name, kw, exc", [
    ("mobilenetv2_100", dict(pretrained=True), ValueError),
    ("mobilenetv2_100", dict(output_stride=16), TypeError),
    ("mobilenetv2_100", dict(global_pool="max"), ValueError),
    ("mobilenetv2_100", dict(act_layer="mish"), ValueError),
    ("densenet121", dict(memory_efficient=True), TypeError),
    ("densenet121", dict(global_pool="max"), ValueError),
    ("densenet121", dict(pretrained=True), ValueError),
])
def test_unsupported_kwargs_raise(name, kw, exc):
    with torch.device("meta"), pytest.raises(exc):
        create_model(name, **kw)
