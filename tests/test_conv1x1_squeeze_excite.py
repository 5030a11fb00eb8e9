"""conv1x1_squeeze_excite: the CPU backend vs the plain-PyTorch conv2d + SEModule path in float64, forward and
all gradients, on both of its CPU schedules (fused, and conv_bias_act then squeeze_excite)."""
import pytest
import torch

import fastops
from fastops import backends
from fastops._layout import is_channels_last

from ._util import (TOL, assert_close, assert_close_reduced, assert_close_vs_pytorch, check_compile_fullgraph,
                    cpu_threads, make_layout, poison_allocator, skip_unless_runnable)

OP = "conv1x1_squeeze_excite"

# (N, C_in, C, H, W, R). The fused schedule takes fp32 maps whose 1x1 conv runs as fastops' GEMM (C_in <= 768,
# and in NCHW more than one pixel); the others run the two kernels in turn.
SHAPES = [
    (8, 16, 40, 7, 5, 4),    # C not a multiple of a vector
    (4, 8, 20, 16, 10, 3),   # a sample's x larger than the weights
    (3, 100, 24, 1, 3, 4),   # C_in pooled in two blocks (64 + 36, a scalar tail); a GEMM tile spans samples
    (2, 96, 40, 2, 2, 4),    # as above, with C = 40 a partial panel
    (4, 37, 53, 9, 3, 5),    # odd channels and map
    (3, 24, 32, 6, 6, 8),    # odd batch
    (1, 20, 70, 5, 5, 4),    # one sample: a GEMM tile's rows from a single sample, C past one panel
    (2, 12, 20, 1, 1, 2),    # one pixel: the two kernels (a 1x1 map counts as NCHW)
    (2, 776, 24, 3, 2, 4),   # C_in > 768: the two kernels
]
# (act, gate, residual, out_act, bias, fc bias)
CONFIGS = [
    ("relu", "sigmoid", True, "relu", True, True),      # SE-ResNet: relu(se(bn3(conv3 x)) + shortcut)
    ("relu", "sigmoid", False, "none", False, True),    # conv without bias, timm's SEModule
    ("silu", "hard_sigmoid", True, "none", True, False),
]
NAMES = ("output", "grad_x", "grad_weight", "grad_bias", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight",
         "grad_fc2_bias", "grad_residual")
REDUCED = ("grad_weight", "grad_bias", "grad_fc1_weight", "grad_fc1_bias", "grad_fc2_weight", "grad_fc2_bias")


def _case(shape, dtype, layout, cfg):
    N, K, C, H, W, R = shape
    act, gate, res, out_act, bias, fc_bias = cfg
    x = make_layout(torch.randn(N, K, H, W).to(dtype), layout)
    w = (torch.randn(C, K, 1, 1) / K ** 0.5).to(dtype)
    # A folded BatchNorm's bias is fp32 next to a half weight (fp64 next to an fp64 one).
    b = torch.randn(C).to(torch.float64 if dtype == torch.float64 else torch.float32) if bias else None
    w1 = (torch.randn(R, C, 1, 1) / C ** 0.5).to(dtype)
    w2 = (torch.randn(C, R, 1, 1) * 2 / R ** 0.5).to(dtype)
    b1 = torch.randn(R).to(dtype) if fc_bias else None
    b2 = torch.randn(C).to(dtype) if fc_bias else None
    r = make_layout(torch.randn(N, C, H, W).to(dtype), layout) if res else None
    return [x, w, b, w1, b1, w2, b2, r], dict(act=act, gate=gate, out_act=out_act)


def _run(backend, tensors, opts, go, cast=lambda t: t):
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
    with fastops.use_backend(backend):
        y = fastops.conv1x1_squeeze_excite(*leaves[:7], residual=leaves[7], **opts)
    y.backward(cast(go))
    return [y] + [None if t is None else t.grad for t in leaves]


def _check(shape, dtype, layout, cfg):
    tensors, opts = _case(shape, dtype, layout, cfg)
    skip_unless_runnable(OP, "cpu", tensors[0])
    N, _, C, H, W, _ = shape
    go = torch.randn(N, C, H, W).to(dtype)
    ref = _run("reference", tensors, opts, go, lambda t: t.double())
    ref_same = _run("reference", tensors, opts, go)
    poison_allocator(2 * N * C * H * W)
    got = _run("cpu", tensors, opts, go)
    y = got[0]
    assert y.dtype == dtype and y.shape == (N, C, H, W)
    fmt = torch.channels_last if is_channels_last(tensors[0]) else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    for g, r, rs, what in zip(got, ref, ref_same, NAMES):
        assert (g is None) == (r is None), what
        if g is None:
            continue
        if dtype in (torch.float16, torch.bfloat16):
            # The half path rounds the convolution's output (and in the backward the SE's grad_x) to x's dtype
            # between the two steps, as PyTorch's conv2d then SEModule do.
            assert_close_vs_pytorch(g, r, rs, dtype, what)
        elif what in REDUCED:
            assert_close_reduced(g, r, rs, dtype, what)
        else:
            assert_close(g, r, dtype, what)


def _cfg_id(c):
    return f"{c[0]}-{c[1]}" + ("-res" if c[2] else "") + f"-{c[3]}" + ("-bias" if c[4] else "")


@pytest.mark.parametrize("cfg", CONFIGS, ids=_cfg_id)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_cpu_float32(layout, shape, cfg):
    with cpu_threads(2):
        _check(shape, torch.float32, layout, cfg)


@pytest.mark.parametrize("cfg", CONFIGS[:2], ids=_cfg_id)
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_other_dtypes(dtype, layout, shape, cfg):
    _check(shape, dtype, layout, cfg)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_thread_counts(threads, layout):
    with cpu_threads(threads):
        _check((8, 16, 40, 7, 5, 4), torch.float32, layout, CONFIGS[0])


def _ops_run(fn):
    """The fastops ops that fn() dispatches to (the two-kernel schedule calls fastops::conv_bias_act)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages() if e.key.startswith("fastops::")}


@pytest.mark.parametrize("shape", [(8, 64, 96, 14, 14, 8), (8, 64, 256, 7, 7, 16)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fused_schedule_runs_and_matches_two_kernels(layout, shape):
    """fp32, batch 8, SE-ResNet-like layers: the fused schedule runs (no separate conv_bias_act call), and
    gives what conv_bias_act then squeeze_excite give to fp32 rounding (it pools x, not the conv's output)."""
    tensors, opts = _case(shape, torch.float32, layout, CONFIGS[0])
    x, w, b, w1, b1, w2, b2, r = tensors
    skip_unless_runnable(OP, "cpu", x)
    call = lambda: fastops.conv1x1_squeeze_excite(*tensors[:7], residual=r, **opts)  # noqa: E731
    with torch.no_grad(), cpu_threads(2):
        fused, ops = _ops_run(call)
        assert "fastops::conv_bias_act" not in ops, ops
        with fastops.use_backend("cpu"):
            y = fastops.conv_bias_act(x, w, b, act="none")
            two = fastops.squeeze_excite(y, w1, b1, w2, b2, residual=r, **opts)
    assert_close(fused, two, torch.float32)


def test_two_kernel_schedule_runs():
    """C_in > 768 leaves the conv to oneDNN: the op then calls conv_bias_act (and squeeze_excite's kernel)."""
    tensors, opts = _case((2, 776, 24, 3, 2, 4), torch.float32, "channels_last", CONFIGS[0])
    skip_unless_runnable(OP, "cpu", tensors[0])
    with torch.no_grad():
        _, ops = _ops_run(lambda: fastops.conv1x1_squeeze_excite(*tensors[:7], residual=tensors[7], **opts))
    assert "fastops::conv_bias_act" in ops, ops


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_cpu_float64(layout):
    tensors, opts = _case((2, 5, 6, 4, 3, 2), torch.float64, layout, CONFIGS[0])
    inputs = tuple(t.detach().requires_grad_() for t in tensors)

    def f(x, w, b, w1, b1, w2, b2, r):
        with fastops.use_backend("cpu"):
            return fastops.conv1x1_squeeze_excite(x, w, b, w1, b1, w2, b2, residual=r, **opts)

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_opcheck(cl):
    tensors, opts = _case((8, 12, 20, 5, 4, 3), torch.float32, "channels_last" if cl else "contiguous", CONFIGS[0])
    x, w, b, w1, b1, w2, b2, r = tensors
    skip_unless_runnable(OP, "cpu", x)
    args = [t.requires_grad_() for t in (x, w, b, w1.flatten(1), b1, w2.flatten(1), b2, r)]
    torch.library.opcheck(torch.ops.fastops.conv1x1_squeeze_excite.default,
                          (*args, opts["act"], opts["gate"], opts["out_act"]))


def test_torch_compile_fullgraph():
    tensors, opts = _case((8, 16, 24, 6, 5, 4), torch.float32, "channels_last", CONFIGS[0])

    def f(x, w, b, w1, b1, w2, b2, r):
        return fastops.conv1x1_squeeze_excite(x, w, b, w1, b1, w2, b2, residual=r, **opts) * 2

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves]

    check_compile_fullgraph("cpu", f, run, NAMES)


def test_autocast_cpu_bf16():
    """Under autocast the convolution runs in bf16 (x and weight cast, as conv2d's autocast does) and the SE
    keeps that dtype, its fp32 parameters and residual cast to it."""
    tensors, opts = _case((2, 16, 24, 6, 6, 4), torch.float32, "contiguous", CONFIGS[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.conv1x1_squeeze_excite(*tensors[:7], residual=tensors[7], **opts)
    assert y.dtype == torch.bfloat16
    cast = [None if t is None else t.to(torch.bfloat16).double() for t in tensors]
    cast[2] = tensors[2].double()  # the bias stays fp32: added in fp32 by the convolution
    with fastops.use_backend("reference"):
        ref = fastops.conv1x1_squeeze_excite(*cast[:7], residual=cast[7], **opts)
    assert_close_vs_pytorch(y, ref, ref, torch.bfloat16, "output", factor=1.0)


def test_cuda_tensors_have_no_kernel():
    assert backends.reasons(OP, torch.empty(1, 1, 1, 1))["cuda"] == "not implemented for this op"
    assert backends.reasons(OP, torch.empty(1, 1, 1, 1))["triton"] == "not implemented for this op"


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    return [torch.randn(2, 6, 5, 5), torch.randn(8, 6, 1, 1), torch.randn(8), torch.randn(2, 8, 1, 1),
            torch.randn(2), torch.randn(8, 2, 1, 1), torch.randn(8)]


@pytest.mark.parametrize("mutate, kwargs, exc, match", [
    (lambda a: [a[0].int()] + a[1:], {}, TypeError, "x must have a floating dtype"),
    (lambda a: [a[0][0]] + a[1:], {}, ValueError, "x must be 4-D"),
    (lambda a: [a[0][:, :, :0]] + a[1:], {}, ValueError, "H \\* W >= 1"),
    (lambda a: [a[0], torch.randn(8, 5, 1, 1)] + a[2:], {}, ValueError, "weight must have shape \\(C, C_in, 1, 1\\)"),
    (lambda a: a[:3] + [torch.randn(2, 6, 1, 1)] + a[4:], {}, ValueError, "C = 8 \\(weight.shape\\[0\\]\\)"),
    (lambda a: [a[0], torch.randn(8, 6, 3, 3)] + a[2:], {}, ValueError, "weight must have shape \\(C, C_in, 1, 1\\)"),
    (lambda a: [a[0], a[1].double()] + a[2:], {}, TypeError, "weight has dtype torch.float64"),
    (lambda a: a[:2] + [torch.randn(7)] + a[3:], {}, ValueError, "bias must have shape \\(8,\\)"),
    (lambda a: a[:3] + [torch.randn(2, 7, 1, 1)] + a[4:], {}, ValueError, "fc1_weight must have shape"),
    (lambda a: a[:5] + [torch.randn(8, 3)] + a[6:], {}, ValueError, "fc2_weight must have shape"),
    (lambda a: a, dict(residual=torch.randn(2, 6, 5, 5)), ValueError, "residual must have the output's shape"),
    (lambda a: a, dict(act="tanh"), ValueError, "act must be one of"),
    (lambda a: a, dict(out_act="gelu"), ValueError, "out_act must be one of"),
])
def test_bad_inputs(mutate, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastops.conv1x1_squeeze_excite(*mutate(_good()), **kwargs)


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.conv1x1_squeeze_excite called directly (no Python front) refuses inconsistent inputs."""
    x, w, b, w1, b1, w2, b2 = _good()
    skip_unless_runnable(OP, "cpu", x)
    w1, w2 = w1.flatten(1), w2.flatten(1)
    call = torch.ops.fastops.conv1x1_squeeze_excite
    with pytest.raises(RuntimeError, match="weight must be \\(C, C_in, 1, 1\\)"):
        call(x, torch.randn(8, 6, 3, 3), b, w1, b1, w2, b2, None, "relu", "sigmoid", "none")
    with pytest.raises(RuntimeError, match="bias must be \\(C,\\)"):
        call(x, w, torch.randn(3), w1, b1, w2, b2, None, "relu", "sigmoid", "none")
    with pytest.raises(RuntimeError, match="fc2_weight must be"):
        call(x, w, b, w1, b1, torch.randn(8, 3), b2, None, "relu", "sigmoid", "none")
    with pytest.raises(RuntimeError, match="residual must be"):
        call(x, w, b, w1, b1, w2, b2, torch.randn(1), "relu", "sigmoid", "none")
    with pytest.raises(RuntimeError, match="act 'tanh' is not supported"):
        call(x, w, b, w1, b1, w2, b2, None, "tanh", "sigmoid", "none")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_direct_op_call_strided_vectors(layout):
    """Strided bias and fc biases passed to the op directly (no Python front making them contiguous)."""
    tensors, opts = _case((8, 16, 40, 7, 5, 4), torch.float32, layout, CONFIGS[0])
    x, w, b, w1, b1, w2, b2, r = tensors
    skip_unless_runnable(OP, "cpu", x)
    b, b1, b2 = (torch.stack([t, torch.full_like(t, 1e3)], 1)[:, 0] for t in (b, b1, b2))
    assert not b.is_contiguous()
    with torch.no_grad(), cpu_threads(2):
        out, _ = torch.ops.fastops.conv1x1_squeeze_excite(x, w, b, w1.flatten(1), b1, w2.flatten(1), b2, r,
                                                           opts["act"], opts["gate"], opts["out_act"])
        with fastops.use_backend("reference"):
            ref = fastops.conv1x1_squeeze_excite(*(t.double() for t in (x, w, b, w1, b1, w2, b2)),
                                                 residual=r.double(), **opts)
    assert_close(out, ref, torch.float32)
