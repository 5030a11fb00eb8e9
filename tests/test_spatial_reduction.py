"""spatial_reduction: every backend vs the timm-path reference in float64, forward and every gradient
(the reference itself is checked against timm's pvt_v2.Attention in tests/test_sr_attention.py)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops import backends
from fastops.reference import spatial_reduction as ref_spatial_reduction

from ._util import (INTERPRET, TOL, assert_close, assert_close_reduced, check_compile_fullgraph, cpu_threads,
                    poison_allocator, skip_unless_runnable)

OP = "spatial_reduction"

# (B, H, W, C, sr_ratio, linear, bias)
CASES = [
    (2, 16, 16, 32, 8, False, True),   # PVTv2 stage 1 (sr 8), a smaller map
    (1, 13, 11, 24, 4, False, True),   # rows / columns past (H // sr) * sr are not read
    (2, 7, 9, 40, 2, False, False),    # sr 2, no conv bias
    (1, 5, 6, 16, 1, False, True),     # sr 1: a 1x1 conv
    (1, 9, 10, 16, 3, False, True),    # an odd sr
    (2, 13, 11, 24, 1, True, True),    # linear: overlapping pool bins
    (1, 5, 4, 16, 1, True, False),     # linear with H, W < 7: bins repeat
    (1, 14, 14, 8, 1, True, True),     # linear, a multiple of 7
    (2, 7, 7, 24, 1, True, True),      # linear on a 7 x 7 map: the pool is the identity
]
NAMES = ("output", "grad_x", "grad_sr_weight", "grad_sr_bias", "grad_norm_weight", "grad_norm_bias")


def _case_id(c):
    B, H, W, C, sr, linear, bias = c
    return f"{B}x{H}x{W}x{C}-" + ("linear" if linear else f"sr{sr}") + ("-bias" if bias else "")


def _case(case, dtype, device="cpu"):
    B, H, W, C, sr, linear, bias = case
    k = 1 if linear else sr
    # Parameters are fp32 next to half / bf16 activations (as under AMP), with values the activation dtype
    # holds exactly: the op computes with them in x's dtype, the float64 reference with them as they are.
    pdt = torch.float64 if dtype == torch.float64 else torch.float32

    def param(*shape, mean=0.0):
        return (torch.randn(*shape, device=device) * 0.5 + mean).to(dtype).to(pdt)

    x = torch.randn(B, H * W, C, device=device).to(dtype)
    w = (torch.randn(C, C, k, k, device=device) / (C * k * k) ** 0.5).to(dtype).to(pdt)
    tensors = [x, w, param(C) if bias else None, param(C, mean=1.0), param(C)]
    return tensors, dict(feat_size=(H, W), sr_ratio=sr, linear=linear)


def _run(backend, tensors, opts, go, cast=lambda t: t):
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
    with fastops.use_backend(backend):
        x, w, b, nw, nb = leaves
        y = fastops.spatial_reduction(x, opts["feat_size"], w, b, nw, nb, opts["sr_ratio"], opts["linear"])
    y.backward(cast(go))
    return [y] + [None if t is None else t.grad for t in leaves]


def _nr(case):
    B, H, W, C, sr, linear, _ = case
    return 49 if linear else (H // sr) * (W // sr)


def _check_all(backend, case, dtype, device, x_view=False):
    tensors, opts = _case(case, dtype, device)
    skip_unless_runnable(OP, backend, tensors[0], case[3], 1 if case[5] else case[4])
    go = torch.randn(case[0], _nr(case), case[3], device=device).to(dtype)
    cpu = [None if t is None else t.cpu() for t in tensors]
    ref = _run("reference", cpu, opts, go.cpu(), lambda t: t.double())
    ref_same = _run("reference", cpu, opts, go.cpu()) if dtype in (torch.float32, torch.float64) else ref
    if x_view:
        big = torch.full((*tensors[0].shape[:-1], 2 * tensors[0].shape[-1]), float("nan"), dtype=dtype, device=device)
        big[..., ::2] = tensors[0]
        tensors[0] = big[..., ::2]
    poison_allocator(4 * tensors[0].numel(), device)
    got = _run(backend, tensors, opts, go)
    assert got[0].dtype == dtype and got[0].is_contiguous() and tuple(got[0].shape) == tuple(go.shape)
    for g, r, rs, what in zip(got, ref, ref_same, NAMES):
        assert (g is None) == (r is None), what
        if g is None:
            continue
        if what == "output":
            assert g.dtype == dtype, what
            assert_close(g, r, dtype, what)
        else:
            # Parameter gradients are sums over every reduced token of the batch, and every gradient passes
            # through the LayerNorm backward, which cancels badly for few channels (C = 2: the normalised row
            # is +-1 whatever y is, the true gradient nearly 0): held to what PyTorch reaches in x's dtype.
            if what == "grad_x":
                assert g.dtype == dtype, what
            assert_close_reduced(g, r, rs, dtype, what)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_backend(dtype, case):
    _check_all("cpu", case, dtype, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_packed_weight_follows_changes(dtype):
    """A weight that does not require grad is packed once and the packed copy kept between calls: changing it
    in place, or passing another tensor, must give the new weight's result."""
    tensors, opts = _case((2, 16, 16, 32, 4, False, True), dtype)
    x, w, b, nw, nb = (t.to(dtype) for t in tensors)  # a weight in x's dtype is used as it is, not converted

    def check(w):
        with torch.no_grad(), fastops.use_backend("cpu"):
            got = fastops.spatial_reduction(x, opts["feat_size"], w, b, nw, nb, opts["sr_ratio"])
        want = ref_spatial_reduction(x.double(), opts["feat_size"], w.double(), b.double(), nw.double(), nb.double(),
                                     opts["sr_ratio"])
        assert_close(got, want, dtype, "output")

    check(w)
    check(w)  # from the kept copy
    with torch.no_grad():
        w.mul_(-2)
    check(w)
    # A new weight, possibly where the old one was: the old tensor is gone first.
    w_new = w.flip(0).clone()
    del w, tensors
    w2 = torch.empty_like(w_new).copy_(w_new)
    check(w2)


def test_cpu_backend_non_contiguous_x():
    _check_all("cpu", CASES[1], torch.float32, "cpu", x_view=True)
    _check_all("cpu", CASES[5], torch.float32, "cpu", x_view=True)


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(dtype, case):
    _check_all("triton", case, dtype, "cpu")


PVT_V2_B2 = [  # PVTv2-b2's reductions at batch 2, a 512x512 stage 1, and b2_li's pool
    (2, 56, 56, 64, 8, False, True), (2, 28, 28, 128, 4, False, True), (2, 14, 14, 320, 2, False, True),
    (1, 128, 128, 64, 8, False, True), (2, 56, 56, 64, 1, True, True), (2, 14, 14, 320, 1, True, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", CASES + PVT_V2_B2, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends(backend, dtype, case):
    if backend == "triton" and dtype == torch.float32:
        pytest.skip("fp32 tl.dot may use tf32 on GPU: covered at 3e-4 by test_gpu_triton_fp32")
    _check_all(backend, case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[:3] + PVT_V2_B2[:1], ids=_case_id)
def test_gpu_triton_fp32(case, monkeypatch):
    monkeypatch.setitem(TOL, torch.float32, 3e-4)
    _check_all("triton", case, torch.float32, "cuda")


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h=st.integers(1, 20), w=st.integers(1, 20), c=st.integers(1, 24),
       sr=st.integers(1, 5), linear=st.booleans(), bias=st.booleans())
def test_cpu_random_shapes(b, h, w, c, sr, linear, bias):
    if not linear:
        sr = min(sr, h, w)
    _check_all("cpu", (b, h, w, c, sr, linear, bias), torch.float32, "cpu")


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(threads):
    with cpu_threads(threads):
        _check_all("cpu", CASES[0], torch.float32, "cpu")
        _check_all("cpu", CASES[5], torch.float32, "cpu")


@pytest.mark.parametrize("case", [(2, 5, 4, 3, 2, False, True), (1, 4, 3, 3, 1, True, True)], ids=_case_id)
def test_gradcheck_cpu_float64(case):
    tensors, opts = _case(case, torch.float64)
    inputs = tuple(t.detach().requires_grad_() for t in tensors)

    def f(x, w, b, nw, nb):
        with fastops.use_backend("cpu"):
            return fastops.spatial_reduction(x, opts["feat_size"], w, b, nw, nb, opts["sr_ratio"], opts["linear"])

    assert torch.autograd.gradcheck(f, inputs)


def _op_args(case=CASES[1], dtype=torch.float32):
    (x, w, b, nw, nb), opts = _case(case, dtype)
    return (x.requires_grad_(), list(opts["feat_size"]), w.requires_grad_(), b.requires_grad_(),
            nw.requires_grad_(), nb.requires_grad_(), opts["sr_ratio"], opts["linear"], 1e-5)


@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=_case_id)
def test_opcheck_cpp(case):
    args = _op_args(case)
    skip_unless_runnable(OP, "cpu", args[0])
    torch.library.opcheck(torch.ops.fastops.spatial_reduction.default, args)
    x, fs, w, b, nw, nb, sr, linear, eps = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, y, stats = torch.ops.fastops.spatial_reduction(x, fs, w, b, nw, nb, sr, linear, eps)
    torch.library.opcheck(torch.ops.fastops.spatial_reduction_backward.default,
                          (torch.randn_like(out), x, fs, w, nw, nb, y, stats, sr, linear, True))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_opcheck_triton():
    torch.library.opcheck(torch.ops.fastops.spatial_reduction_triton.default, _op_args())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_torch_compile_fullgraph(backend):
    tensors, opts = _case(CASES[1], torch.float32)

    def f(x, w, b, nw, nb):
        return fastops.spatial_reduction(x, opts["feat_size"], w, b, nw, nb, opts["sr_ratio"]) * 2

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves]

    check_compile_fullgraph(backend, f, run, NAMES)


def test_autocast_cpu_bf16():
    tensors, opts = _case(CASES[0], torch.float32)
    x, w, b, nw, nb = tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.spatial_reduction(x, opts["feat_size"], w, b, nw, nb, opts["sr_ratio"])
    assert y.dtype == torch.bfloat16
    ref = ref_spatial_reduction(x.double(), opts["feat_size"], w.double(), b.double(), nw.double(), nb.double(),
                                opts["sr_ratio"])
    assert_close(y, ref, torch.bfloat16)


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    C = 8
    return [torch.randn(2, 6 * 5, C), (6, 5), torch.randn(C, C, 2, 2), torch.randn(C), torch.randn(C),
            torch.randn(C), 2], {}


def _with(i, value):
    args, _ = _good()
    args[i] = value
    return args


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (_with(0, torch.randn(2, 30, 8).int()), {}, TypeError, "x must have a floating dtype"),
    (_with(0, torch.randn(30, 8)), {}, ValueError, "x must be 3-D"),
    (_with(1, (5, 5)), {}, ValueError, "feat_size \\(5, 5\\) gives H \\* W = 25 tokens but x has N = 30"),
    (_with(1, (6, 5, 1)), {}, TypeError, "feat_size must be an int or a pair"),
    (_with(2, torch.randn(8, 8, 3, 3)), {}, ValueError, "sr_weight must have shape \\(C, C, k, k\\)"),
    (_with(2, torch.randn(8, 8, 2)), {}, ValueError, "sr_weight must be 4-D"),
    (_with(3, torch.randn(7)), {}, ValueError, "sr_bias must have shape \\(8,\\)"),
    (_with(4, torch.randn(8, 1)), {}, ValueError, "norm_weight must be 1-D"),
    (_with(5, torch.randn(9)), {}, ValueError, "norm_bias must have shape \\(8,\\)"),
    (_with(5, torch.randn(8, device="meta")), {}, ValueError, "norm_bias is on meta"),
    (_with(6, 0), {}, ValueError, "sr_ratio must be a positive int"),
    ([torch.randn(1, 6, 8), (3, 2), torch.randn(8, 8, 4, 4), None, torch.randn(8), torch.randn(8), 4], {},
     ValueError, "smaller than sr_ratio=4"),
    (None, dict(linear=1), TypeError, "linear must be a bool"),
    (None, dict(linear=True), ValueError, "sr_weight must have shape \\(C, C, k, k\\) = \\(8, 8, 1, 1\\)"),
    (None, dict(eps=0.0), ValueError, "eps must be a positive finite float"),
])
def test_bad_inputs(args, kwargs, exc, match):
    good_args, good_kwargs = _good()
    with pytest.raises(exc, match=match):
        fastops.spatial_reduction(*(args or good_args), **{**good_kwargs, **kwargs})


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.spatial_reduction called directly (no Python front) refuses inconsistent inputs."""
    x, fs, w, b, nw, nb, sr = _good()[0]
    skip_unless_runnable(OP, "cpu", x)
    with pytest.raises(RuntimeError, match="weight"):
        torch.ops.fastops.spatial_reduction(x, list(fs), torch.randn(8, 8, 3, 3), b, nw, nb, sr, False, 1e-5)
    with pytest.raises(RuntimeError, match="feat_size"):
        torch.ops.fastops.spatial_reduction(x, [5, 5], w, b, nw, nb, sr, False, 1e-5)
    with pytest.raises(RuntimeError, match="norm_weight"):
        torch.ops.fastops.spatial_reduction(x, list(fs), w, b, torch.randn(7), nb, sr, False, 1e-5)
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.fastops.spatial_reduction(x, list(fs), w.double(), b, nw, nb, sr, False, 1e-5)


def test_forced_backend_that_cannot_run_says_why():
    args, kwargs = _good()
    with fastops.use_backend("cuda"), pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        fastops.spatial_reduction(*args, **kwargs)


def test_backend_size_limits_are_reported():
    from fastops.ops.spatial_reduction import _cuda_limits

    x = torch.randn(1, 4, 8)
    assert _cuda_limits(x, 512, 8) is None
    assert "at most 4194240" in _cuda_limits(x, 70000, 8)
