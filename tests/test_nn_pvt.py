"""fastops.nn.SRAttention / MlpWithDepthwiseConv vs timm's pvt_v2.Attention / MlpWithDepthwiseConv: outputs and
the gradient of x and every parameter (random weights, non-trivial LayerNorm affine), eval and train, sr_ratio
1 / 2 / 4 / 8 and linear mode, odd maps (13x11, 29x17, maps smaller than the 7x7 pool, one key/value token);
the token-layout depthwise conv without copies; fastops.optimize on timm PVTv2 models; from_timm /
is_convertible; state_dicts; fused=False; bad arguments.

The comparisons run on the backend chosen by default (``auto`` or FASTOPS_BACKEND; float64 against timm in
float64) and, forced, on ``cpu`` (float64) and ``triton`` under its interpreter (float32 against timm in
float64, smaller cases); a backend that cannot run the ops here is skipped with the registry's reason."""
import contextlib
import io

import pytest
import torch
import torch.nn as nn

import fastops
import fastops.nn.layers as layers_mod
import fastops.nn.pvt as pvt_mod
from fastops import backends
from fastops.nn import DepthwiseConv2d, MlpWithDepthwiseConv, SRAttention

from ._util import INTERPRET, count_calls, forbid_calls, rel_err

timm = pytest.importorskip("timm")
from timm.models import pvt_v2 as tp  # noqa: E402

F64_TOL = 1e-10
F32_TOL = 1e-5

# (constructor kwargs, (B, H, W))
ATTN_CASES = {
    "sr1": (dict(dim=32, num_heads=2, sr_ratio=1), (2, 13, 11)),
    # head_dim 8; the 13x11 map's last row and column are not read by the stride-2 conv
    "sr2": (dict(dim=40, num_heads=5, sr_ratio=2), (2, 13, 11)),
    "sr4": (dict(dim=24, num_heads=3, sr_ratio=4), (1, 29, 17)),
    "sr8": (dict(dim=32, num_heads=1, sr_ratio=8), (2, 29, 17)),
    # two key/value tokens, no q / kv bias
    "sr8-two-tokens-no-bias": (dict(dim=16, num_heads=2, sr_ratio=8, qkv_bias=False), (2, 9, 16)),
    "linear": (dict(dim=32, num_heads=2, linear_attn=True), (2, 29, 17)),
    # map smaller than the 7x7 pool: bins repeat rows / columns
    "linear-small-map": (dict(dim=24, num_heads=3, linear_attn=True), (1, 5, 6)),
}
# The Triton interpreter runs every program in Python: smaller maps there, the same code paths (no reduction,
# a reduction dropping the last row / column, two key/value tokens, a pool with repeated bins).
TRITON_ATTN_SHAPES = {"sr1": (1, 7, 6), "sr2": (1, 7, 5), "sr8-two-tokens-no-bias": (1, 8, 16),
                      "linear-small-map": (1, 5, 6)}

# (in_features, hidden, extra_relu, (B, H, W))
MLP_CASES = {
    "13x11": (16, 40, False, (2, 13, 11)),
    "29x17-relu": (24, 48, True, (1, 29, 17)),
    "1x7": (8, 12, False, (2, 1, 7)),
    "1x1": (8, 12, True, (3, 1, 1)),
}
TRITON_MLP_SHAPES = {"13x11": (1, 5, 7), "1x7": (1, 1, 7)}

BACKEND_PARAMS = [
    pytest.param(None, id="default"),
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton-interpret",
                 marks=pytest.mark.skipif(not INTERPRET, reason="interpreter off (GPU present)")),
]


def _dtype_for(backend):
    """float64 where the backend computes it (the kernels' own error then shows alone); the Triton kernels
    take float32 (compared with timm in float64)."""
    return torch.float32 if (backend or backends.forced_backend()) == "triton" else torch.float64


def _skip_unless_runs(backend, dtype, dim=16, num_heads=2, ops=("sr_attention", "spatial_reduction",
                                                                   "depthwise_conv2d")):
    """Skip, with the registry's reason, when `backend` (None: the default choice) cannot run one of the ops
    the modules call for these inputs."""
    name = backend or backends.forced_backend()
    if name is None:
        return
    x = torch.zeros(1, 4, dim, dtype=dtype)
    args = {"sr_attention": (x, dim // num_heads, 4), "spatial_reduction": (x, dim),
            "depthwise_conv2d": (torch.zeros(1, dim, 2, 2, dtype=dtype), torch.zeros(dim, 1, 3, 3, dtype=dtype),
                                 None)}
    for op in ops:
        why = backends.reasons(op, *args[op])[name]
        if why is not None:
            pytest.skip(f"{name} cannot run {op}: {why}")


def _backend(backend):
    """Force `backend`; None leaves the default choice (auto, or FASTOPS_BACKEND) in place."""
    return fastops.use_backend(backend) if backend is not None else contextlib.nullcontext()


def _randomize_(module):
    """Non-trivial values everywhere (timm's init leaves biases 0 and LayerNorms at identity)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.5 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * p[0].numel() ** -0.5)
    return module


def _run(module, x, feat_size, go):
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, feat_size)
    out.backward(go)
    grads = {"x": x.grad}
    grads.update({k: p.grad for k, p in module.named_parameters()})
    return out.detach(), grads


def _compare(ours, theirs, shape, dtype, tol, modes=(False, True)):
    """ours (in `dtype`) and theirs (float64): output and every gradient in eval and train mode."""
    B, H, W = shape
    C = next(theirs.parameters()).shape[-1]
    for train in modes:
        ours.train(train), theirs.train(train)
        x = torch.randn(B, H * W, C, dtype=torch.float64)
        go = torch.randn(B, H * W, C, dtype=torch.float64)
        out_t, g_t = _run(theirs, x, (H, W), go)
        out_o, g_o = _run(ours, x.to(dtype), (H, W), go.to(dtype))
        assert out_o.dtype == dtype
        err = rel_err(out_o, out_t)
        assert err <= tol, f"train={train} output: rel err {err:.2e}"
        assert list(g_o) == list(g_t)
        for k in g_t:
            assert g_o[k] is not None, k
            err = rel_err(g_o[k], g_t[k])
            assert err <= tol, f"train={train} grad {k}: rel err {err:.2e}"


def _timm_attn(**kw):
    torch.manual_seed(0)
    return _randomize_(tp.Attention(**kw)).double()


def _timm_mlp(in_features, hidden, extra_relu):
    torch.manual_seed(0)
    return _randomize_(tp.MlpWithDepthwiseConv(in_features, hidden, extra_relu=extra_relu)).double()


# Modules vs timm -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", list(ATTN_CASES))
def test_attention_matches_timm(backend, case):
    """SRAttention (constructed, timm's state_dict loaded strictly) == timm's Attention: eval and train,
    output and the gradient of x and of every parameter (q, kv, proj, sr conv, LayerNorm)."""
    kw, shape = ATTN_CASES[case]
    if backend == "triton":
        if case not in TRITON_ATTN_SHAPES:
            pytest.skip("slow under the Triton interpreter; the smaller cases cover the same paths")
        shape = TRITON_ATTN_SHAPES[case]
    dtype = _dtype_for(backend)
    _skip_unless_runs(backend, dtype, kw["dim"], kw["num_heads"])
    theirs = _timm_attn(**kw)
    ours = SRAttention(**kw).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with _backend(backend):
        _compare(ours, theirs, shape, dtype, F64_TOL if dtype == torch.float64 else F32_TOL)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("case", list(MLP_CASES))
def test_mlp_matches_timm(backend, case):
    """MlpWithDepthwiseConv == timm's, eval and train, incl. 1-row and 1x1 maps and the extra ReLU."""
    cin, hidden, relu, shape = MLP_CASES[case]
    if backend == "triton":
        if case not in TRITON_MLP_SHAPES:
            pytest.skip("slow under the Triton interpreter; the smaller cases cover the same paths")
        shape = TRITON_MLP_SHAPES[case]
    dtype = _dtype_for(backend)
    _skip_unless_runs(backend, dtype, hidden, 1, ops=("depthwise_conv2d",))
    theirs = _timm_mlp(cin, hidden, relu)
    ours = MlpWithDepthwiseConv(cin, hidden, extra_relu=relu).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    with _backend(backend):
        _compare(ours, theirs, shape, dtype, F64_TOL if dtype == torch.float64 else F32_TOL)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_attention_one_key_token(backend):
    """sr_ratio 8 on an 8x9 map leaves one key/value token: every query's output is its v, so q gets no
    gradient (zero up to rounding in timm too); everything else must match."""
    dtype = _dtype_for(backend)
    _skip_unless_runs(backend, dtype, 16, 2)
    theirs = _timm_attn(dim=16, num_heads=2, sr_ratio=8)
    ours = SRAttention(16, 2, sr_ratio=8).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 72, 16, dtype=torch.float64)
    go = torch.randn_like(x)
    out_t, g_t = _run(theirs.train(), x, (8, 9), go)
    with _backend(backend):
        out_o, g_o = _run(ours.train(), x.to(dtype), (8, 9), go.to(dtype))
    tol = F64_TOL if dtype == torch.float64 else F32_TOL
    assert rel_err(out_o, out_t) <= tol
    for k in g_t:
        if k.startswith("q."):
            assert g_o[k].abs().max() <= tol * g_t["x"].abs().max(), k
        else:
            assert rel_err(g_o[k], g_t[k]) <= tol, k


def test_block_float32_train_matches_timm():
    """A whole timm Block in float32 with both modules swapped in (from_timm): output and every gradient."""
    _skip_unless_runs(None, torch.float32, 64, 2)
    torch.manual_seed(0)
    theirs = _randomize_(tp.Block(64, 2, mlp_ratio=4, sr_ratio=4, qkv_bias=True))
    ours = _randomize_(tp.Block(64, 2, mlp_ratio=4, sr_ratio=4, qkv_bias=True))
    ours.load_state_dict(theirs.state_dict())
    ours.attn = SRAttention.from_timm(ours.attn)
    ours.mlp = MlpWithDepthwiseConv.from_timm(ours.mlp)
    x = torch.randn(2, 28 * 20, 64)
    go = torch.randn_like(x)
    out_t, g_t = _run(theirs.train(), x, (28, 20), go)
    out_o, g_o = _run(ours.train(), x, (28, 20), go)
    assert rel_err(out_o, out_t) <= 1e-4
    assert list(g_o) == list(g_t)
    for k in g_t:
        err = rel_err(g_o[k], g_t[k])
        assert err <= 1e-4, f"grad {k}: rel err {err:.2e}"


@pytest.mark.parametrize("act_layer, op", [(nn.GELU, "conv_bias_act"), (nn.Tanh, "depthwise_conv2d")],
                         ids=["gelu-in-epilogue", "tanh-after"])
def test_mlp_depthwise_reads_tokens_in_place(monkeypatch, act_layer, op):
    """The fused MLP hands its conv (fastops.conv_bias_act with the activation in the epilogue when the act has
    a fused form, else fastops.depthwise_conv2d) a channels_last view of fc1's output (same storage, no copy),
    and fc2 gets contiguous (B, N, C) tokens back (a view of the conv's channels_last output)."""
    seen = {}
    real = getattr(pvt_mod, op)

    def spy(x, *args, **kwargs):
        out = real(x, *args, **kwargs)
        seen.update(x=x, out=out, args=args)
        return out

    monkeypatch.setattr(pvt_mod, op, spy)
    mlp = MlpWithDepthwiseConv(16, 24, act_layer=act_layer).eval()
    linears = []  # (module, input, output) of each fused Linear call
    real_linear = layers_mod.linear_act

    def linear_spy(x, linear, act="none", residual=None):
        out = real_linear(x, linear, act, residual)
        linears.append((linear, x, out))
        return out

    monkeypatch.setattr(pvt_mod, "linear_act", linear_spy)
    monkeypatch.setattr(layers_mod, "linear_act", linear_spy)  # fc2, through linear_drop_add
    x_in = torch.randn(2, 9 * 7, 16)
    with torch.no_grad():
        y = mlp(x_in, (9, 7))
    fc1_out = [o for m, _, o in linears if m is mlp.fc1]
    fc2_in = [i for m, i, _ in linears if m is mlp.fc2]
    x, out = seen["x"], seen["out"]
    assert x.shape == (2, 24, 9, 7) and x.is_contiguous(memory_format=torch.channels_last)
    assert x.data_ptr() == fc1_out[0].data_ptr()
    assert out.is_contiguous(memory_format=torch.channels_last)
    if op == "conv_bias_act":
        assert seen["args"][-1] == "gelu"
    # the activation keeps the strides, so fc2's input is contiguous tokens in the conv output's storage order
    assert fc2_in[0].shape == (2, 63, 24) and fc2_in[0].is_contiguous()
    plain = MlpWithDepthwiseConv(16, 24, act_layer=act_layer, fused=False).eval()
    plain.load_state_dict(mlp.state_dict())
    with torch.no_grad():
        assert rel_err(y, plain(x_in, (9, 7))) <= F32_TOL


# fused flag, from_timm, is_convertible, state_dict --------------------------------------------------------

@pytest.mark.parametrize("kw, reduces", [(dict(sr_ratio=4), True), (dict(linear_attn=True), True),
                                         (dict(sr_ratio=1), False)], ids=["sr4", "linear", "sr1"])
def test_fused_flag_selects_ops(monkeypatch, kw, reduces):
    """fused=True calls fastops.spatial_reduction (when the module reduces), fastops.sr_attention and
    fastops.conv_bias_act (the MLP's depthwise conv + GELU) once each; fused=False calls none of them (same
    results)."""
    _skip_unless_runs(None, torch.float32, 32, 2)
    calls = {n: count_calls(monkeypatch, pvt_mod, n) for n in ("spatial_reduction", "sr_attention",
                                                                "conv_bias_act")}
    t_attn = _randomize_(tp.Attention(32, 2, **kw)).eval()
    t_mlp = _randomize_(tp.MlpWithDepthwiseConv(32, 64, extra_relu=kw.get("linear_attn", False))).eval()
    x = torch.randn(2, 16 * 12, 32)
    with torch.no_grad():
        ref_a, ref_m = t_attn(x, (16, 12)), t_mlp(x, (16, 12))
        attn, mlp = SRAttention.from_timm(t_attn), MlpWithDepthwiseConv.from_timm(t_mlp)
        assert attn.fused and mlp.fused
        assert rel_err(attn(x, (16, 12)), ref_a) <= F32_TOL
        assert rel_err(mlp(x, (16, 12)), ref_m) <= F32_TOL
    assert {n: len(c) for n, c in calls.items()} == \
           {"spatial_reduction": int(reduces), "sr_attention": 1, "conv_bias_act": 1}

    for n in tuple(calls) + ("depthwise_conv2d",):
        forbid_calls(monkeypatch, pvt_mod, n)
    with torch.no_grad():
        attn, mlp = SRAttention.from_timm(t_attn, fused=False), MlpWithDepthwiseConv.from_timm(t_mlp, fused=False)
        assert not attn.fused and not mlp.fused
        assert rel_err(attn(x, (16, 12)), ref_a) <= F32_TOL
        assert rel_err(mlp(x, (16, 12)), ref_m) <= F32_TOL


@pytest.mark.parametrize("kw", [dict(sr_ratio=1), dict(sr_ratio=8), dict(linear_attn=True),
                                dict(sr_ratio=2, qkv_bias=False)], ids=["sr1", "sr8", "linear", "sr2-no-bias"])
def test_attention_from_timm_shares_parameters(kw):
    _skip_unless_runs(None, torch.float32, 32, 4)
    theirs = _randomize_(tp.Attention(32, 4, **kw)).eval()
    assert SRAttention.is_convertible(theirs)
    ours = SRAttention.from_timm(theirs)
    assert not ours.training and ours.fused and ours.linear == kw.get("linear_attn", False)
    p_o, p_t = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert list(p_o) == list(p_t) and all(p_o[k] is p_t[k] for k in p_t)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(2, 16 * 24, 32)
    with torch.no_grad():
        assert rel_err(ours(x, (16, 24)), theirs(x, (16, 24))) <= F32_TOL


def test_mlp_from_timm_shares_parameters():
    theirs = _randomize_(tp.MlpWithDepthwiseConv(16, 32, extra_relu=True)).train()
    assert MlpWithDepthwiseConv.is_convertible(theirs)
    ours = MlpWithDepthwiseConv.from_timm(theirs)
    assert ours.training and ours.fused
    p_o, p_t = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert list(p_o) == list(p_t) and all(p_o[k] is p_t[k] for k in p_t)
    # a dwconv already swapped for fastops' DepthwiseConv2d is accepted too
    theirs.dwconv = DepthwiseConv2d.from_conv(theirs.dwconv)
    assert MlpWithDepthwiseConv.is_convertible(theirs)
    assert MlpWithDepthwiseConv.from_timm(theirs).dwconv is theirs.dwconv


def test_is_convertible_rejects():
    with torch.device("meta"):
        dropping = tp.Attention(16, 2, sr_ratio=2, attn_drop=0.1)
        plain = tp.Attention(16, 2, sr_ratio=2)
        mlp = tp.MlpWithDepthwiseConv(16, 32)
    assert SRAttention.is_convertible(plain) and MlpWithDepthwiseConv.is_convertible(mlp)
    assert not SRAttention.is_convertible(dropping)
    with pytest.raises(ValueError, match="not a supported timm pvt_v2.Attention"):
        SRAttention.from_timm(dropping)
    # our own modules and unrelated ones are not timm's
    assert not SRAttention.is_convertible(SRAttention(16, 2))
    assert not MlpWithDepthwiseConv.is_convertible(MlpWithDepthwiseConv(16, 32))
    assert not SRAttention.is_convertible(nn.Linear(3, 3)) and not MlpWithDepthwiseConv.is_convertible(nn.Linear(3, 3))
    with torch.device("meta"):
        padded = tp.Attention(16, 2, sr_ratio=2)
        padded.sr = nn.Conv2d(16, 16, 2, stride=2, padding=1)
        gelu_tanh = tp.Attention(16, 2, linear_attn=True)
        gelu_tanh.act = nn.GELU(approximate="tanh")
        not_depthwise = tp.MlpWithDepthwiseConv(16, 32)
        not_depthwise.dwconv = nn.Conv2d(32, 32, 3, padding=1, groups=2)
        reflect = tp.MlpWithDepthwiseConv(16, 32)
        reflect.dwconv = nn.Conv2d(32, 32, 3, padding=1, groups=32, padding_mode="reflect")
    assert not SRAttention.is_convertible(padded) and not SRAttention.is_convertible(gelu_tanh)
    assert not MlpWithDepthwiseConv.is_convertible(not_depthwise)
    assert not MlpWithDepthwiseConv.is_convertible(reflect)
    with pytest.raises(ValueError, match="not a supported timm pvt_v2.MlpWithDepthwiseConv"):
        MlpWithDepthwiseConv.from_timm(reflect)


@pytest.mark.parametrize("kw", [dict(sr_ratio=1), dict(sr_ratio=4), dict(linear_attn=True),
                                dict(sr_ratio=2, qkv_bias=False)], ids=["sr1", "sr4", "linear", "sr2-no-bias"])
def test_state_dict_and_meta_construction(kw):
    """Keys / shapes equal timm's (in order); a module built on meta and loaded with assign=True runs."""
    theirs = _randomize_(tp.Attention(24, 3, **kw)).eval()
    with torch.device("meta"):
        ours = SRAttention(24, 3, **kw)
        mlp = MlpWithDepthwiseConv(24, 48, extra_relu=True)
    t_mlp = _randomize_(tp.MlpWithDepthwiseConv(24, 48, extra_relu=True)).eval()
    for o, t in ((ours, theirs), (mlp, t_mlp)):
        assert [(k, v.shape) for k, v in o.state_dict().items()] == [(k, v.shape) for k, v in t.state_dict().items()]
        o.load_state_dict({k: v.clone() for k, v in t.state_dict().items()}, strict=True, assign=True)
        torch.save(o.state_dict(), io.BytesIO())
    _skip_unless_runs(None, torch.float32, 24, 3)
    x = torch.randn(1, 14 * 10, 24)
    with torch.no_grad():
        assert rel_err(ours.eval()(x, (14, 10)), theirs(x, (14, 10))) <= F32_TOL
        assert rel_err(mlp.eval()(x, (14, 10)), t_mlp(x, (14, 10))) <= F32_TOL


# fastops.optimize on timm models ---------------------------------------------------------------------------

def _count(model, cls):
    return sum(type(m) is cls for m in model.modules())


@pytest.mark.parametrize("name, kw, shape", [
    ("pvt_v2_b0", {}, (1, 3, 96, 128)),
    # linear mode on a reduced model: every map (down to 2x2) is pooled to 7x7
    ("pvt_v2_b2_li", dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128), num_heads=(1, 2, 3, 4)),
     (2, 3, 64, 72)),
], ids=["b0", "b2_li-reduced"])
def test_optimize_timm_pvt_v2(name, kw, shape):
    """fastops.optimize swaps every timm Attention and MlpWithDepthwiseConv (parameters shared, keys kept),
    outputs unchanged."""
    _skip_unless_runs(None, torch.float32, 32, 1)
    torch.manual_seed(0)
    model = _randomize_(timm.create_model(name, pretrained=False, **kw)).eval()
    n_blocks = sum(model.depths)
    assert _count(model, tp.Attention) == _count(model, tp.MlpWithDepthwiseConv) == n_blocks
    x = torch.randn(shape)
    with torch.no_grad():
        ref = model(x)
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    model = fastops.optimize(model)
    assert _count(model, SRAttention) == _count(model, MlpWithDepthwiseConv) == n_blocks
    assert _count(model, tp.Attention) == _count(model, tp.MlpWithDepthwiseConv) == 0
    assert list(model.state_dict()) == keys
    assert all(p is params[k] for k, p in model.named_parameters())
    with torch.no_grad():
        err = rel_err(model(x), ref)
    assert err <= F32_TOL, f"rel err {err:.2e}"


# Bad arguments ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw, match", [
    (dict(dim=8, num_heads=3), "num_heads"),
    (dict(dim=8, num_heads=0), "num_heads"),
    (dict(dim=0, num_heads=1), "dim"),
    (dict(dim=8, num_heads=2, sr_ratio=0), "sr_ratio"),
    (dict(dim=8, num_heads=2, attn_drop=0.1), "attn_drop"),
])
def test_attention_bad_args(kw, match):
    with pytest.raises(ValueError, match=match):
        SRAttention(**kw)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "reference"])
def test_bad_inputs_raise(fused):
    attn = SRAttention(8, 2, sr_ratio=4, fused=fused)
    mlp = MlpWithDepthwiseConv(8, 16, fused=fused)
    for m in (attn, mlp):
        with pytest.raises(ValueError, match="x must be"):
            m(torch.randn(16, 8), (4, 4))
        with pytest.raises(ValueError, match="x must be"):
            m(torch.randn(1, 16, 6), (4, 4))
        with pytest.raises(ValueError, match="H \\* W = N"):
            m(torch.randn(1, 16, 8), (4, 5))
        with pytest.raises(ValueError, match="H \\* W = N"):
            m(torch.randn(1, 16, 8), (-4, -4))
        with pytest.raises(TypeError, match="feat_size"):
            m(torch.randn(1, 16, 8), 16)
    with pytest.raises(ValueError, match="smaller than sr_ratio"):
        attn(torch.randn(1, 12, 8), (3, 4))


@pytest.mark.parametrize("fused", [True, False])
def test_residual_argument(fused):
    """attn / mlp (x, hw, residual=r) == r + attn / mlp (x, hw): in eval (fused: r added in the last Linear's
    epilogue) and in training with dropout > 0 (applied to the module's output only, the same elements for
    one seed)."""
    x, r = torch.randn(2, 9 * 7, 16), torch.randn(2, 9 * 7, 16)
    for m in (SRAttention(16, num_heads=2, sr_ratio=2, proj_drop=0.5, fused=fused),
              MlpWithDepthwiseConv(16, 24, drop=0.5, fused=fused)):
        with torch.no_grad():
            m.eval()
            assert rel_err(m(x, (9, 7), residual=r), m(x, (9, 7)) + r) <= F32_TOL
            m.train()
            torch.manual_seed(0)
            got = m(x, (9, 7), residual=r)
            torch.manual_seed(0)
            assert rel_err(got, m(x, (9, 7)) + r) <= F32_TOL
