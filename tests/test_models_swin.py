"""fastops.models Swin Transformer vs timm.models.swin_transformer, with timm's weights loaded strictly.

Reduced-width / reduced-depth Swin-T configurations (every timm code path: shifted and unshifted blocks,
patch merging, padding when the map is not a window multiple) keep this fast: eval outputs at 224x224 and at
192x256 with strict_img_size=False (incl. non-square windows larger than the late-stage maps), one training
step (loss and the gradient of every parameter, with stochastic depth active and the same seed) in float32,
fastops.optimize on a timm model, the op being called (fused) or not (fused=False), kwargs, state_dict keys
of every registered name. One test runs the real swin_tiny_patch4_window7_224 at 224.
"""
import pytest
import torch
import torch.nn.functional as F

import fastops
import fastops.nn.window_attention as wa_mod
from fastops.nn import SwinTransformerBlock
from fastops.models import create_model, list_models

from ._util import count_calls, forbid_calls, rel_err

timm = pytest.importorskip("timm")

TOL = 1e-4
NAMES = ["swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "swin_base_patch4_window7_224",
         "swin_base_patch4_window12_384", "swin_large_patch4_window7_224", "swin_large_patch4_window12_384"]
TINY = "swin_tiny_patch4_window7_224"
SMALL = dict(embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 3, 4))
# two blocks per stage, the second shifted (unless its window is clamped to the whole map)
SHIFTS = dict(embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))


def _randomize_(model):
    """timm leaves biases 0, LayerNorms at identity and the bias tables tiny: give them real values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_(0, 0.5)
            elif p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _timm(name=TINY, **kw):
    torch.manual_seed(0)
    return _randomize_(timm.create_model(name, pretrained=False, **kw)).eval()


def _ours_from(theirs, name=TINY, fused=True, **kw):
    """Our model built on the meta device, then timm's state_dict loaded strictly (copies)."""
    with torch.device("meta"):
        ours = create_model(name, fused=fused, **kw)
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    return ours.train(theirs.training)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_match_timm(name):
    with torch.device("meta"):
        ours = create_model(name)
        theirs = timm.create_model(name, pretrained=False)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert ours.patch_embed.img_size == tuple(theirs.patch_embed.img_size)
    for s_o, s_t in zip(ours.layers, theirs.layers):
        for b_o, b_t in zip(s_o.blocks, s_t.blocks):
            assert (b_o.window_size, b_o.shift_size) == (tuple(b_t.window_size), tuple(b_t.shift_size))


def test_registry():
    assert set(NAMES) <= set(list_models())


def test_eval_matches_timm_224():
    theirs = _timm(**SHIFTS)
    ours = _ours_from(theirs, **SHIFTS)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ref = theirs(x)
        assert ref.shape == (1, 1000)
        err = rel_err(ours(x), ref)
    assert err <= TOL, f"rel err {err:.2e}"


@pytest.mark.parametrize("extra", [{}, dict(window_size=(7, 9), always_partition=True)],
                         ids=["clamped", "window7x9-always-partition"])
def test_eval_matches_timm_192x256(extra):
    """strict_img_size=False: maps 48x64 .. 6x8. Windows / shifts are those computed for img_size 224 (as in
    timm); with always_partition the 7x9 window covers more than the whole 6x8 last stage (padding and a
    shifted block there)."""
    kw = dict(SHIFTS, strict_img_size=False, **extra)
    theirs = _timm(**kw)
    ours = _ours_from(theirs, **kw)
    x = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        ref = theirs(x)
        err = rel_err(ours(x), ref)
    assert err <= TOL, f"rel err {err:.2e}"
    last = ours.layers[3].blocks[1]
    assert last.window_size == ((7, 9) if extra else (7, 7))
    assert last.shift_size == ((3, 4) if extra else (0, 0))


def test_train_step_matches_timm():
    """float32, train mode with stochastic depth (drop_path_rate 0.3, same seed for both): output, loss and
    the gradient of every parameter, the bias tables and qkv biases included. img_size 96: maps 24 and 12
    are padded to window multiples in shifted blocks, so the qkv biases also get padding-token gradients."""
    kw = dict(SHIFTS, drop_path_rate=0.3, img_size=96)
    theirs = _timm(**kw).train()
    ours = _ours_from(theirs, **kw).train()
    x, y = torch.randn(2, 3, 96, 96), torch.tensor([3, 977])
    results = []
    for model in (theirs, ours):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        out = model(x)
        loss = F.cross_entropy(out, y)
        loss.backward()
        results.append((out.detach(), loss.detach(), {k: p.grad for k, p in model.named_parameters()}))
    (out_t, loss_t, g_t), (out_o, loss_o, g_o) = results
    assert rel_err(out_o, out_t) <= TOL and rel_err(loss_o, loss_t) <= TOL
    assert list(g_o) == list(g_t)
    assert sum(k.endswith("relative_position_bias_table") for k in g_t) == 8
    for k in g_t:
        assert g_o[k] is not None, k
        err = rel_err(g_o[k], g_t[k])
        assert err <= TOL, f"grad {k}: rel err {err:.2e}"


def test_fused_calls_op_plain_never(monkeypatch):
    calls = count_calls(monkeypatch, wa_mod, "window_attention")
    kw = dict(SMALL, img_size=64)
    theirs = _timm(**kw)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = theirs(x)
        assert rel_err(_ours_from(theirs, **kw)(x), ref) <= TOL
    assert len(calls) == sum(SMALL["depths"])

    forbid_calls(monkeypatch, wa_mod, "window_attention")
    with torch.no_grad():
        assert rel_err(_ours_from(theirs, fused=False, **kw)(x), ref) <= TOL


def test_optimize_timm_swin():
    """fastops.optimize swaps every timm SwinTransformerBlock (parameters shared), outputs unchanged."""
    kw = dict(SHIFTS, strict_img_size=False)
    model = _timm(**kw)
    x = torch.randn(1, 3, 160, 224)
    with torch.no_grad():
        ref = model(x)
    params = {k: p for k, p in model.named_parameters()}
    keys = list(model.state_dict())
    model = fastops.optimize(model)
    blocks = [m for m in model.modules() if type(m).__name__ == "SwinTransformerBlock"]
    assert len(blocks) == 8 and all(isinstance(b, SwinTransformerBlock) for b in blocks)
    assert list(model.state_dict()) == keys
    assert all(p is params[k] for k, p in model.named_parameters())
    with torch.no_grad():
        err = rel_err(model(x), ref)
    assert err <= TOL, f"rel err {err:.2e}"


def test_kwargs_match_timm():
    """num_classes, in_chans, img_size, per-stage window sizes, head_dim, mlp_ratio, qkv_bias, drop_rate."""
    kw = dict(embed_dim=16, depths=(2, 1, 2, 1), num_heads=(2, 2, 4, 4), num_classes=10, in_chans=1, img_size=96,
              window_size=((4, 6), 3, 3, 2), head_dim=8, mlp_ratio=2.0, qkv_bias=False, drop_rate=0.5)
    theirs = _timm(**kw)
    ours = _ours_from(theirs, **kw)
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        out = ours(x)
        assert out.shape == (2, 10)
        assert rel_err(out, theirs(x)) <= TOL
        assert rel_err(ours.forward_head(ours.forward_features(x), pre_logits=True),
                       theirs.forward_head(theirs.forward_features(x), pre_logits=True)) <= TOL
    with torch.device("meta"):
        headless = create_model(TINY, num_classes=0)
    assert isinstance(headless.head.fc, torch.nn.Identity) and headless.num_features == 768
    assert ours.no_weight_decay() == theirs.no_weight_decay()


@pytest.mark.parametrize("kw, exc", [(dict(pretrained=True), ValueError), (dict(embed_layer=None), TypeError),
                                     (dict(norm_layer="rmsnorm"), TypeError), (dict(foo=1), TypeError),
                                     (dict(attn_drop_rate=0.1), ValueError), (dict(global_pool="max"), ValueError)])
def test_unsupported_kwargs_raise(kw, exc):
    with torch.device("meta"), pytest.raises(exc):
        create_model(TINY, **kw)


def test_strict_img_size():
    model = create_model(TINY, **SMALL).eval()
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 192, 224))
    model = create_model(TINY, strict_img_size=False, **SMALL).eval()
    with pytest.raises(ValueError, match="patch size"):
        model(torch.randn(1, 3, 190, 224))


def test_real_swin_tiny_224():
    """The real Swin-T (28M parameters) at 224x224, eval, timm's randomized weights loaded unchanged."""
    theirs = _timm()
    ours = _ours_from(theirs)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        err = rel_err(ours(x), theirs(x))
    assert err <= TOL, f"rel err {err:.2e}"
