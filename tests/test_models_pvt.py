"""fastops.models PVTv2 vs timm.models.pvt_v2, with timm's weights loaded strictly.

Eval outputs of the real pvt_v2_b0 and pvt_v2_b2_li at 224x224 and at a non-square size (160x224, and for b0
an odd one, 150x200, whose maps are not multiples of the reduction ratios), one training step of each at a
smaller non-square size (output, loss and the gradient of every parameter, stochastic depth active with
the same seed), float32; the ops being
called (fused) or not (fused=False); kwargs; state_dict keys of every registered name (built on the meta
device, never run).
"""
import functools

import pytest
import torch

import fastops.nn.pvt as pvt_mod
from fastops.models import create_model, list_models

from ._util import count_calls, forbid_calls, rel_err

timm = pytest.importorskip("timm")

TOL = 1e-4
NAMES = ["pvt_v2_b0", "pvt_v2_b1", "pvt_v2_b2", "pvt_v2_b3", "pvt_v2_b4", "pvt_v2_b5", "pvt_v2_b2_li"]
OPS = ("spatial_reduction", "sr_attention", "conv_bias_act", "depthwise_conv2d")


def _randomize_(model):
    """timm leaves biases 0 and LayerNorms at identity: give them real values."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _timm(name, **kw):
    torch.manual_seed(0)
    return _randomize_(timm.create_model(name, pretrained=False, **kw)).eval()


def _ours_from(theirs, name, fused=True, **kw):
    """Our model built on the meta device, then timm's state_dict loaded strictly (copies)."""
    with torch.device("meta"):
        ours = create_model(name, fused=fused, **kw)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    return ours.train(theirs.training)


@functools.lru_cache(maxsize=None)
def _eval_pair(name):
    """(timm, ours) in eval mode with the same weights, built once per name for the eval tests."""
    theirs = _timm(name)
    return theirs, _ours_from(theirs, name)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_match_timm(name):
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(name, pretrained=False)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]
    for s_o, s_t in zip(ours.stages, theirs.stages):
        for b_o, b_t in zip(s_o.blocks, s_t.blocks):
            a_o, a_t = b_o.attn, b_t.attn
            assert (a_o.num_heads, a_o.scale, a_o.linear) == (a_t.num_heads, a_t.scale, a_t.pool is not None)
            assert (a_o.sr is None) == (a_t.sr is None)
            assert type(b_o.mlp.relu) is type(b_t.mlp.relu)
            assert (b_o.norm1.eps, b_o.norm2.eps, a_o.norm and a_o.norm.eps) == \
                   (b_t.norm1.eps, b_t.norm2.eps, a_t.norm and a_t.norm.eps)
        assert s_o.norm.eps == s_t.norm.eps


def test_registry():
    assert set(NAMES) <= set(list_models())


@pytest.mark.parametrize("name, shape", [
    ("pvt_v2_b0", (1, 3, 224, 224)),
    ("pvt_v2_b0", (2, 3, 160, 224)),
    # maps 38x50 .. 5x7: no stage's map is a multiple of its reduction ratio
    ("pvt_v2_b0", (1, 3, 150, 200)),
    ("pvt_v2_b2_li", (1, 3, 224, 224)),
    ("pvt_v2_b2_li", (1, 3, 160, 224)),
], ids=["b0-224", "b0-160x224", "b0-150x200", "b2_li-224", "b2_li-160x224"])
def test_eval_matches_timm(name, shape):
    theirs, ours = _eval_pair(name)
    x = torch.randn(shape)
    with torch.no_grad():
        ref = theirs(x)
        assert ref.shape == (shape[0], 1000)
        err = rel_err(ours(x), ref)
    assert err <= TOL, f"rel err {err:.2e}"


@pytest.mark.parametrize("name, shape", [("pvt_v2_b0", (2, 3, 160, 128)), ("pvt_v2_b2_li", (2, 3, 96, 64))],
                         ids=["b0-160x128", "b2_li-96x64"])
def test_train_step_matches_timm(name, shape):
    """float32, train mode with stochastic depth (drop_path_rate 0.2, same seed for both): output, loss and
    the gradient of every parameter."""
    theirs = _timm(name, drop_path_rate=0.2).train()
    ours = _ours_from(theirs, name, drop_path_rate=0.2).train()
    x, y = torch.randn(shape), torch.tensor([3, 977])
    results = []
    for model in (theirs, ours):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = model(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        loss.backward()
        results.append((out.detach(), loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (out_t, loss_t, g_t), (out_o, loss_o, g_o) = results
    assert rel_err(out_o, out_t) <= TOL and rel_err(loss_o, loss_t) <= TOL
    assert list(g_o) == list(g_t)
    for k in g_t:
        assert g_o[k] is not None, k
        err = rel_err(g_o[k], g_t[k])
        assert err <= TOL, f"grad {k}: rel err {err:.2e}"


SMALL = dict(depths=(1, 1, 1, 1), embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 4))


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_fused_calls_ops_plain_never(monkeypatch, name):
    """fused=True: per block one sr_attention and one conv_bias_act (the MLP's depthwise conv + GELU), one
    spatial_reduction per block that reduces (all of them in linear mode, none in the last, sr_ratio 1, stage
    otherwise); fused=False: none of them."""
    calls = {n: count_calls(monkeypatch, pvt_mod, n) for n in OPS}
    theirs = _timm(name, **SMALL)
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        ref = theirs(x)
        assert rel_err(_ours_from(theirs, name, **SMALL)(x), ref) <= TOL
    linear = name.endswith("_li")
    assert {n: len(c) for n, c in calls.items()} == \
           {"spatial_reduction": 4 if linear else 3, "sr_attention": 4, "conv_bias_act": 4,
            "depthwise_conv2d": 0}

    for n in OPS:
        forbid_calls(monkeypatch, pvt_mod, n)
    with torch.no_grad():
        assert rel_err(_ours_from(theirs, name, fused=False, **SMALL)(x), ref) <= TOL


def test_kwargs_match_timm():
    """num_classes, in_chans, sr_ratios, mlp_ratios, qkv_bias, drop_rate, global_pool, pre_logits."""
    kw = dict(depths=(1, 2, 1, 1), embed_dims=(16, 24, 32, 48), num_heads=(2, 3, 4, 6), sr_ratios=(4, 3, 1, 1),
              mlp_ratios=(2, 3, 4, 1.5), qkv_bias=False, num_classes=10, in_chans=1, drop_rate=0.5)
    theirs = _timm("pvt_v2_b0", **kw)
    ours = _ours_from(theirs, "pvt_v2_b0", **kw)
    x = torch.randn(2, 1, 112, 80)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 10)
        assert rel_err(out, theirs(x)) <= TOL
        assert rel_err(ours.forward_head(ours.forward_features(x), pre_logits=True),
                       theirs.forward_head(theirs.forward_features(x), pre_logits=True)) <= TOL
        feats = ours.forward_features(x)
        assert feats.shape == (2, 48, 4, 3) and feats.is_contiguous()
    nopool = dict(kw, global_pool="", num_classes=0)
    theirs, ours = _timm("pvt_v2_b0", **nopool), None
    ours = _ours_from(theirs, "pvt_v2_b0", **nopool)
    with torch.no_grad():
        assert rel_err(ours(x), theirs(x)) <= TOL
    with torch.device("meta"):
        headless = create_model("pvt_v2_b2", num_classes=0)
    assert isinstance(headless.head, torch.nn.Identity) and headless.num_features == 512
    ours.reset_classifier(7, "avg")
    assert ours.get_classifier().out_features == 7 and ours(x).shape == (2, 7)


@pytest.mark.parametrize("kw, exc", [(dict(pretrained=True), ValueError), (dict(norm_layer=None), TypeError),
                                     (dict(foo=1), TypeError), (dict(attn_drop_rate=0.1), ValueError),
                                     (dict(global_pool="max"), ValueError), (dict(num_heads=(1, 2)), ValueError)])
def test_unsupported_kwargs_raise(kw, exc):
    with torch.device("meta"), pytest.raises(exc):
        create_model("pvt_v2_b0", **kw)


def test_too_small_input_raises():
    """Stage 0 reduces by 8: a 28x28 image (7x7 map) leaves no key/value token, a clear error."""
    model = create_model("pvt_v2_b0", **SMALL).eval()
    with torch.no_grad(), pytest.raises(ValueError, match="sr_ratio"):
        model(torch.randn(1, 3, 28, 28))
