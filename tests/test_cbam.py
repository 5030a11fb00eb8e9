"""cbam: every backend vs the plain-PyTorch CbamModule path in float64, forward, all gradients, running stats."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops import backends
from fastops._layout import is_channels_last

from ._util import (INTERPRET, LAYOUTS, assert_close, assert_close_reduced, check_compile_fullgraph, make_layout,
                    poison_allocator, skip_unless_runnable)

OP = "cbam"

# (N, C, H, W, R, k): CBAM-ResNet positions scaled down, plus odd and degenerate ones.
SHAPES = [
    (3, 37, 9, 7, 5, 7),     # odd everything; N >= threads: whole samples per thread
    (1, 64, 14, 14, 4, 7),   # N = 1: each pass split across threads
    (2, 256, 7, 7, 16, 7),   # wide C, layer-4-like plane (the 7x7 conv covers the whole map)
    (2, 16, 1, 1, 4, 3),     # H = W = 1
    (1, 6, 11, 3, 1, 5),     # R = 1, map narrower than the kernel
    (2, 8, 6, 6, 2, 1),      # 1x1 spatial conv
]
# (act, gate, mlp bias, training, ties): timm's CbamModule is relu / sigmoid / no bias.
CONFIGS = [
    ("relu", "sigmoid", False, False, False),
    ("relu", "sigmoid", False, True, False),
    ("gelu", "hard_sigmoid", True, True, False),
    ("silu", "sigmoid", True, False, False),
    ("relu", "sigmoid", False, True, True),   # integer-valued x: many tied maxima
]


def _case(shape, dtype, layout, cfg, device="cpu"):
    N, C, H, W, R, k = shape
    act, gate, bias, training, ties = cfg
    x = torch.randint(-3, 3, (N, C, H, W), device=device).float() if ties else torch.randn(N, C, H, W, device=device)
    x = make_layout(x.to(dtype), layout)
    w1 = (torch.randn(R, C, 1, 1, device=device) / C ** 0.5).to(dtype)
    w2 = (torch.randn(C, R, 1, 1, device=device) * 2 / R ** 0.5).to(dtype)
    b1 = torch.randn(R, device=device).to(dtype) if bias else None
    b2 = torch.randn(C, device=device).to(dtype) if bias else None
    cw = (torch.randn(1, 2, k, k, device=device) / k).to(dtype)
    bw = (torch.rand(1, device=device) + 0.5).to(dtype)
    bb = torch.randn(1, device=device).to(dtype)
    stats = (torch.randn(1, device=device), torch.rand(1, device=device) + 0.5)
    return [x, w1, b1, w2, b2, cw, bw, bb], stats, dict(training=training, act=act, gate=gate)


NAMES = ("output", "grad_x", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias",
         "grad_conv_weight", "grad_bn_weight", "grad_bn_bias")


def _run(backend, tensors, stats, opts, go, cast=lambda t: t):
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
    # float64 modules keep float64 running stats (F.batch_norm insists on it)
    stat_dtype = torch.float64 if leaves[0].dtype == torch.float64 else torch.float32
    rm, rv = (s.to(stat_dtype).clone() for s in stats)
    with fastops.use_backend(backend):
        y = fastops.cbam(*leaves, rm, rv, momentum=0.1, **opts)
    y.backward(cast(go))
    return [y] + [None if t is None else t.grad for t in leaves], (rm, rv)


def _check_all(backend, shape, dtype, layout, cfg, device):
    tensors, stats, opts = _case(shape, dtype, layout, cfg, device)
    skip_unless_runnable(OP, backend, tensors[0])
    go = torch.randn(tensors[0].shape, device=device).to(dtype)
    cpu = [None if t is None else t.cpu() for t in tensors]
    cpu_stats = [s.cpu() for s in stats]
    ref, ref_stats = _run("reference", cpu, cpu_stats, opts, go.cpu(), lambda t: t.double())
    same = dtype in (torch.float32, torch.float64)
    ref_same = _run("reference", cpu, cpu_stats, opts, go.cpu())[0] if same else ref
    poison_allocator(2 * tensors[0].numel(), device)
    got, got_stats = _run(backend, tensors, stats, opts, go)
    y = got[0]
    assert y.dtype == dtype and y.device == tensors[0].device
    want_cl = is_channels_last(tensors[0])
    assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    for g, r, rs, what in zip(got, ref, ref_same, NAMES):
        assert (g is None) == (r is None), what
        if g is None:
            continue
        assert g.dtype == dtype, what
        if what in ("output", "grad_x"):
            assert_close(g, r, dtype, what)
        else:  # sums over N*H*W products: see assert_close_reduced
            assert_close_reduced(g, r, rs, dtype, what)
    # running stats: updated in training exactly as F.batch_norm does, untouched in eval
    for g, r, s0, what in zip(got_stats, ref_stats, stats, ("running_mean", "running_var")):
        assert_close(g, r, torch.float32, what)
        if not opts["training"]:
            assert torch.equal(g.float(), s0.cpu()), what


def _skip_degenerate_bn(shape, cfg):
    count = shape[0] * shape[2] * shape[3]
    if cfg[3] and count < 2:
        pytest.skip("training BN needs N*H*W >= 2 (the error is tested in test_bad_inputs)")
    if cfg[3] and count == 2:
        # BN over two values outputs exactly -1 and +1 whatever they are: every gradient through it is 0
        # and only rounding noise is left to compare.
        pytest.skip("training BN over 2 values: zero gradient through the spatial branch")


def _cfg_id(c):
    return f"{c[0]}-{c[1]}" + ("-bias" if c[2] else "") + ("-train" if c[3] else "-eval") + ("-ties" if c[4] else "")


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_backend(dtype, layout, shape, cfg):
    _skip_degenerate_bn(shape, cfg)
    _check_all("cpu", shape, dtype, layout, cfg, "cpu")


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", [SHAPES[0], (1, 40, 6, 5, 8, 7), (2, 16, 1, 1, 4, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(dtype, layout, shape, cfg):
    _skip_degenerate_bn(shape, cfg)
    _check_all("triton", shape, dtype, layout, cfg, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 2048, 7, 7, 128, 7), (2, 256, 56, 56, 16, 7)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends(backend, dtype, layout, shape, cfg):
    _skip_degenerate_bn(shape, cfg)
    _check_all(backend, shape, dtype, layout, cfg, "cuda")


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 4), c=st.integers(1, 70), h=st.integers(1, 20), w=st.integers(1, 20),
       r=st.integers(1, 9), k=st.sampled_from([1, 3, 5, 7]), cfg=st.sampled_from(CONFIGS), cl=st.booleans())
def test_cpu_random_shapes(n, c, h, w, r, k, cfg, cl):
    if cfg[3] and n * h * w <= 2:
        return
    _check_all("cpu", (n, c, h, w, r, k), torch.float32, "channels_last" if cl else "contiguous", cfg, "cpu")


@pytest.mark.parametrize("share", ["0", str(1 << 40)], ids=["per-sample", "whole"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_schedules(monkeypatch, share, layout):
    """The CPU kernels follow the cache share FASTOPS_LLC_SHARE_BYTES: with x (and, backward, grad_out) within
    twice the share, every sample is pooled before the channel MLP of all samples runs at once with the
    threads splitting its weights; otherwise each sample's passes and MLP run together. Both equal the
    reference, in eval and training, for one sample, fewer samples than threads, and more."""
    monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", share)
    for shape in [(1, 33, 10, 9, 4, 7), (3, 40, 6, 5, 8, 3)]:
        for cfg in (CONFIGS[0], CONFIGS[1]):
            _check_all("cpu", shape, torch.float32, layout, cfg, "cpu")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_thread_counts(threads):
    """Whole-sample and split-sample scheduling give the same result for any thread count."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 33, 10, 9, 4, 7), (2, 33, 10, 9, 4, 7), (5, 33, 10, 9, 4, 7)]:
            for cfg in (CONFIGS[0], CONFIGS[1]):
                _check_all("cpu", shape, torch.float32, "channels_last", cfg, "cpu")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cfg", CONFIGS[:4], ids=_cfg_id)
def test_gradcheck_cpu_float64(layout, cfg):
    tensors, stats, opts = _case((2, 6, 4, 5, 2, 3), torch.float64, layout, cfg)
    present = [t is not None for t in tensors]
    inputs = tuple(t.detach().requires_grad_() for t in tensors if t is not None)

    def f(*args):
        it = iter(args)
        full = [next(it) if p else None for p in present]
        rm, rv = (s.double().clone() for s in stats)
        with fastops.use_backend("cpu"):
            return fastops.cbam(*full, rm, rv, **opts)

    assert torch.autograd.gradcheck(f, inputs)


def _op_args(cfg, cl=False):
    tensors, stats, opts = _case((2, 12, 5, 4, 3, 3), torch.float32, "channels_last" if cl else "contiguous", cfg)
    x, w1, b1, w2, b2, cw, bw, bb = tensors
    w1, w2 = w1.flatten(1), w2.flatten(1)
    req = [None if t is None else t.requires_grad_() for t in (x, w1, b1, w2, b2, cw, bw, bb)]
    return (*req, *stats, 1e-5, opts["training"], opts["act"], opts["gate"])


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[2]], ids=_cfg_id)
def test_opcheck_cpp(cl, cfg):
    args = _op_args(cfg, cl)
    skip_unless_runnable(OP, "cpu", args[0])
    torch.library.opcheck(torch.ops.fastops.cbam.default, args)
    det = [None if isinstance(a, torch.Tensor) is False or a is None else a.detach() for a in args[:8]]
    x, w1, b1, w2, b2, cw, bw, bb = det
    out, pooled, spatial, stats = torch.ops.fastops.cbam(*det, *args[8:])
    torch.library.opcheck(torch.ops.fastops.cbam_backward.default,
                          (torch.randn_like(out), x, pooled, spatial, stats, w1, b1, w2, b2, cw, bw, bb, *args[10:]))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_opcheck_triton():
    torch.library.opcheck(torch.ops.fastops.cbam_triton.default, _op_args(CONFIGS[2]))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_torch_compile_fullgraph(backend):
    tensors, stats, opts = _case((2, 24, 6, 5, 4, 7), torch.float32, "channels_last", CONFIGS[1])

    def run(fn):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
        rm, rv = (s.clone() for s in stats)
        y = fn(leaves, rm, rv)
        y.square().sum().backward()
        return [y] + [None if t is None else t.grad for t in leaves] + [rm, rv]

    def f(leaves, rm, rv):
        return fastops.cbam(*leaves, rm, rv, **opts) * 2

    check_compile_fullgraph(backend, f, run, NAMES + ("running_mean", "running_var"))


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    return [torch.randn(2, 8, 5, 5), torch.randn(2, 8, 1, 1), None, torch.randn(8, 2, 1, 1), None,
            torch.randn(1, 2, 7, 7), torch.ones(1), torch.zeros(1), torch.zeros(1), torch.ones(1)]


def _with(i, v):
    a = _good()
    a[i] = v
    return a


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (_with(0, torch.randn(2, 8, 5, 5).int()), {}, TypeError, "x must have a floating dtype"),
    (_with(0, torch.randn(8, 5, 5)), {}, ValueError, "x must be 4-D"),
    (_with(1, torch.randn(2, 7)), {}, ValueError, "fc1_weight must have shape"),
    (_with(3, torch.randn(7, 2)), {}, ValueError, "fc2_weight must have shape"),
    (_with(5, torch.randn(1, 2, 6, 6)), {}, ValueError, "conv_weight must have shape .* odd k"),
    (_with(5, torch.randn(1, 1, 7, 7)), {}, ValueError, "conv_weight must have shape"),
    (_with(5, torch.randn(1, 2, 7, 7).double()), {}, TypeError, "conv_weight has dtype torch.float64"),
    (_with(6, torch.ones(2)), {}, ValueError, "bn_weight must have shape"),
    (_with(7, torch.zeros(1, dtype=torch.int64)), {}, TypeError, "bn_bias must have a floating dtype"),
    (_with(9, torch.ones(1, device="meta")), {}, ValueError, "bn_running_var is on meta"),
    (_good(), dict(act="tanh"), ValueError, "act must be one of"),
    (_good(), dict(gate="relu"), ValueError, "gate must be one of"),
    (_with(0, torch.randn(1, 8, 1, 1)), dict(training=True), ValueError, "more than one value per BN channel"),
    # The BN scalars are checked as bn_act checks them (bn_eps=-1 gave NaN silently; training="no" ran training).
    (_good(), dict(bn_eps=-1.0), ValueError, "fastops.cbam: bn_eps must be a positive finite float, got -1.0"),
    (_good(), dict(bn_eps=None), ValueError, "fastops.cbam: bn_eps must be a positive finite float, got None"),
    (_good(), dict(bn_eps="x"), ValueError, "fastops.cbam: bn_eps must be a positive finite float"),
    (_good(), dict(bn_eps=float("inf")), ValueError, "fastops.cbam: bn_eps must be a positive finite float"),
    (_good(), dict(bn_eps=True), ValueError, "fastops.cbam: bn_eps must be a positive finite float"),
    (_good(), dict(training=True, momentum=5.0), ValueError, "fastops.cbam: momentum must be a float in \\[0, 1\\]"),
    (_good(), dict(training="no"), TypeError, "fastops.cbam: training must be a bool, got 'no'"),
    (_good(), dict(training=None), TypeError, "fastops.cbam: training must be a bool, got None"),
])
def test_bad_inputs(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastops.cbam(*args, **kwargs)


def test_direct_op_call_checks_shapes():
    x, w1, _, w2, _, cw, bw, bb, rm, rv = _good()
    skip_unless_runnable(OP, "cpu", x)
    with pytest.raises(RuntimeError, match="conv_weight must be"):
        torch.ops.fastops.cbam(x, w1.flatten(1), None, w2.flatten(1), None, torch.randn(1, 2, 4, 4), bw, bb, rm, rv,
                               1e-5, False, "relu", "sigmoid")
    with pytest.raises(RuntimeError, match="spatial must be"):
        torch.ops.fastops.cbam_backward(x, x, torch.zeros(2, 2, 8), torch.zeros(2, 2, 5, 4), torch.zeros(2),
                                        w1.flatten(1), None, w2.flatten(1), None, cw, bw, bb, 1e-5, False, "relu",
                                        "sigmoid")


def test_forced_backend_that_cannot_run_says_why():
    with fastops.use_backend("cuda"), pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        fastops.cbam(*_good())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fp32_bn", [False, True], ids=["bn-like-x", "bn-fp32"])
def test_reference_backend_takes_fp32_running_stats(dtype, training, fp32_bn):
    """Running stats in fp32 with fp16 / bf16 / fp64 x (the op casts them for the kernels), and with fp32_bn
    the BN's weight and bias too (a model whose BN layers are kept in fp32, which F.batch_norm accepts): the
    cpu and reference backends (forced, or the fallback without fastops._C) accept them and agree."""
    torch.manual_seed(3)
    a = [None if t is None else t.to(dtype) for t in _good()[:8]]
    if fp32_bn:
        a[6], a[7] = a[6].float(), a[7].float()
    skip_unless_runnable(OP, "cpu", a[0])
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-5}[dtype]
    out = {}
    for backend in ("cpu", "reference"):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in a]
        rm, rv = torch.full((1,), 0.1), torch.full((1,), 2.0)
        with fastops.use_backend(backend):
            y = fastops.cbam(*leaves, rm, rv, training=training)
        y.float().square().sum().backward()
        out[backend] = (y, leaves[0].grad, leaves[6].grad, rm, rv)
    for got, want, what in zip(out["cpu"], out["reference"], ("output", "grad_x", "grad_bn_weight", "running_mean",
                                                                "running_var")):
        assert got.dtype == want.dtype, what
        if what == "grad_bn_weight":
            assert got.dtype == a[6].dtype
        # The reference's backward rounds every step to bf16 (the kernels accumulate in fp32): ~10% apart.
        if not (dtype == torch.bfloat16 and what.startswith("grad")):
            assert_close(got, want, dtype, what, tol=tol)


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_cpu_bf16(xdt):
    """Under autocast x keeps its dtype and so does the output, as with timm's CbamModule (whose output is
    x * gates): a bf16 x (a conv's output) runs with the fp32 parameters cast to bf16, an fp32 x in fp32."""
    a = _good()
    a[0] = a[0].to(xdt)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.cbam(*a)
    assert y.dtype == xdt
    with fastops.use_backend("reference"):
        ref = fastops.cbam(*(None if t is None else t.double() for t in a))
    assert_close(y, ref, xdt)


def test_double_backward_raises():
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64, requires_grad=True)
    a = [None if t is None else t.double() for t in _good()[1:]]
    skip_unless_runnable(OP, "cpu", x)
    with fastops.use_backend("cpu"):
        (gx,) = torch.autograd.grad(fastops.cbam(x, *a).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="fastops.cbam: gradients of gradients"):
        torch.autograd.grad(gx.sum(), x)
