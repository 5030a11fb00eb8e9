"""fastops.nn.WindowAttention / SwinTransformerBlock vs timm's Swin block: outputs and every gradient in
float64 (random bias tables, qkv biases and norms; odd H / W, shifts, non-square windows, windows larger
than the map, H / W other than input_resolution), window / shift clamping, stochastic depth, from_timm /
is_convertible, state_dicts, fused=False, bad arguments.

Runs on whatever backend ``auto`` (or FASTOPS_BACKEND) picks."""
import copy
import io

import pytest
import torch
import torch.nn as nn

import fastops.nn.window_attention as wa_mod
from fastops import backends
from fastops.nn.layers import DropPath
from fastops.nn.window_attention import SwinTransformerBlock, WindowAttention, relative_position_index

from ._util import count_calls, forbid_calls, rel_err

timm = pytest.importorskip("timm")
from timm.models import swin_transformer as ts  # noqa: E402

F64_TOL = 1e-10
F32_TOL = 1e-5


def _skip_unless_float64():
    forced = backends.forced_backend()
    why = forced and backends.reasons("window_attention", torch.zeros(1, 2, 2, 6, dtype=torch.float64), 2, 4)[forced]
    if why:
        pytest.skip(f"forced backend {forced!r} cannot run float64: {why}")


def _randomize_(module):
    """Non-trivial values everywhere (timm's init leaves biases 0, norms at identity, the table tiny)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.copy_(torch.randn_like(p))
            elif name.startswith("norm") and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.5))
    return module


def _timm_block(dtype=torch.float64, **kw):
    torch.manual_seed(0)
    return _randomize_(ts.SwinTransformerBlock(**kw)).to(dtype)


def _ours_like(theirs, **kw):
    """Our block built from the same constructor arguments, timm's weights loaded strictly."""
    ours = SwinTransformerBlock(**kw).to(next(theirs.parameters()).dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours


def _run(block, x, go):
    x = x.detach().clone().requires_grad_(True)
    block.zero_grad(set_to_none=True)
    out = block(x)
    out.backward(go)
    grads = {"x": x.grad}
    grads.update({k: p.grad for k, p in block.named_parameters()})
    return out.detach(), grads


def _check_block(ours, theirs, shape, tol, train=(False, True)):
    for mode in train:
        ours.train(mode), theirs.train(mode)
        x = torch.randn(shape, dtype=next(theirs.parameters()).dtype)
        go = torch.randn_like(x)
        out_t, g_t = _run(theirs, x, go)
        out_o, g_o = _run(ours, x, go)
        err = rel_err(out_o, out_t)
        assert err <= tol, f"train={mode} output rel err {err:.2e}"
        assert list(g_o) == list(g_t)
        for k in g_t:
            assert g_o[k] is not None, k
            err = rel_err(g_o[k], g_t[k])
            assert err <= tol, f"train={mode} grad {k}: rel err {err:.2e}"


# Blocks vs timm, float64 --------------------------------------------------------------------------------

BLOCK_CASES = {
    # odd map, both padding and shift: 9x11 -> padded 14x14, shift 3
    "odd-shift": (dict(dim=32, input_resolution=(9, 11), num_heads=2, window_size=7, shift_size=3), (2, 9, 11, 32)),
    "odd-noshift": (dict(dim=24, input_resolution=(9, 11), num_heads=3, window_size=7, shift_size=0), (1, 9, 11, 24)),
    # non-square window and shift, map not a window multiple in W
    "rect": (dict(dim=16, input_resolution=(7, 13), num_heads=2, window_size=(3, 5), shift_size=(1, 2)),
             (2, 7, 13, 16)),
    # window larger than the map in both dims, kept (always_partition) and shifted
    "big-window": (dict(dim=16, input_resolution=(5, 6), num_heads=2, window_size=7, shift_size=3,
                        always_partition=True), (1, 5, 6, 16)),
    # explicit head_dim (attention width != dim), no qkv bias
    "head-dim-no-bias": (dict(dim=20, input_resolution=(8, 8), num_heads=3, head_dim=8, window_size=4,
                              shift_size=2, qkv_bias=False), (2, 8, 8, 20)),
    # mask built from the actual H, W (timm dynamic_mask), map smaller than input_resolution
    "dynamic": (dict(dim=16, input_resolution=(14, 14), num_heads=2, window_size=(4, 6), shift_size=(2, 3),
                     dynamic_mask=True), (1, 11, 9, 16)),
}


@pytest.mark.parametrize("case", list(BLOCK_CASES))
def test_block_matches_timm_float64(case):
    """Eval and train: output and the gradient of x and every parameter (incl. the bias table and the qkv
    bias, which reaches padding tokens) equal timm's."""
    _skip_unless_float64()
    kw, shape = BLOCK_CASES[case]
    theirs = _timm_block(**kw)
    ours = _ours_like(theirs, **kw)
    assert (ours.window_size, ours.shift_size) == (tuple(theirs.window_size), tuple(theirs.shift_size))
    _check_block(ours, theirs, shape, F64_TOL)


@pytest.mark.parametrize("res, window, shift, part", [((7, 7), 7, 3, False), ((5, 9), 7, 3, False),
                                                    ((5, 9), (7, 4), (3, 2), False), ((5, 9), 7, 3, True),
                                                    ((8, 3), (6, 6), (3, 3), False)])
def test_window_shift_clamping_matches_timm(res, window, shift, part):
    kw = dict(dim=8, input_resolution=res, num_heads=2, window_size=window, shift_size=shift, always_partition=part)
    with torch.device("meta"):
        theirs = ts.SwinTransformerBlock(**kw)
        ours = SwinTransformerBlock(**kw)
    assert ours.window_size == tuple(theirs.window_size)
    assert ours.shift_size == tuple(theirs.shift_size) == ours.attn.shift_size
    assert ours.attn.window_size == tuple(theirs.attn.window_size)
    assert ours.attn.relative_position_bias_table.shape == theirs.attn.relative_position_bias_table.shape


def test_window_attention_module_matches_timm_attn():
    """WindowAttention(x, shift) on the normalised map == timm's SwinTransformerBlock._attn (float64)."""
    _skip_unless_float64()
    theirs = _timm_block(dim=24, input_resolution=(10, 13), num_heads=3, window_size=(4, 5), shift_size=(2, 2))
    attn = WindowAttention(24, 3, window_size=(4, 5)).double()
    attn.load_state_dict(theirs.attn.state_dict(), strict=True)
    y = theirs.norm1(torch.randn(2, 10, 13, 24, dtype=torch.float64)).detach()
    for shift in ((2, 2), (0, 0)):
        theirs.shift_size = shift
        theirs.attn_mask = theirs.get_attn_mask(device=y.device, dtype=y.dtype)
        ref = theirs._attn(y)
        assert rel_err(attn(y, shift), ref) <= F64_TOL
        attn.shift_size = shift
        assert rel_err(attn(y), ref) <= F64_TOL


def test_relative_position_index_matches_timm():
    for wh, ww in ((7, 7), (3, 5), (1, 4), (12, 12)):
        assert torch.equal(relative_position_index(wh, ww), ts.get_relative_position_index(wh, ww))


def test_block_float32_train_matches_timm():
    kw = dict(dim=48, input_resolution=(14, 14), num_heads=3, window_size=7, shift_size=3)
    theirs = _timm_block(torch.float32, **kw)
    ours = _ours_like(theirs, **kw)
    _check_block(ours, theirs, (2, 14, 14, 48), 1e-4, train=(True,))


def test_drop_path_matches_timm():
    """Stochastic depth in training: with the same seed the same samples are dropped (and rescaled)."""
    _skip_unless_float64()
    kw = dict(dim=16, input_resolution=(7, 7), num_heads=2, window_size=7, shift_size=0, drop_path=0.5)
    theirs = _timm_block(**kw)
    ours = _ours_like(theirs, **kw)
    assert isinstance(ours.drop_path1, DropPath) and ours.drop_path1.drop_prob == 0.5
    x = torch.randn(8, 7, 7, 16, dtype=torch.float64)
    go = torch.randn_like(x)
    torch.manual_seed(5)
    out_t, g_t = _run(theirs.train(), x, go)
    torch.manual_seed(5)
    out_o, g_o = _run(ours.train(), x, go)
    assert rel_err(out_o, out_t) <= F64_TOL
    for k in g_t:
        assert rel_err(g_o[k], g_t[k]) <= F64_TOL, k
    with torch.no_grad():  # eval: identity
        assert rel_err(ours.eval()(x), theirs.eval()(x)) <= F64_TOL


# fused flag, from_timm, is_convertible, state_dict --------------------------------------------------------

def test_fused_flag_selects_op(monkeypatch):
    """fused=True calls fastops.window_attention once per forward; fused=False never does (same result)."""
    calls = count_calls(monkeypatch, wa_mod, "window_attention")
    kw = dict(dim=16, input_resolution=(9, 9), num_heads=2, window_size=4, shift_size=2)
    theirs = _timm_block(torch.float32, **kw).eval()
    fused = _ours_like(theirs, **kw).eval()
    x = torch.randn(1, 9, 9, 16)
    with torch.no_grad():
        ref = theirs(x)
        assert rel_err(fused(x), ref) <= F32_TOL
    assert len(calls) == 1 and fused.fused

    forbid_calls(monkeypatch, wa_mod, "window_attention")
    plain = _ours_like(theirs, fused=False, **kw).eval()
    assert not plain.fused
    with torch.no_grad():
        assert rel_err(plain(x), ref) <= F32_TOL


def test_from_timm_shares_parameters():
    kw = dict(dim=32, input_resolution=(9, 11), num_heads=2, window_size=7, shift_size=3)
    theirs = _timm_block(torch.float32, **kw).eval()
    x = torch.randn(2, 9, 11, 32)
    with torch.no_grad():
        ref = theirs(x)
    assert SwinTransformerBlock.is_convertible(theirs) and WindowAttention.is_convertible(theirs.attn)
    ours = SwinTransformerBlock.from_timm(theirs)
    assert not ours.training and isinstance(ours.attn, WindowAttention) and ours.fused
    assert (ours.window_size, ours.shift_size, ours.attn.shift_size) == ((7, 7), (3, 3), (3, 3))
    p_o, p_t = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert list(p_o) == list(p_t) and all(p_o[k] is p_t[k] for k in p_t)
    assert ours.attn.relative_position_index is theirs.attn.relative_position_index
    assert list(ours.state_dict()) == list(theirs.state_dict())
    with torch.no_grad():
        assert rel_err(ours(x), ref) <= F32_TOL
    plain = SwinTransformerBlock.from_timm(theirs, fused=False)
    with torch.no_grad():
        assert not plain.fused and rel_err(plain(x), ref) <= F32_TOL


def test_is_convertible_rejects():
    assert not SwinTransformerBlock.is_convertible(SwinTransformerBlock(8, 7, num_heads=2))
    assert not SwinTransformerBlock.is_convertible(nn.Linear(3, 3))
    assert not WindowAttention.is_convertible(WindowAttention(8, 2))
    with torch.device("meta"):
        dropping = ts.SwinTransformerBlock(8, (7, 7), num_heads=2, attn_drop=0.1)
    assert not SwinTransformerBlock.is_convertible(dropping)
    with pytest.raises(ValueError, match="not a supported timm SwinTransformerBlock"):
        SwinTransformerBlock.from_timm(dropping)


def test_state_dict_and_meta_construction():
    """Keys / shapes equal timm's; relative_position_index is a non-persistent buffer; a block built on
    the meta device and loaded with assign=True runs."""
    kw = dict(dim=24, input_resolution=(10, 10), num_heads=3, window_size=(5, 3), shift_size=(2, 1))
    theirs = _timm_block(torch.float32, **kw).eval()
    with torch.device("meta"):
        ours = SwinTransformerBlock(**kw)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == \
           [(k, v.shape) for k, v in theirs.state_dict().items()]
    assert "attn.relative_position_index" not in ours.state_dict()
    ours.load_state_dict({k: v.clone() for k, v in theirs.state_dict().items()}, strict=True, assign=True)
    buf = io.BytesIO()
    torch.save(ours.state_dict(), buf)
    x = torch.randn(1, 10, 10, 24)
    with torch.no_grad():
        assert rel_err(ours.eval()(x), theirs(x)) <= F32_TOL


def test_set_input_size():
    kw = dict(dim=8, input_resolution=(14, 14), num_heads=2, window_size=7, shift_size=3)
    with torch.device("meta"):
        theirs, ours = ts.SwinTransformerBlock(**kw), SwinTransformerBlock(**kw)
    theirs.set_input_size((9, 20), (7, 7))
    ours.set_input_size((9, 20), (7, 7))
    assert (ours.input_resolution, ours.window_size, ours.shift_size) == \
           (tuple(theirs.input_resolution), tuple(theirs.window_size), tuple(theirs.shift_size))
    with pytest.raises(ValueError, match="window would change"):
        ours.set_input_size((5, 5), (7, 7))
    assert ours.input_resolution == (9, 20)


# Bad arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, match", [
    (dict(dim=8, num_heads=0), ValueError, "num_heads"),
    (dict(dim=8, num_heads=2, window_size=0), ValueError, "window_size"),
    (dict(dim=8, num_heads=2, window_size=(3, 4, 5)), TypeError, "window_size"),
    (dict(dim=8, num_heads=2, attn_drop=0.1), ValueError, "attn_drop"),
    (dict(dim=0, num_heads=1), ValueError, "dim"),
])
def test_window_attention_bad_args(kw, exc, match):
    with pytest.raises(exc, match=match):
        WindowAttention(**kw)


def test_bad_inputs_raise():
    attn = WindowAttention(8, 2, window_size=4)
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(2, 16, 8))
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(1, 4, 4, 6))
    with pytest.raises(ValueError, match="shift_size"):
        attn(torch.randn(1, 4, 4, 8), (4, 0))
    with pytest.raises(ValueError, match="shift_size"):
        WindowAttention(8, 2, window_size=4, fused=False)(torch.randn(1, 4, 4, 8), (0, 5))
    with pytest.raises(ValueError, match="shift_size"):
        SwinTransformerBlock(8, 16, num_heads=2, window_size=4, shift_size=4)
    with pytest.raises(ValueError, match="input_resolution"):
        SwinTransformerBlock(8, 0, num_heads=2)
    with pytest.raises(ValueError, match="x must be"):
        SwinTransformerBlock(8, 7, num_heads=2)(torch.randn(2, 49, 8))


def test_deepcopy_and_double():
    """Plain module semantics: deepcopy / dtype casts keep the index buffer usable."""
    m = SwinTransformerBlock(8, 6, num_heads=2, window_size=3, shift_size=1).eval()
    m2 = copy.deepcopy(m).double()
    assert m2.attn.relative_position_index.dtype == torch.int64
    x = torch.randn(1, 6, 6, 8)
    with torch.no_grad():
        assert rel_err(m2(x.double()), m(x)) <= F32_TOL


@pytest.mark.parametrize("fused", [True, False])
def test_residual_argument(fused):
    """attn(x, shift, residual=r) == r + attn(x, shift): in eval (fused: r added in proj's epilogue) and in
    training with proj_drop > 0 (the dropout applies to attn's output only, the same elements for one seed)."""
    attn = WindowAttention(16, 2, window_size=4, proj_drop=0.5, fused=fused)
    x, r = torch.randn(2, 9, 7, 16), torch.randn(2, 9, 7, 16)
    with torch.no_grad():
        attn.eval()
        assert rel_err(attn(x, 2, residual=r), attn(x, 2) + r) <= F32_TOL
        attn.train()
        torch.manual_seed(0)
        got = attn(x, 2, residual=r)
        torch.manual_seed(0)
        assert rel_err(got, attn(x, 2) + r) <= F32_TOL
