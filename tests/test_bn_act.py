"""bn_act: every backend vs F.batch_norm (+ residual) + activation in float64, eval and training: outputs,
every gradient, running statistics."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops import backends
from fastops.reference import BN_ACTS

from ._util import (INTERPRET, TOL, assert_close, assert_close_reduced, assert_close_vs_pytorch,
                    check_compile_fullgraph, cpu_threads, make_layout, poison_allocator, skip_unless_runnable)

OP = "bn_act"
ACTS = tuple(BN_ACTS)

# (N, C, H, W, act, residual, affine)
CASES = [
    (2, 16, 8, 8, "relu", False, True),       # DenseNet's BN-ReLU, small
    (3, 37, 29, 17, "relu", True, True),      # odd sizes, a residual (relu(bn(x) + shortcut))
    (1, 24, 7, 9, "relu6", False, True),      # MobileNetV2
    (2, 20, 5, 6, "silu", True, True),
    (1, 12, 11, 3, "gelu", False, True),
    (2, 8, 6, 5, "hardswish", True, False),   # no affine parameters
    (3, 5, 1, 1, "none", False, True),        # 1x1 maps: N values per channel
]
NAMES = ("output", "grad_x", "grad_weight", "grad_bias", "grad_residual")


def _case_id(c):
    N, C, H, W, act, res, affine = c
    return f"{N}x{C}x{H}x{W}-{act}" + ("-res" if res else "") + ("" if affine else "-noaffine")


def _case(case, dtype, device="cpu"):
    N, C, H, W, act, res, affine = case
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    # Channel means away from 0 and spreads away from 1, so that centring and scaling both matter.
    mu = torch.randn(1, C, 1, 1, device=device) * 2
    sd = torch.rand(1, C, 1, 1, device=device) * 2 + 0.25
    x = (torch.randn(N, C, H, W, device=device) * sd + mu).to(dtype)
    w = (torch.randn(C, device=device) * 0.5 + 1).to(pdt) if affine else None
    b = (torch.randn(C, device=device) * 0.5).to(pdt) if affine else None
    r = torch.randn(N, C, H, W, device=device).to(dtype) if res else None
    rm = (mu.flatten() + 0.3 * torch.randn(C, device=device)).to(pdt)
    rv = (sd.flatten() ** 2 * (torch.rand(C, device=device) + 0.5)).to(pdt)
    return [x, w, b, r], [rm, rv], act


def _run(backend, tensors, stats, act, training, go, layout="contiguous", cast=lambda t: t):
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
    rm, rv = (cast(s).clone() for s in stats)
    x, w, b, r = leaves
    xin = make_layout(x, layout)
    rin = None if r is None else make_layout(r, layout)
    with fastops.use_backend(backend):
        y = fastops.bn_act(xin, w, b, rm, rv, 1e-5, act, rin, training, 0.1)
    y.backward(cast(go))
    return [y] + [None if t is None else t.grad for t in (x, w, b, r)], [rm, rv]


def _check_all(backend, case, dtype, device, training, layout="contiguous"):
    tensors, stats, act = _case(case, dtype, device)
    skip_unless_runnable(OP, backend, tensors[0])
    go = torch.randn_like(tensors[0])
    cpu = [None if t is None else t.cpu() for t in tensors]
    cstats = [s.cpu() for s in stats]
    ref, ref_stats = _run("reference", cpu, cstats, act, training, go.cpu(), cast=lambda t: t.double())
    ref_same = (_run("reference", cpu, cstats, act, training, go.cpu())[0]
                if dtype in (torch.float32, torch.float64) else ref)
    poison_allocator(4 * tensors[0].numel(), device)
    got, got_stats = _run(backend, tensors, stats, act, training, go, layout)
    y = got[0]
    assert y.dtype == dtype and tuple(y.shape) == tuple(tensors[0].shape)
    if layout == "channels_last" and min(y.shape[1], y.shape[2] * y.shape[3]) > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    for g, r, rs, what in zip(got, ref, ref_same, NAMES):
        assert (g is None) == (r is None), what
        if g is None:
            continue
        if what in ("output", "grad_residual"):
            assert g.dtype == dtype, what
            assert_close(g, r, dtype, what)
        else:
            # grad_x in training goes through the batch-statistics backward, a sum over N*H*W that cancels.
            assert_close_reduced(g, r, rs, dtype, what)
    for g, r, what in zip(got_stats, ref_stats, ("running_mean", "running_var")):
        assert_close(g, r, torch.float32 if dtype != torch.float64 else dtype, what)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_backend(dtype, case, layout, training):
    _check_all("cpu", case, dtype, "cpu", training, layout)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", CASES[:2], ids=_case_id)
def test_cpu_backend_float64_and_strided(case, training):
    _check_all("cpu", case, torch.float64, "cpu", training)
    _check_all("cpu", case, torch.float32, "cpu", training, "strided")


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[5:], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(dtype, case, layout, training):
    _check_all("triton", case, dtype, "cpu", training, layout)


DENSENET = [(8, 256, 28, 28, "relu", False, True), (8, 512, 14, 14, "relu", False, True),
            (8, 96, 56, 56, "relu", True, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES + DENSENET, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends(backend, dtype, case, layout, training):
    _check_all(backend, case, dtype, "cuda", training, layout)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 12), w=st.integers(1, 12),
       act=st.sampled_from(ACTS), res=st.booleans(), training=st.booleans(), cl=st.booleans())
def test_cpu_random_shapes(n, c, h, w, act, res, training, cl):
    if training and n * h * w < 2:
        n = 2
    _check_all("cpu", (n, c, h, w, act, res, True), torch.float32, "cpu", training,
               "channels_last" if cl else "contiguous")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_streamed_output(monkeypatch, layout, training):
    """With FASTOPS_LLC_SHARE_BYTES=0 every fp32 output counts as too large for the cache: rows (NCHW
    planes, channels_last pixels) of at least 256 values are written with streaming stores, from the
    first 64-byte line boundary on (29*17 planes, C = 300 pixels start off one): same values, every
    activation."""
    monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", "0")
    for case in CASES + [(2, 300, 5, 3, "relu", True, True), (1, 264, 2, 2, "gelu", False, True)]:
        _check_all("cpu", case, torch.float32, "cpu", training, layout)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(threads):
    with cpu_threads(threads):
        _check_all("cpu", CASES[1], torch.float32, "cpu", True)
        _check_all("cpu", CASES[1], torch.float32, "cpu", True, "channels_last")


def test_large_mean_small_spread_statistics():
    """Batch variance of values far from 0 (mean 1000, std 0.1): a naive E[x^2] - E[x]^2 in fp32 loses it."""
    x = torch.randn(4, 6, 32, 32) * 0.1 + 1000.0
    skip_unless_runnable(OP, "cpu", x)
    rm, rv = torch.zeros(6), torch.ones(6)
    with fastops.use_backend("cpu"):
        y = fastops.bn_act(x, None, None, rm, rv, 1e-5, "none", None, True, 1.0)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, None, None, True, 0.0, 1e-5)
    same = torch.nn.functional.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    # x - mean itself loses ~ulp(1000) / 0.1 = 3e-4 in fp32, whoever computes it; a naive variance is off by O(1).
    assert_close_vs_pytorch(y, ref, same, torch.float32, "output")
    assert_close(rv, x.double().var(dim=(0, 2, 3)), torch.float32, "running_var", tol=1e-4)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_gradcheck_cpu_float64(training):
    tensors, stats, _ = _case((2, 3, 3, 2, "silu", True, True), torch.float64)
    inputs = tuple(t.detach().requires_grad_() for t in tensors)

    def f(x, w, b, r):
        with fastops.use_backend("cpu"):
            return fastops.bn_act(x, w, b, stats[0].clone(), stats[1].clone(), 1e-5, "silu", r, training)

    assert torch.autograd.gradcheck(f, inputs)


def _op_args(training, case=CASES[1], dtype=torch.float32):
    (x, w, b, r), (rm, rv), act = _case(case, dtype)
    return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), None if training else rm,
            None if training else rv, r.requires_grad_(), 1e-5, act, training)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_opcheck_cpp(training):
    args = _op_args(training)
    skip_unless_runnable(OP, "cpu", args[0])
    torch.library.opcheck(torch.ops.fastops.bn_act.default, args)
    x, w, b, rm, rv, r, eps, act, tr = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, mean, var = torch.ops.fastops.bn_act(x, w, b, rm, rv, r, eps, act, tr)
    torch.library.opcheck(torch.ops.fastops.bn_act_backward.default,
                          (torch.randn_like(out), x, w, b, mean, var, r, eps, act, tr))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_opcheck_triton(training):
    torch.library.opcheck(torch.ops.fastops.bn_act_triton.default, _op_args(training, CASES[3]))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_torch_compile_fullgraph(backend):
    tensors, stats, act = _case(CASES[3], torch.float32)

    def f(x, w, b, r, rm, rv):
        return fastops.bn_act(x, w, b, rm, rv, 1e-5, act, r, True) * 2

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        rm, rv = (s.clone() for s in stats)
        y = fn(*leaves, rm, rv)
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves] + [rm, rv]

    check_compile_fullgraph(backend, f, run, NAMES[:1] + NAMES[1:] + ("running_mean", "running_var"))


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_cpu_bf16(xdt):
    """autocast leaves batch_norm in its input's dtype: a bf16 x gives bf16, an fp32 x fp32 (it was cast to
    bf16: values past fp16's range became inf under fp16 autocast, and NaN running stats in training)."""
    tensors, stats, act = _case(CASES[0], torch.float32)
    x, w, b, _ = tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.bn_act(x.to(xdt), w, b, stats[0], stats[1], 1e-5, act)
        want = torch.nn.functional.batch_norm(x.to(xdt), stats[0], stats[1], w, b, False, 0.1, 1e-5)
    assert y.dtype == xdt == want.dtype
    ref = torch.relu(torch.nn.functional.batch_norm(x.to(xdt).double(), stats[0].double(), stats[1].double(),
                                                    w.double(), b.double(), False, 0.1, 1e-5))
    assert_close(y, ref, xdt)


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    C = 8
    return [torch.randn(2, C, 5, 5), torch.randn(C), torch.randn(C), torch.zeros(C), torch.ones(C)], {}


def _with(i, value):
    args, _ = _good()
    args[i] = value
    return args


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (_with(0, torch.randn(2, 8, 5, 5).int()), {}, TypeError, "x must have a floating dtype"),
    (_with(0, torch.randn(8, 5, 5)), {}, ValueError, "x must be 4-D"),
    (_with(1, torch.randn(7)), {}, ValueError, "weight must have shape \\(8,\\)"),
    (_with(2, torch.randn(8, 1)), {}, ValueError, "bias must be 1-D"),
    (_with(3, torch.randn(8, device="meta")), {}, ValueError, "running_mean is on meta"),
    (_with(4, None), {}, ValueError, "running_mean and running_var are required"),
    (None, dict(act="tanh"), ValueError, "act must be one of none, relu, relu6, silu, gelu, hardswish"),
    (None, dict(residual=torch.randn(2, 8, 5, 4)), ValueError, "residual must have x's shape"),
    (None, dict(residual=torch.randn(2, 8, 5, 5).double()), TypeError, "residual has dtype"),
    (None, dict(eps=0.0), ValueError, "eps must be a positive finite float"),
    (None, dict(eps=True), ValueError, "eps must be a positive finite float, got True"),
    (None, dict(eps=float("inf")), ValueError, "eps must be a positive finite float, got inf"),
    (None, dict(eps=float("nan")), ValueError, "eps must be a positive finite float, got nan"),
    (None, dict(training=True, momentum=True), ValueError, "momentum must be a float in \\[0, 1\\]"),
    ([torch.randn(2, 0, 5, 5), torch.randn(0), torch.randn(0), torch.zeros(0), torch.ones(0)], {}, ValueError,
     "fastops.bn_act: x must have C >= 1"),
    (None, dict(training=1), TypeError, "training must be a bool"),
    (None, dict(training=True, momentum=2.0), ValueError, "momentum must be a float in \\[0, 1\\]"),
    ([torch.randn(1, 8, 1, 1), None, None, torch.zeros(8), torch.ones(8)], dict(training=True), ValueError,
     "more than one value per channel"),
])
def test_bad_inputs(args, kwargs, exc, match):
    good_args, good_kwargs = _good()
    with pytest.raises(exc, match=match):
        fastops.bn_act(*(args or good_args), **{**good_kwargs, **kwargs})


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.bn_act called directly (no Python front) refuses inconsistent inputs."""
    x, w, b, rm, rv = _good()[0]
    skip_unless_runnable(OP, "cpu", x)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fastops.bn_act(x, torch.randn(7), b, rm, rv, None, 1e-5, "relu", False)
    with pytest.raises(RuntimeError, match="mean"):
        torch.ops.fastops.bn_act(x, w, b, None, None, None, 1e-5, "relu", False)
    with pytest.raises(RuntimeError, match="residual"):
        torch.ops.fastops.bn_act(x, w, b, rm, rv, torch.randn(2, 8, 5, 4), 1e-5, "relu", False)
    with pytest.raises(RuntimeError, match="act"):
        torch.ops.fastops.bn_act(x, w, b, rm, rv, None, 1e-5, "tanh", False)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fastops.bn_act(x, w.half(), b, rm, rv, None, 1e-5, "relu", False)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("training", [False, True])
def test_zero_channels_refused_on_every_backend(backend, training):
    """C = 0 ran on the cpu kernel (eval) but failed in the reference's backward: refused up front everywhere."""
    x = torch.randn(2, 0, 5, 5, requires_grad=True)
    with fastops.use_backend(backend), pytest.raises(ValueError, match="fastops.bn_act: x must have C >= 1"):
        fastops.bn_act(x, torch.randn(0), torch.randn(0), torch.zeros(0), torch.ones(0), training=training)


@pytest.mark.parametrize("training", [False, True])
def test_double_backward_raises(training):
    """Second-order gradients through the kernels raise instead of coming back as zeros."""
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    stats = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    skip_unless_runnable(OP, "cpu", x)
    grads = {}
    for backend in ("cpu", "reference"):
        with fastops.use_backend(backend):
            y = fastops.bn_act(x, w, None, *(t.clone() for t in stats), 1e-5, "silu", training=training)
        grads[backend] = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
    for got, want, what in zip(grads["cpu"], grads["reference"], ("grad_x", "grad_weight")):
        assert_close(got, want, torch.float64, what)
    with pytest.raises(RuntimeError, match="fastops.bn_act: gradients of gradients"):
        torch.autograd.grad(grads["cpu"][0].sum(), (x, w))
    assert torch.autograd.grad(grads["reference"][0].sum(), w)[0].abs().sum() > 0


@pytest.mark.parametrize("xdt, pdt", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                      (torch.float16, torch.float32), (torch.bfloat16, torch.float64),
                                      (torch.float16, torch.float16)])
@pytest.mark.parametrize("training", [False, True])
def test_reference_backend_takes_the_parameter_dtypes_the_op_takes(xdt, pdt, training):
    """weight / bias / running stats may have any floating dtype (the kernels compute in fp32, fp64 for fp64 x);
    the reference backend (forced, or the fallback without fastops._C) accepts them too and agrees with cpu,
    running statistics included."""
    [x, w, b, r], stats, act = _case(CASES[1], torch.float32)
    x, r = x.to(xdt), r.to(xdt)
    skip_unless_runnable(OP, "cpu", x)
    out = {}
    for backend in ("cpu", "reference"):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w.to(pdt), b.to(pdt)))
        rm, rv = (t.to(pdt).clone() for t in stats)
        with fastops.use_backend(backend):
            y = fastops.bn_act(xs, ws, bs, rm, rv, 1e-5, act, r, training, 0.1)
        y.float().square().sum().backward()
        out[backend] = (y, xs.grad, ws.grad, rm, rv)
    for got, want, what in zip(out["cpu"], out["reference"], ("output", "grad_x", "grad_weight", "running_mean",
                                                                "running_var")):
        assert got.dtype == want.dtype, what
        assert_close(got, want, xdt, what, tol=max(TOL[xdt], TOL[pdt]))


def test_forced_backend_that_cannot_run_says_why():
    args, kwargs = _good()
    with fastops.use_backend("cuda"), pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        fastops.bn_act(*args, **kwargs)


def test_module_bnact_matches_batchnorm_relu():
    """fastops.nn.BNAct: same keys as nn.BatchNorm2d, same outputs, running stats and num_batches_tracked
    (momentum=None: cumulative average), train and eval."""
    torch.manual_seed(1)
    bn = torch.nn.BatchNorm2d(12, momentum=None)
    m = fastops.nn.BNAct(12, momentum=None, act="relu")
    m.load_state_dict(bn.state_dict())
    assert set(m.state_dict()) == set(bn.state_dict())
    for _ in range(2):
        x = torch.randn(3, 12, 6, 7)
        assert_close(m(x), torch.relu(bn(x)), torch.float32)
    for k, v in bn.state_dict().items():
        assert torch.allclose(m.state_dict()[k].double(), v.double(), rtol=1e-5, atol=1e-6), k
    m.eval(), bn.eval()
    x = torch.randn(2, 12, 5, 5).contiguous(memory_format=torch.channels_last)
    assert_close(m(x), torch.relu(bn(x)), torch.float32)
