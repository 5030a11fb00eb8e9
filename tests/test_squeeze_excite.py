"""squeeze_excite: every backend vs the plain-PyTorch SEModule path in float64, forward and all gradients."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops import backends
from fastops._layout import is_channels_last

from ._util import (INTERPRET, LAYOUTS, TOL, assert_close, assert_close_reduced, backend_params,
                    check_compile_fullgraph, make_layout, poison_allocator, skip_unless_runnable)

OP = "squeeze_excite"

# (N, C, H, W, R): SE-ResNet positions scaled down, plus odd and degenerate ones.
SHAPES = [
    (3, 37, 9, 7, 5),      # odd everything; N >= threads: whole samples per thread
    (1, 64, 14, 14, 16),   # N = 1: each pass split across threads
    (2, 256, 7, 7, 16),    # wide C, SE-ResNet layer-4-like plane
    (2, 16, 1, 1, 4),      # H = W = 1
    (1, 3, 30, 2, 1),      # R = 1, thin plane
]
# (act, gate, residual, out_act, bias)
CONFIGS = [
    ("relu", "sigmoid", False, "none", True),       # timm SEModule
    ("relu", "sigmoid", True, "relu", True),        # SE-ResNet: relu(se(x) + shortcut)
    ("silu", "hard_sigmoid", True, "none", False),  # EfficientNet / MobileNetV3 style gates
    ("gelu", "sigmoid", False, "relu", False),
]


def _case(shape, dtype, layout, cfg, device="cpu"):
    N, C, H, W, R = shape
    act, gate, res, out_act, bias = cfg
    x = make_layout(torch.randn(N, C, H, W, device=device).to(dtype), layout)
    w1 = (torch.randn(R, C, 1, 1, device=device) / C ** 0.5).to(dtype)
    w2 = (torch.randn(C, R, 1, 1, device=device) * 2 / R ** 0.5).to(dtype)
    b1 = torch.randn(R, device=device).to(dtype) if bias else None
    b2 = torch.randn(C, device=device).to(dtype) if bias else None
    r = make_layout(torch.randn(N, C, H, W, device=device).to(dtype), layout) if res else None
    return [x, w1, b1, w2, b2, r], dict(act=act, gate=gate, out_act=out_act)


def _run(backend, tensors, opts, go, cast=lambda t: t):
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
    x, w1, b1, w2, b2, r = leaves
    with fastops.use_backend(backend):
        y = fastops.squeeze_excite(x, w1, b1, w2, b2, residual=r, **opts)
    y.backward(cast(go))
    return [y] + [None if t is None else t.grad for t in leaves]


NAMES = ("output", "grad_x", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias", "grad_residual")


def _check_all(backend, shape, dtype, layout, cfg, device):
    tensors, opts = _case(shape, dtype, layout, cfg, device)
    skip_unless_runnable(OP, backend, tensors[0])
    go = torch.randn(tensors[0].shape, device=device).to(dtype)
    cpu = [None if t is None else t.cpu() for t in tensors]
    ref = _run("reference", cpu, opts, go.cpu(), lambda t: t.double())
    ref_same = _run("reference", cpu, opts, go.cpu()) if dtype in (torch.float32, torch.float64) else ref
    poison_allocator(2 * tensors[0].numel(), device)
    got = _run(backend, tensors, opts, go)
    y = got[0]
    assert y.dtype == dtype and y.device == tensors[0].device
    want_cl = is_channels_last(tensors[0])
    assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    for g, r, rs, what in zip(got, ref, ref_same, NAMES):
        assert (g is None) == (r is None), what
        if g is None:
            continue
        assert g.dtype == dtype, what
        if what.startswith("grad_fc"):  # sums over N*H*W products: see assert_close_reduced
            assert_close_reduced(g, r, rs, dtype, what)
        else:
            assert_close(g, r, dtype, what)


def _cfg_id(c):
    return f"{c[0]}-{c[1]}" + ("-res" if c[2] else "") + f"-{c[3]}" + ("-bias" if c[4] else "")


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_backend(dtype, layout, shape, cfg):
    _check_all("cpu", shape, dtype, layout, cfg, "cpu")


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
# channels_last pooling blocks of a few pixels: over 1024 channels (8-pixel blocks), and a channel count that
# is not a whole number of vectors over several blocks (264 channels: 24-pixel blocks over 49 pixels).
@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=_cfg_id)
@pytest.mark.parametrize("shape", [(2, 1100, 5, 7, 8), (2, 264, 7, 7, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_channels_last_pixel_blocks(dtype, shape, cfg):
    _check_all("cpu", shape, dtype, "channels_last", cfg, "cpu")


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[3], (1, 40, 6, 5, 8)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(dtype, layout, shape, cfg):
    _check_all("triton", shape, dtype, layout, cfg, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", SHAPES + [(8, 2048, 7, 7, 128), (2, 256, 56, 56, 16)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends(backend, dtype, layout, shape, cfg):
    _check_all(backend, shape, dtype, layout, cfg, "cuda")


@settings(max_examples=30, deadline=None, derandomize=True)
@given(n=st.integers(1, 4), c=st.integers(1, 70), h=st.integers(1, 20), w=st.integers(1, 20),
       r=st.integers(1, 9), cfg=st.sampled_from(CONFIGS), cl=st.booleans())
def test_cpu_random_shapes(n, c, h, w, r, cfg, cl):
    _check_all("cpu", (n, c, h, w, r), torch.float32, "channels_last" if cl else "contiguous", cfg, "cpu")


@pytest.mark.parametrize("share", ["0", "x", str(1 << 40)], ids=["streamed-blocks", "streamed-whole", "cached"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_streamed_output(monkeypatch, share, layout, dtype):
    """The CPU forward's schedule and stores follow the cache share FASTOPS_LLC_SHARE_BYTES. An x of at most
    twice the share is pooled whole, its MLP split across threads by weight rows, then scaled; a larger x goes
    in blocks of samples (0 gives one-sample blocks). The scale pass writes around the cache when the output
    is at least the share. So 0 gives blocks + streamed stores, x's own size ("x") the whole-x schedule +
    streamed stores, 2^40 the whole-x schedule + plain stores; all equal the reference. Rows (NCHW planes,
    channels_last pixels) of at least 256 values stream their whole 64-byte lines, so the shapes mix short
    rows, long ones that start off a line boundary (17*19, C = 264) and aligned ones (16*16)."""
    esize = torch.finfo(dtype).bits // 8
    for shape in [(3, 37, 7, 7, 5), (5, 40, 17, 19, 8), (2, 264, 3, 5, 8), (2, 32, 16, 16, 4), (1, 40, 9, 5, 4)]:
        nbytes = shape[0] * shape[1] * shape[2] * shape[3] * esize
        monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", str(nbytes) if share == "x" else share)
        for cfg in CONFIGS[:2]:
            _check_all("cpu", shape, dtype, layout, cfg, "cpu")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cpu_multi_sample_blocks(monkeypatch, layout):
    """An x over twice the cache share goes in blocks of several samples, whose MLP and its backward run as
    small GEMMs over the block. With the share a third of x's fp32 bytes, 100 samples make blocks of 8 in the
    forward and of 4 (2 under relu, which also reads out) in the backward, the last block of each thread
    ragged."""
    shape = (100, 12, 3, 5, 3)
    monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", str(100 * 12 * 3 * 5 * 4 // 3))
    for cfg in CONFIGS:
        _check_all("cpu", shape, torch.float32, layout, cfg, "cpu")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_thread_counts(threads):
    """Whole-sample and split-sample scheduling give the same result for any thread count; so does the MLP
    whose weight rows the threads split (C = 1024, R = 44: several row chunks, ragged at the end)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for shape in [(1, 33, 10, 9, 4), (2, 33, 10, 9, 4), (5, 33, 10, 9, 4), (3, 1024, 3, 2, 44)]:
            _check_all("cpu", shape, torch.float32, "channels_last", CONFIGS[1], "cpu")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
def test_gradcheck_cpu_float64(layout, cfg):
    tensors, opts = _case((2, 6, 4, 3, 2), torch.float64, layout, cfg)
    inputs = tuple(t.detach().requires_grad_() for t in tensors if t is not None)
    present = [t is not None for t in tensors]

    def f(*args):
        it = iter(args)
        full = [next(it) if p else None for p in present]
        x, w1, b1, w2, b2, r = full
        with fastops.use_backend("cpu"):
            return fastops.squeeze_excite(x, w1, b1, w2, b2, residual=r, **opts)

    assert torch.autograd.gradcheck(f, inputs)


def _op_args(cfg, cl=False):
    tensors, opts = _case((2, 12, 5, 4, 3), torch.float32, "channels_last" if cl else "contiguous", cfg)
    x, w1, b1, w2, b2, r = tensors
    w1, w2 = w1.flatten(1), w2.flatten(1)
    req = [None if t is None else t.requires_grad_() for t in (x, w1, b1, w2, b2, r)]
    return (*req, opts["act"], opts["gate"], opts["out_act"])


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[1]], ids=_cfg_id)
def test_opcheck_cpp(cl, cfg):
    args = _op_args(cfg, cl)
    skip_unless_runnable(OP, "cpu", args[0])
    torch.library.opcheck(torch.ops.fastops.squeeze_excite.default, args)
    x, w1, b1, w2, b2, r = (None if t is None else t.detach() for t in args[:6])
    out, pooled = torch.ops.fastops.squeeze_excite(x, w1, b1, w2, b2, r, *args[6:])
    torch.library.opcheck(torch.ops.fastops.squeeze_excite_backward.default,
                          (torch.randn_like(out), x, out, pooled, w1, b1, w2, b2, r is not None, *args[6:]))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_opcheck_triton():
    torch.library.opcheck(torch.ops.fastops.squeeze_excite_triton.default, _op_args(CONFIGS[1]))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_torch_compile_fullgraph(backend):
    tensors, opts = _case((2, 24, 6, 5, 4), torch.float32, "channels_last", CONFIGS[1])

    def f(x, w1, b1, w2, b2, r):
        return fastops.squeeze_excite(x, w1, b1, w2, b2, residual=r, **opts) * 2

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves]

    check_compile_fullgraph(backend, f, run, NAMES)


@pytest.mark.parametrize("xdt", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_cpu_bf16(xdt):
    """Under autocast x keeps its dtype and so does the output, as with timm's SEModule (x * gate): a bf16 x
    (a conv's output) runs with the fp32 parameters and an fp32 residual cast to bf16, an fp32 x in fp32."""
    tensors, opts = _case((2, 16, 6, 6, 4), torch.float32, "contiguous", CONFIGS[0])
    x, w1, b1, w2, b2, _ = tensors
    r = torch.randn_like(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.squeeze_excite(x.to(xdt), w1, b1, w2, b2, residual=r, **opts)
    assert y.dtype == xdt
    with fastops.use_backend("reference"):
        ref = fastops.squeeze_excite(*(t.double() for t in (x.to(xdt), w1, b1, w2, b2)), residual=r.to(xdt).double(),
                                     **opts)
    assert_close(y, ref, xdt)


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    return [torch.randn(2, 8, 5, 5), torch.randn(2, 8, 1, 1), torch.randn(2), torch.randn(8, 2, 1, 1), torch.randn(8)]


@pytest.mark.parametrize("mutate, kwargs, exc, match", [
    (lambda a: [a[0].int()] + a[1:], {}, TypeError, "x must have a floating dtype"),
    (lambda a: [a[0][0]] + a[1:], {}, ValueError, "x must be 4-D"),
    (lambda a: [a[0][:, :, :0]] + a[1:], {}, ValueError, "H \\* W >= 1"),
    (lambda a: [a[0], torch.randn(2, 7, 1, 1)] + a[2:], {}, ValueError, "fc1_weight must have shape"),
    (lambda a: a[:3] + [torch.randn(8, 3)] + a[4:], {}, ValueError, "fc2_weight must have shape"),
    (lambda a: a[:2] + [torch.randn(3)] + a[3:], {}, ValueError, "fc1_bias must have shape"),
    (lambda a: a[:4] + [torch.randn(8).double()], {}, TypeError, "fc2_bias has dtype torch.float64"),
    (lambda a: [a[0], a[1].to("meta")] + a[2:], {}, ValueError, "fc1_weight is on meta"),
    (lambda a: a, dict(residual=torch.randn(2, 8, 5, 4)), ValueError, "residual must have x's shape"),
    (lambda a: a, dict(act="tanh"), ValueError, "act must be one of"),
    (lambda a: a, dict(gate="relu"), ValueError, "gate must be one of"),
    (lambda a: a, dict(out_act="gelu"), ValueError, "out_act must be one of"),
])
def test_bad_inputs(mutate, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastops.squeeze_excite(*mutate(_good()), **kwargs)


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.squeeze_excite called directly (no Python front) refuses inconsistent inputs."""
    x, w1, b1, w2, b2 = _good()
    skip_unless_runnable(OP, "cpu", x)
    with pytest.raises(RuntimeError, match="fc2_weight must be"):
        torch.ops.fastops.squeeze_excite(x, w1.flatten(1), b1, torch.randn(8, 3), b2, None, "relu", "sigmoid", "none")
    with pytest.raises(RuntimeError, match="residual must match"):
        torch.ops.fastops.squeeze_excite(x, w1.flatten(1), b1, w2.flatten(1), b2, torch.randn(1), "relu", "sigmoid",
                                         "none")
    with pytest.raises(RuntimeError, match="act 'tanh' is not supported"):
        torch.ops.fastops.squeeze_excite(x, w1.flatten(1), b1, w2.flatten(1), b2, None, "tanh", "sigmoid", "none")


def test_forced_backend_that_cannot_run_says_why():
    with fastops.use_backend("cuda"), pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        fastops.squeeze_excite(*_good())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_output_added_to_in_place_keeps_gradients(backend):
    """Without out_act the output is not needed by the backward, so it may be changed in place first
    (SE-ResNet's `x = se(x); x += shortcut`)."""
    g = torch.Generator().manual_seed(0)
    x0, w10, w20 = (torch.randn(2, 16, 7, 7, generator=g), torch.randn(4, 16, generator=g),
                    torch.randn(16, 4, generator=g))
    grads = {}
    for be in (backend, "reference"):
        x, w1, w2 = (t.clone().requires_grad_() for t in (x0, w10, w20))
        with fastops.use_backend(be):
            y = fastops.squeeze_excite(x, w1, None, w2, None, "relu")
        y += 1.0
        grads[be] = torch.autograd.grad(y.square().sum(), [x, w1, w2])
    for got, want, what in zip(grads[backend], grads["reference"], ("grad_x", "grad_fc1", "grad_fc2")):
        assert_close(got, want, torch.float32, what, tol=1e-4)
