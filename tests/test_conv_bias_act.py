"""conv_bn_act / conv_bias_act: every backend vs F.conv2d -> F.batch_norm -> activation (+ residual) in
float64, eval (BN folded, epilogue fused) and training (batch statistics): outputs, every gradient, running
statistics; the fastops.nn.ConvBNAct module."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops import backends
from fastops._layout import is_channels_last
from fastops.reference import BN_ACTS
from fastops.reference import conv_bias_act as ref_conv_bias_act

from ._util import (INTERPRET, TOL, assert_close, assert_close_reduced, assert_close_vs_pytorch,
                    check_compile_fullgraph, cpu_threads, make_layout, poison_allocator, rel_err, skip_unless_runnable)

OP = "conv_bias_act"
ACTS = tuple(BN_ACTS)

# (N, C_in, C_out, H, W, k, stride, padding, dilation, groups, act, residual, conv_bias)
CASES = [
    (2, 16, 24, 9, 9, 1, 1, 0, 1, 1, "relu", False, False),         # ResNet 1x1
    (1, 8, 16, 11, 13, 3, 1, 1, 1, 1, "relu", True, False),         # 3x3 + shortcut (bottleneck end)
    (2, 12, 8, 10, 9, 3, 2, 1, 1, 1, "relu6", False, True),         # stride 2, conv bias
    (1, 3, 16, 17, 15, 7, 2, 3, 1, 1, "relu", False, False),        # ResNet stem 7x7/2
    (2, 16, 16, 9, 10, 3, 1, 1, 1, 16, "relu6", False, False),      # MobileNetV2 depthwise
    (1, 24, 24, 12, 11, 5, 2, 2, 1, 24, "silu", False, False),      # depthwise 5x5/2
    (2, 12, 20, 7, 8, 3, 1, 2, 2, 4, "gelu", True, True),           # grouped, dilated
    (1, 37, 19, 5, 6, 1, 1, 0, 1, 1, "hardswish", True, False),     # odd channels
    (2, 6, 10, 6, 7, 3, 1, 1, 1, 1, "none", True, False),           # projection + residual, no act
]
NAMES = ("output", "grad_x", "grad_weight", "grad_conv_bias", "grad_bn_weight", "grad_bn_bias", "grad_residual")


def _case_id(c):
    N, ci, co, H, W, k, s, p, d, g, act, res, bias = c
    return (f"{N}x{ci}x{H}x{W}-o{co}-k{k}s{s}" + (f"d{d}" if d > 1 else "") + (f"g{g}" if g > 1 else "")
            + f"-{act}" + ("-res" if res else "") + ("-bias" if bias else ""))


def _out_hw(c):
    N, ci, co, H, W, k, s, p, d, g = c[:10]
    return (H + 2 * p - d * (k - 1) - 1) // s + 1, (W + 2 * p - d * (k - 1) - 1) // s + 1


def _case(case, dtype, device="cpu"):
    N, ci, co, H, W, k, s, p, d, g, act, res, bias = case
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    oh, ow = _out_hw(case)
    x = torch.randn(N, ci, H, W, device=device).to(dtype)
    w = (torch.randn(co, ci // g, k, k, device=device) / (ci // g * k * k) ** 0.5).to(dtype)
    cb = (torch.randn(co, device=device) * 0.3).to(pdt) if bias else None
    bw = (torch.randn(co, device=device) * 0.5 + 1).to(pdt)
    bb = (torch.randn(co, device=device) * 0.5).to(pdt)
    r = torch.randn(N, co, oh, ow, device=device).to(dtype) if res else None
    rm = (torch.randn(co, device=device) * 0.3).to(pdt)
    rv = (torch.rand(co, device=device) + 0.5).to(pdt)
    return [x, w, cb, bw, bb, r], [rm, rv], dict(stride=s, padding=p, dilation=d, groups=g, act=act)


def _run(backend, tensors, stats, opts, training, go, layout="contiguous", cast=lambda t: t):
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
    rm, rv = (cast(s).clone() for s in stats)
    x, w, cb, bw, bb, r = leaves
    xin = make_layout(x, layout)
    rin = None if r is None else make_layout(r, layout)
    with fastops.use_backend(backend):
        y = fastops.conv_bn_act(xin, w, cb, bw, bb, rm, rv, 1e-5, opts["stride"], opts["padding"],
                                opts["dilation"], opts["groups"], opts["act"], rin, training, 0.1)
    y.backward(cast(go))
    return [y] + [None if t is None else t.grad for t in leaves], [rm, rv]


def _run_conv_in_dtype(tensors, stats, opts, go):
    """The float64 reference given the conv output rounded to x's dtype (BN, residual and activation in
    float64): what a training step computes when the conv output is stored in x's dtype, as both PyTorch and
    fastops store it, before the batch statistics are taken."""
    leaves = [None if t is None else t.detach().requires_grad_() for t in tensors]
    x, w, cb, bw, bb, r = leaves
    rm, rv = (s.double().clone() for s in stats)
    y = F.conv2d(x.double(), w.double(), None if cb is None else cb.double(), opts["stride"], opts["padding"],
                 opts["dilation"], opts["groups"]).to(x.dtype)  # one rounding, as conv_bias_act stores it
    out = fastops.reference.bn_act(y.double(), bw.double(), bb.double(), rm, rv, 1e-5, opts["act"],
                                   None if r is None else r.double(), True, 0.1)
    out.backward(go.double())
    return [out] + [None if t is None else t.grad for t in leaves], [rm, rv]


def _check_all(backend, case, dtype, device, training, layout="contiguous"):
    tensors, stats, opts = _case(case, dtype, device)
    skip_unless_runnable(OP, backend, tensors[0], tensors[1], opts["groups"])
    oh, ow = _out_hw(case)
    go = torch.randn(case[0], case[2], oh, ow, device=device).to(dtype)
    cpu = [None if t is None else t.cpu() for t in tensors]
    cstats = [s.cpu() for s in stats]
    ref, ref_stats = _run("reference", cpu, cstats, opts, training, go.cpu(), cast=lambda t: t.double())
    low = dtype in (torch.float16, torch.bfloat16)
    if low and training:
        ref, ref_stats = _run_conv_in_dtype(cpu, cstats, opts, go.cpu())
    same, same_stats = _run("reference", cpu, cstats, opts, training, go.cpu())  # PyTorch's ops in `dtype`
    poison_allocator(4 * max(tensors[0].numel(), go.numel()), device)
    got, got_stats = _run(backend, tensors, stats, opts, training, go, layout)
    y = got[0]
    assert y.dtype == dtype and tuple(y.shape) == tuple(go.shape)
    if (layout == "channels_last" and is_channels_last(make_layout(tensors[0], layout))
            and min(y.shape[1], y.shape[2] * y.shape[3]) > 1):
        assert y.is_contiguous(memory_format=torch.channels_last)
    for g, r, rs, what in zip(got, ref, same, NAMES):
        assert (g is None) == (r is None), what
        if g is None:
            continue
        if what in ("output", "grad_residual", "grad_x"):
            assert g.dtype == dtype, what
        if what == "grad_conv_bias" and training:
            # Zero in exact arithmetic (BN removes any per-channel constant): held to rounding-noise size.
            scale = ref[NAMES.index("grad_bn_bias")].norm().item()
            assert g.norm().item() <= max(TOL[dtype] * scale, 4 * rs.norm().item()), what
        elif what == "output":
            assert_close(g, r, dtype, what)
        elif low:
            # half / bf16: the relu-like masks of the backward flip near 0 under any rounding of the forward
            # (e.g. of the conv bias into the conv output), so no computation in `dtype` reaches TOL of the
            # float64 gradients.
            assert_close_vs_pytorch(g, r, rs, dtype, what)
        else:
            assert_close_reduced(g, r, rs, dtype, what)
    if training:
        for g, r, what in zip(got_stats, ref_stats, ("running_mean", "running_var")):
            # fp32 statistics of the conv output, which half / bf16 store rounded (and round the conv bias into).
            assert_close(g, r, dtype if low else torch.float64 if dtype == torch.float64 else torch.float32, what)
    else:
        for g, s in zip(got_stats, stats):
            assert torch.equal(g, s), "eval mode changed a running statistic"


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cpu_backend(dtype, case, layout, training):
    _check_all("cpu", case, dtype, "cpu", training, layout)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[6]], ids=_case_id)
def test_cpu_backend_float64_and_strided(case, training):
    _check_all("cpu", case, torch.float64, "cpu", training)
    _check_all("cpu", case, torch.float32, "cpu", training, "strided")


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", [CASES[i] for i in (0, 1, 2, 4, 5, 7)], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(dtype, case, layout, training):
    _check_all("triton", case, dtype, "cpu", training, layout)


RESNET_MBV2 = [  # batch 2 versions of the model layers
    (2, 64, 256, 56, 56, 1, 1, 0, 1, 1, "relu", True, False), (2, 128, 128, 56, 56, 3, 2, 1, 1, 1, "relu", False, False),
    (2, 256, 256, 14, 14, 3, 1, 1, 1, 1, "relu", False, False), (2, 144, 144, 56, 56, 3, 1, 1, 1, 144, "relu6", False, False),
    (2, 144, 24, 56, 56, 1, 1, 0, 1, 1, "none", True, False),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", CASES + RESNET_MBV2, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends(backend, dtype, case, layout, training, monkeypatch):
    if dtype == torch.float32:
        # fp32 tl.dot may use tf32; the cuda backend's dense convs are cuDNN's, which follow
        # torch.backends.cudnn.allow_tf32 (True by default) as F.conv2d does.
        monkeypatch.setitem(TOL, torch.float32, 3e-4)
    _check_all(backend, case, dtype, "cuda", training, layout)


@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("act, res", [("relu6", False), ("relu", True)])
def test_cpu_depthwise_nchw_small_planes(act, res, k):
    """NCHW depthwise planes of at most 32 pixels per row: 3x3 (AVX-512) straight from the planes a plane at
    a time; 7x7 with C a multiple of 16 through 16-channel blocks (transposed, row tiles, transposed back).
    Either way the epilogue is applied to each plane after it is written: fp32 forward against conv2d +
    bias + residual + act, each output element checked."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 14, 13)
    w = torch.randn(32, 1, k, k)
    b = torch.randn(32)
    r = torch.randn(2, 32, 14, 13) if res else None
    with fastops.use_backend("cpu"):
        y = fastops.conv_bias_act(x, w, b, 1, k // 2, 1, 32, act, r)
    z = F.conv2d(x.double(), w.double(), b.double(), 1, k // 2, 1, 32) + (r.double() if res else 0)
    ref = F.relu6(z) if act == "relu6" else F.relu(z)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(n=st.integers(1, 2), ci=st.integers(1, 12), co=st.integers(1, 12), h=st.integers(3, 11),
       w=st.integers(3, 11), k=st.sampled_from([1, 3]), s=st.integers(1, 2), dw=st.booleans(),
       act=st.sampled_from(ACTS), res=st.booleans(), training=st.booleans(), cl=st.booleans())
def test_cpu_random_shapes(n, ci, co, h, w, k, s, dw, act, res, training, cl):
    if dw:
        co = ci
    if training and n * ((h - 1) // s + 1) * ((w - 1) // s + 1) < 2:
        n = 2
    case = (n, ci, co, h, w, k, s, k // 2, 1, ci if dw else 1, act, res, False)
    _check_all("cpu", case, torch.float32, "cpu", training, "channels_last" if cl else "contiguous")


# Shapes on which torch 2.14's oneDNN convolutions misbehave (channels_last): the fused forward crashed on a 1x1
# kernel with dilation 2 over a 1-pixel-wide map; the backward of a 1x1 stride-2 convolution corrupted the heap
# with two threads; the bf16 weight gradient of a 1x3 kernel over a 1-pixel-wide map at stride 2 was garbage.
# Each runs in a subprocess, so that a crash fails the test instead of ending the run.
_ONEDNN_DEFECTS = """
import sys, torch, torch.nn.functional as F, fastops
torch.set_num_threads(2)
torch.manual_seed(0)
cases = [
    ((1, 3, 4, 1), (4, 3, 1, 1), True, (1, 2), (0, 1), 2, torch.float32),
    ((3, 5, 8, 10), (5, 5, 1, 1), False, 2, 0, 1, torch.float32),
    ((3, 8, 8, 10), (8, 8, 1, 1), True, 2, 1, 1, torch.float32),
    ((1, 3, 4, 1), (3, 3, 1, 3), False, (1, 2), (0, 1), 1, torch.bfloat16),
    ((3, 5, 8, 10), (5, 5, 1, 1), False, 2, 0, 1, torch.bfloat16),
]
for xs, ws, bias, s, p, d, dt in cases:
    for _ in range(4):
        x = torch.randn(xs).to(dt).contiguous(memory_format=torch.channels_last).requires_grad_()
        w = (torch.randn(ws) * 0.3).to(dt).requires_grad_()
        b = torch.randn(ws[0]) if bias else None
        with fastops.use_backend("cpu"):
            y = fastops.conv_bias_act(x, w, b, stride=s, padding=p, dilation=d)
        go = torch.randn_like(y)
        gx, gw = torch.autograd.grad(y, (x, w), go)
        xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        yd = F.conv2d(xd, wd, None if b is None else b.double(), s, p, d)
        rx, rw = torch.autograd.grad(yd, (xd, wd), go.double())
        tol = 1e-5 if dt == torch.float32 else 2e-2
        for name, got, want in (("out", y, yd), ("grad_x", gx, rx), ("grad_w", gw, rw)):
            err = (got.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
            assert err <= tol, (xs, ws, dt, name, err)
print("ok")
"""


def test_cpu_onednn_defect_shapes():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", _ONEDNN_DEFECTS], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), (out.returncode, out.stdout, out.stderr[-2000:])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("groups, stride, padding", [(1, (2, 3), 0), (2, 2, (1, 0)), (4, (1, 2), 1)])
def test_cpu_strided_1x1_backward(groups, stride, padding, layout):
    # The strided channels_last 1x1 backward runs as the unstrided convolution of the pixels it reads.
    case = (2, 8, 12, 9, 10, 1, 1, 0, 1, groups, "silu", True, True)
    tensors, _, _ = _case(case, torch.float32)
    x, w, cb = make_layout(tensors[0], layout), tensors[1], tensors[2]
    oh, ow = F.conv2d(x, w, None, stride, padding, 1, groups).shape[2:]
    r = torch.randn(2, 12, oh, ow)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, cb, r)]
    want = F.silu(F.conv2d(leaves[0], leaves[1], leaves[2], stride, padding, 1, groups) + leaves[3])
    go = torch.randn_like(want)
    grads_want = torch.autograd.grad(want, leaves, go)
    got_leaves = [t.detach().requires_grad_() for t in (x, w, cb, r)]
    with backends.use_backend("cpu"):
        got = fastops.conv_bias_act(got_leaves[0], got_leaves[1], got_leaves[2], stride=stride, padding=padding,
                                    groups=groups, act="silu", residual=got_leaves[3])
    grads_got = torch.autograd.grad(got, got_leaves, go.float())
    assert_close(got, want, torch.float32, "output")
    for name, g, gw in zip(("grad_x", "grad_weight", "grad_bias", "grad_residual"), grads_got, grads_want):
        assert_close(g, gw, torch.float32, name)


def test_conv_args_at_the_bound_are_accepted():
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 1, 1, 1)
    for fn in (fastops.conv_bias_act, fastops.depthwise_conv2d):
        kw = dict(groups=2) if fn is fastops.conv_bias_act else {}
        y = fn(x, w, None, stride=2**20, padding=0, dilation=2**20, **kw)
        assert y.shape == (1, 2, 1, 1)
        with pytest.raises(ValueError, match="dilation must be <= 1048576"):
            fn(x, w, None, dilation=2**20 + 1, **kw)
    with pytest.raises(RuntimeError, match="must be <= 1048576"):
        torch.ops.fastops.depthwise_conv2d(x, w, None, [1, 1], [2**61, 0, 0, 0], [1, 1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cpu_depthwise_hardswish_grad_near_kink(dtype):
    # z = x w + b = 2.9996 in fp32 rounds to 3.0 in half / bf16: hardswish'(z) must be (2z + 3) / 6 = 1.4999,
    # not the 1 of z >= 3.
    x = torch.ones(1, 2, 3, 3, dtype=dtype, requires_grad=True)
    w = torch.ones(2, 1, 1, 1, dtype=dtype)
    b = torch.full((2,), 1.9996)
    with backends.use_backend("cpu"):
        y = fastops.conv_bias_act(x, w, b, groups=2, act="hardswish")
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.allclose(gx.float(), torch.full_like(gx.float(), (2 * 2.9996 + 3) / 6), atol=1e-2)


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(threads):
    with cpu_threads(threads):
        for case in (CASES[1], CASES[4]):
            _check_all("cpu", case, torch.float32, "cpu", True)
            _check_all("cpu", case, torch.float32, "cpu", False, "channels_last")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("groups", [1, 3], ids=["dense", "depthwise"])
def test_gradcheck_cpu_float64(training, groups):
    case = (2, 3, 3, 4, 5, 3, 1, 1, 1, groups, "silu", True, True)
    tensors, stats, opts = _case(case, torch.float64)
    inputs = tuple(t.detach().requires_grad_() for t in tensors)

    def f(x, w, cb, bw, bb, r):
        with fastops.use_backend("cpu"):
            return fastops.conv_bn_act(x, w, cb, bw, bb, stats[0].clone(), stats[1].clone(), 1e-5,
                                       opts["stride"], opts["padding"], opts["dilation"], opts["groups"],
                                       opts["act"], r, training)

    assert torch.autograd.gradcheck(f, inputs)


# 1x1 / stride 1 fp32 convolutions with up to 768 input channels run as fastops' own GEMM on the CPU
# (csrc/cpu/gemm_kernels.h), channels_last over the pixels as rows, NCHW with the weight's rows as rows and the
# pixels in panels (NCHW only for weights of up to 192 K elements). Output channels that fill 1-4 vectors of a
# panel, several panels, a partial last vector; pixel counts that leave a partial tile, chunk or pixel panel
# (35, 99 and 208 pixels: 1, 2 and 4 NCHW panels on AVX-512 builds); batch 1, whose rows are split across
# threads in NCHW; K = 769 past the GEMM's limit and a 512 x 400 weight past the NCHW one (oneDNN's path).
NCHW_GEMM_MAX_WEIGHT = 192 * 1024  # gemm::kMaxNchwWeight
CPU_GEMM = fastops._ext.BUILD_INFO.get("cpu_gemm") == "1"


def _check_1x1(x, wt, bias, res, act, gemm):
    """One CPU 1x1 conv_bias_act call against float64, in x's layout, on a poisoned allocator; `gemm`: whether
    fastops' GEMM should have served it (then no ATen / oneDNN convolution runs) or oneDNN's path."""
    n, co, h, w = x.shape[0], wt.shape[0], x.shape[2], x.shape[3]
    poison_allocator(n * co * h * w)
    with fastops.use_backend("cpu"), torch.profiler.profile() as prof:
        y = fastops.conv_bias_act(x, wt, bias, 1, 0, 1, 1, act, res)
    conv = any("convolution" in e.name for e in prof.events())
    assert conv != gemm, f"{'a' if conv else 'no'} library convolution ran"
    ref = ref_conv_bias_act(x.double(), wt.double(), None if bias is None else bias.double(),
                            None if res is None else res.double(), [1, 1], [0] * 4, [1, 1], 1, act)
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, ref, torch.float32, f"{act} bias={bias is not None} residual={res is not None}")


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("n, h, w", [(1, 5, 7), (2, 9, 11), (3, 16, 13)], ids=lambda v: str(v))
@pytest.mark.parametrize("ci, co", [(3, 16), (5, 7), (24, 48), (32, 64), (96, 96), (17, 112), (40, 200), (768, 40),
                                    (769, 24), (512, 400)])
def test_cpu_1x1_gemm(n, h, w, ci, co, layout):
    g = torch.Generator().manual_seed(ci * 1000 + co + h)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(n, ci, h, w, generator=g).contiguous(memory_format=fmt)
    wt = torch.randn(co, ci, 1, 1, generator=g) / ci ** 0.5
    b = torch.randn(co, generator=g)
    r = torch.randn(n, co, h, w, generator=g).contiguous(memory_format=fmt)
    # Builds without AVX2 + FMA leave the GEMM out.
    gemm = CPU_GEMM and ci <= 768 and (layout == "channels_last" or ci * co <= NCHW_GEMM_MAX_WEIGHT)
    for act in ACTS:
        for bias, res in ((b, r), (None, None), (b, None)):
            _check_1x1(x, wt, bias, res, act, gemm)


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_1x1_gemm_streamed_and_threads(threads, layout, monkeypatch):
    """The GEMM's streamed-store path (an output over the cache share: here any) on 1 and 3 threads, with the
    rows split across threads in units that are not whole chunks (channels_last: 899 pixels), or (NCHW, 192
    pixels, a multiple of 16 as the streamed stores need) the 6 (sample, pixel panel) pairs of an AVX-512
    build fewer than the 12 units 3 threads ask for, so that each panel's weight rows are split in two."""
    monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", "0")
    fmt, n, h, w = ((torch.channels_last, 1, 29, 31) if layout == "channels_last"
                    else (torch.contiguous_format, 2, 16, 12))
    x = torch.randn(n, 96, h, w).contiguous(memory_format=fmt)
    wt = torch.randn(160, 96, 1, 1) / 96 ** 0.5
    b, r = torch.randn(160), torch.randn(n, 160, h, w).contiguous(memory_format=fmt)
    with cpu_threads(threads), fastops.use_backend("cpu"):
        y = fastops.conv_bias_act(x, wt, b, 1, 0, 1, 1, "gelu", r)
    ref = ref_conv_bias_act(x.double(), wt.double(), b.double(), r.double(), [1, 1], [0] * 4, [1, 1], 1, "gelu")
    assert y.is_contiguous(memory_format=fmt)
    assert_close(y, ref, torch.float32)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n, ci, co, h, w", [(1, 64, 144, 7, 7), (3, 96, 96, 7, 7), (2, 24, 40, 3, 4),
                                             (1, 24, 72, 5, 5), (2, 17, 30, 1, 1), (1, 40, 144, 1, 1)],
                         ids=lambda v: str(v))
def test_cpu_1x1_gemm_nchw_small_maps(n, ci, co, h, w, threads):
    """NCHW maps of few pixels: panels of one or two vectors (12 and 25 pixels), the weight rows split into
    blocks for a few (sample, panel) pairs, with block counts that round down from what the threads ask for
    (144 rows at batch 1, 96 at batch 3); and one-pixel maps, which stay on oneDNN's path."""
    g = torch.Generator().manual_seed(ci * 100 + co)
    x = torch.randn(n, ci, h, w, generator=g)
    wt = torch.randn(co, ci, 1, 1, generator=g) / ci ** 0.5
    b, r = torch.randn(co, generator=g), torch.randn(n, co, h, w, generator=g)
    with cpu_threads(threads):
        for act in ("relu6", "gelu"):
            for res in (r, None):
                _check_1x1(x, wt, b, res, act, CPU_GEMM and h * w > 1)


def test_cpu_1x1_gemm_weight_changes_are_seen():
    """The packed weight panels kept between calls are rebuilt when the weight changes in place or is replaced."""
    x = torch.randn(2, 32, 6, 5).contiguous(memory_format=torch.channels_last)
    wt = torch.randn(48, 32, 1, 1) / 32 ** 0.5

    def check(weight):
        with fastops.use_backend("cpu"):
            y = fastops.conv_bias_act(x, weight, None, 1, 0, 1, 1, "none", None)
        assert_close(y, F.conv2d(x.double(), weight.double()), torch.float32)

    check(wt)
    wt.mul_(-2)
    check(wt)
    check(torch.randn(48, 32, 1, 1))


def _op_args(case=CASES[1], dtype=torch.float32):
    (x, w, cb, bw, bb, r), _, o = _case(case, dtype)
    b = torch.randn(w.shape[0])
    p = o["padding"]
    return (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), r.requires_grad_(), [o["stride"]] * 2,
            [p, p, p, p], [o["dilation"]] * 2, o["groups"], o["act"])


@pytest.mark.parametrize("case", [CASES[1], CASES[6], CASES[7]], ids=_case_id)
def test_opcheck_cpp(case):
    args = _op_args(case)
    skip_unless_runnable(OP, "cpu", args[0], args[1], args[7])
    torch.library.opcheck(torch.ops.fastops.conv_bias_act.default, args)
    det = [a.detach() if isinstance(a, torch.Tensor) else a for a in args]
    out = torch.ops.fastops.conv_bias_act(*det)
    torch.library.opcheck(torch.ops.fastops.conv_bias_act_backward.default,
                          (torch.randn_like(out), det[0], det[1], det[2], det[3], out, *det[4:]))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_opcheck_triton():
    torch.library.opcheck(torch.ops.fastops.conv_bias_act_triton.default, _op_args(CASES[7]))


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph(backend, training):
    tensors, stats, o = _case(CASES[7], torch.float32)

    def f(x, w, cb, bw, bb, r, rm, rv):
        return fastops.conv_bn_act(x, w, cb, bw, bb, rm, rv, 1e-5, o["stride"], o["padding"], o["dilation"],
                                   o["groups"], o["act"], r, training) * 2

    def run(fn):
        leaves = [None if t is None else t.detach().clone().requires_grad_() for t in tensors]
        rm, rv = (s.clone() for s in stats)
        y = fn(*leaves, rm, rv)
        y.square().sum().backward()
        return [y] + [None if t is None else t.grad for t in leaves] + [rm, rv]

    check_compile_fullgraph(backend, f, run, NAMES + ("running_mean", "running_var"))


def test_conv_bias_act_public_function():
    tensors, _, o = _case(CASES[6], torch.float32)
    x, w, cb, _, _, r = tensors
    y = fastops.conv_bias_act(x, w, cb, o["stride"], o["padding"], o["dilation"], o["groups"], o["act"], r)
    p = o["padding"]
    ref = ref_conv_bias_act(x.double(), w.double(), cb.double(), r.double(), [o["stride"]] * 2, [p] * 4,
                            [o["dilation"]] * 2, o["groups"], o["act"])
    assert_close(y, ref, torch.float32)
    y2 = fastops.conv_bias_act(x, w[:, :, :, :2], None, padding="same", groups=4)
    # "same" for a 3x2 kernel: one row above and below, the extra column at the end (as PyTorch pads).
    assert_close(y2, F.conv2d(F.pad(x.double(), (0, 1, 1, 1)), w[:, :, :, :2].double(), groups=4), torch.float32)


def test_eval_runs_no_batchnorm_or_activation_pass():
    """Eval conv_bn_act is one conv_bias_act kernel: no batch_norm, activation or add op on the feature map."""
    tensors, stats, o = _case(CASES[1], torch.float32)
    x, w, cb, bw, bb, r = tensors
    skip_unless_runnable(OP, "cpu", x, w, 1)
    with torch.no_grad(), torch.profiler.profile() as prof, fastops.use_backend("cpu"):
        fastops.conv_bn_act(x, w, cb, bw, bb, *stats, 1e-5, 1, 1, 1, 1, "relu", r)
    names = [e.name for e in prof.events()]
    assert names.count("fastops::conv_bias_act") == 1, names
    for banned in ("aten::batch_norm", "aten::native_batch_norm", "aten::relu", "aten::relu_", "fastops::bn_act"):
        assert banned not in names, (banned, names)


def test_autocast_cpu_bf16():
    tensors, stats, o = _case(CASES[1], torch.float32)
    x, w, cb, bw, bb, r = tensors
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.conv_bn_act(x, w, cb, bw, bb, *stats, 1e-5, 1, 1, 1, 1, "relu", r.bfloat16())
    assert y.dtype == torch.bfloat16
    ref = fastops.reference.conv_bn_act(x.bfloat16().double(), w.bfloat16().double(), None, bw.double(),
                                        bb.double(), stats[0].double(), stats[1].double(), 1e-5, 1, 1, 1, 1, "relu",
                                        r.bfloat16().double())
    assert_close(y, ref, torch.bfloat16)


@pytest.mark.parametrize("training", [False, True])
def test_module_autocast_leaves_float64_alone(training):
    """A float64 ConvBNAct under autocast stays float64, as nn.Conv2d -> nn.BatchNorm2d does (its eval path
    folded the weight and cast it to the autocast dtype, next to a float64 x: a TypeError)."""
    m = fastops.nn.ConvBNAct(4, 8, 3, padding=1, dtype=torch.float64).train(training)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    plain = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1, bias=False, dtype=torch.float64),
                                torch.nn.BatchNorm2d(8, dtype=torch.float64), torch.nn.ReLU()).train(training)
    plain.load_state_dict({"0.weight": m.conv.weight, **{f"1.{k}": v for k, v in m.bn.state_dict().items()}})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = m(x), plain(x)
    assert y.dtype == torch.float64 == want.dtype
    assert_close(y, want, torch.float64)


def _reorders(fn):
    """fn's result and how many times it had oneDNN reorder a convolution weight."""
    with torch.profiler.profile() as prof:
        out = fn()
    return out, [e.name for e in prof.events()].count("mkldnn::_reorder_convolution_weight")


def test_cpu_packed_weights_are_reused_and_follow_every_change():
    """channels_last fp32 on the CPU: a weight that needs no grad is packed for oneDNN once and reused; an
    in-place change, another input size, other conv arguments or another tensor are never served stale."""
    torch.manual_seed(5)
    x = torch.randn(2, 16, 9, 11).to(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 3, 3) / 12
    b = torch.randn(24)
    skip_unless_runnable(OP, "cpu", x, w, 1)
    if not torch.backends.mkldnn.is_available():
        pytest.skip("torch has no oneDNN here")

    def run(x=x, w=w, **kw):
        kw = {"padding": 1, **kw}
        y = fastops.conv_bias_act(x, w, b, act="relu", **kw)
        assert_close(y, F.relu(F.conv2d(x.double(), w.double(), b.double(), **kw)), torch.float32)
        return y

    with torch.no_grad(), fastops.use_backend("cpu"):
        _, first = _reorders(run)
        _, again = _reorders(run)
        if first == 0:
            pytest.skip("this torch's oneDNN path takes no packed weights")
        assert again == 0
        w.mul_(-1.5)  # in place: the version counter moves
        assert _reorders(run)[1] == 1
        assert _reorders(lambda: run(x=torch.cat([x, x, x]).contiguous(memory_format=torch.channels_last)))[1] == 1
        run(stride=2)
        run(dilation=2, padding=2)
        run(w=torch.randn(24, 16, 3, 3) / 12)
        for _ in range(3):  # more weights than the cache holds, each used twice (3x3: oneDNN's path)
            ws = [torch.randn(24, 16, 3, 3) / 12 for _ in range(300)]
            for wi in ws + ws:
                run(w=wi)
        run()
    with torch.inference_mode(), fastops.use_backend("cpu"):
        run()
        w.add_(0.25)
        run()
    m = fastops.nn.ConvBNAct(16, 24, 3, act="relu").eval()
    conv, bn = torch.nn.Conv2d(16, 24, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(24).eval()
    conv.load_state_dict(m.conv.state_dict())
    bn.load_state_dict(m.bn.state_dict())
    for mode in (torch.no_grad, torch.inference_mode):  # the module's folded weight is packed once
        with mode(), fastops.use_backend("cpu"):
            m.conv.weight.mul_(2), conv.weight.mul_(2)
            assert _reorders(lambda: assert_close(m(x), F.relu(bn(conv(x))), torch.float32))[1] == 1
            assert _reorders(lambda: assert_close(m(x), F.relu(bn(conv(x))), torch.float32))[1] == 0


# The module ------------------------------------------------------------------------------------------

def test_module_convbnact_matches_conv_bn_act_and_refreshes_its_fold():
    torch.manual_seed(2)
    m = fastops.nn.ConvBNAct(8, 16, 3, stride=2, act="relu6")
    conv, bn = torch.nn.Conv2d(8, 16, 3, 2, 1, bias=False), torch.nn.BatchNorm2d(16)
    assert set(m.state_dict()) == {"conv." + k for k in conv.state_dict()} | {"bn." + k for k in bn.state_dict()}
    conv.load_state_dict(m.conv.state_dict())
    bn.load_state_dict(m.bn.state_dict())
    x = torch.randn(2, 8, 11, 10)
    for _ in range(2):  # train: batch statistics, running stats, num_batches_tracked
        assert_close(m(x), F.relu6(bn(conv(x))), torch.float32)
    for k, v in bn.state_dict().items():
        assert torch.allclose(m.bn.state_dict()[k].double(), v.double(), rtol=1e-5, atol=1e-6), k
    m.eval(), bn.eval()
    with torch.no_grad():
        assert_close(m(x), F.relu6(bn(conv(x))), torch.float32)
        for mod in (m.bn, bn):  # an in-place change of a running statistic must reach the cached fold
            mod.running_var.mul_(3.0)
        assert_close(m(x), F.relu6(bn(conv(x))), torch.float32)
        m.conv.weight.add_(0.5), conv.weight.add_(0.5)
        assert_close(m(x), F.relu6(bn(conv(x))), torch.float32)


def test_module_plan_is_reused_only_while_everything_it_checked_holds(monkeypatch):
    """A no-grad eval call of ConvBNAct reuses the checked arguments of the previous one; any change to the
    input's shape / layout / dtype, the residual, the act, the modules' tensors or settings, grad mode,
    autocast, the forced backend or the mode must go through the full path again, and the plan must not keep
    x (or an old fold) alive."""
    import copy
    import pickle
    import weakref

    import fastops.nn.conv_bn as cb

    planned = []
    real_plan = cb.plan_conv_bias_act
    monkeypatch.setattr(cb, "plan_conv_bias_act", lambda *a: planned.append(1) or real_plan(*a))
    torch.manual_seed(3)
    m = fastops.nn.ConvBNAct(8, 8, 3, act="relu").eval()
    ref = torch.nn.Sequential(m.conv, m.bn, torch.nn.ReLU())
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1), m.bn.running_var.uniform_(0.5, 2)

    def check(x, residual=None, act=F.relu, full=True):
        n = len(planned)
        with torch.no_grad():
            y = m(x, residual)
            z = m.bn(m.conv(x)) + (0 if residual is None else residual)
        assert_close(y, act(z), torch.float32)
        assert is_channels_last(y) == is_channels_last(x)
        assert len(planned) == n + full, "full path" if full else "plan"
        return y

    x = torch.randn(2, 8, 9, 10)
    check(x)
    check(x, full=False)
    check(torch.randn(2, 8, 9, 10), full=False)  # new values, same shape: the plan holds
    check(torch.randn(2, 8, 7, 10))  # shape
    check(torch.randn(2, 8, 7, 10), full=False)
    xc = torch.randn(2, 8, 7, 10).contiguous(memory_format=torch.channels_last)
    check(xc)  # layout
    check(xc, full=False)
    r = torch.randn(2, 8, 7, 10).contiguous(memory_format=torch.channels_last)
    check(xc, r)  # residual
    check(xc, r, full=False)
    check(xc)
    with torch.no_grad():
        m.conv.weight.mul_(-1)  # in place: a new version
    check(xc)
    check(xc, full=False)
    with torch.no_grad():
        m.bn.running_var.mul_(3)
    check(xc)
    m.bn.weight = torch.nn.Parameter(torch.randn(8))  # replaced
    check(xc)
    m.conv.stride = (2, 2)  # a setting of the module
    ref_y = check(xc)
    assert ref_y.shape[2:] == (4, 5)
    m.conv.stride = (1, 1)
    check(xc)
    m.act_name = "relu6"
    check(xc, act=F.relu6)
    m.act_name = "relu"
    check(xc)
    with fastops.use_backend("reference"):  # forced backend
        check(xc)
        check(xc, full=False)
    check(xc)
    with torch.inference_mode():
        check(xc, full=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the full path, in bf16
        n = len(planned)
        with torch.no_grad():
            assert m(xc).dtype == torch.bfloat16
        assert len(planned) == n + 1
    check(xc)  # the autocast call refolded the weights in bf16, which dropped the plan
    check(xc, full=False)
    n = len(planned)
    xg = xc.clone().requires_grad_()  # grad mode on: the full path, and a graph
    y = m(xg)
    assert y.requires_grad and len(planned) == n + 1
    with torch.no_grad():
        m.conv.weight.add_(0.1)
    for p_ in m.parameters():
        p_.requires_grad_(False)
    # Grad mode on, nothing requiring grad: refolded and cached, but no plan made; the old one, which holds
    # the old fold, is dropped.
    assert_close(m(xc), F.relu(m.bn(m.conv(xc))), torch.float32)
    assert m._fold.plan is None
    for p_ in m.parameters():
        p_.requires_grad_(True)
    m.double()  # dtype: the full path
    check(xc.double(), act=lambda z: F.relu(z))
    check(xc.double(), full=False)
    m.float()
    check(xc)
    m.train()
    with torch.no_grad():
        y = m(xc)  # training: batch statistics, not the plan
    m.eval()
    assert_close(y, F.relu(F.batch_norm(m.conv(xc), None, None, m.bn.weight, m.bn.bias, True, 0.0, m.bn.eps)),
                 torch.float32)
    x = torch.randn(2, 8, 9, 10)
    alive = weakref.ref(x)
    with torch.no_grad():
        m(x), m(x)
    del x
    assert alive() is None
    # A module that has a plan pickles and deep-copies; the copies compute the same.
    x = torch.randn(2, 8, 9, 10)
    with torch.no_grad():
        y = m(x)
        for c in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):
            assert torch.equal(c(x), y)


def test_module_from_timm_conv_norm_act():
    timm_layers = pytest.importorskip("timm.layers")
    src = timm_layers.ConvNormAct(6, 10, 3, stride=1, act_layer=torch.nn.SiLU).eval()
    with torch.no_grad():
        src.bn.running_mean.normal_(), src.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 9, 9)
    ref = src(x)
    assert fastops.nn.ConvBNAct.is_convertible(src)
    m = fastops.optimize(src)
    assert isinstance(m, fastops.nn.ConvBNAct) and m.act_name == "silu"
    assert set(m.state_dict()) == set(src.state_dict())
    assert_close(m(x), ref, torch.float32)


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    return [torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3), None, torch.randn(4), torch.randn(4), torch.zeros(4),
            torch.ones(4)], {}


def _with(i, value):
    args, _ = _good()
    args[i] = value
    return args


@pytest.mark.parametrize("args, kwargs, exc, match", [
    (_with(0, torch.randn(2, 8, 6, 6).int()), {}, TypeError, "x must have a floating dtype"),
    (_with(0, torch.randn(8, 6, 6)), {}, ValueError, "x must be 4-D"),
    (_with(1, torch.randn(4, 7, 3, 3)), {}, ValueError, "weight must have shape \\(C_out, C_in / groups, kh, kw\\)"),
    (_with(1, torch.randn(4, 8, 3, 3).double()), {}, TypeError, "weight has dtype"),
    (_with(2, torch.randn(5)), {}, ValueError, "bias must have shape \\(4,\\)"),
    (_with(3, torch.randn(4, 1)), {}, ValueError, "bn_weight must be 1-D"),
    (_with(6, None), {}, ValueError, "running_mean and running_var are required"),
    (None, dict(groups=3), ValueError, "groups=3 must divide"),
    (None, dict(stride=0), ValueError, "stride must be >= 1"),
    (None, dict(padding=2**61), ValueError, "padding must be <= 1048576"),
    (None, dict(padding="full"), ValueError, "padding must be an int, a pair, 'same' or 'valid'"),
    (None, dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
    (None, dict(act="tanh"), ValueError, "act must be one of"),
    (None, dict(residual=torch.randn(2, 4, 6, 6)), ValueError, "residual must have the output's shape"),
    (None, dict(training=1), TypeError, "training must be a bool"),
    ([torch.randn(1, 8, 2, 2), torch.randn(4, 8, 5, 5), None, None, None, torch.zeros(4), torch.ones(4)], {},
     ValueError, "dilated kernel \\(5x5\\) is larger than the padded input"),
    (_with(0, None), {}, TypeError, "fastops.conv_bn_act: x must be a torch.Tensor, got NoneType"),
    (_with(0, [[1.0]]), dict(training=True), TypeError, "fastops.conv_bn_act: x must be a torch.Tensor, got list"),
    (_with(1, torch.randn(4, 8, 0, 3)), {}, ValueError, "fastops.conv_bn_act: weight kernel size must be >= 1"),
    (_with(1, torch.randn(4, 8, 3, 0)), dict(training=True), ValueError, "conv_bn_act: weight kernel size must be"),
    ([torch.randn(2, 0, 6, 6), torch.randn(4, 0, 3, 3), None, None, None, torch.zeros(4), torch.ones(4)], {},
     ValueError, "fastops.conv_bn_act: x must have C_in >= 1"),
    ([torch.randn(2, 8, 6, 6), torch.randn(0, 8, 3, 3), None, None, None, torch.zeros(0), torch.ones(0)], {},
     ValueError, "fastops.conv_bn_act: weight must have C_out >= 1"),
    (None, dict(eps=float("inf")), ValueError, "fastops.conv_bn_act: eps must be a positive finite float"),
    # Training runs the BN through bn_act: its errors still name conv_bn_act and conv_bn_act's arguments.
    (_with(3, torch.randn(3)), dict(training=True), ValueError,
     "fastops.conv_bn_act: bn_weight must have shape \\(4,\\)"),
    (_with(4, torch.randn(4, 1)), dict(training=True), ValueError, "fastops.conv_bn_act: bn_bias must be 1-D"),
    (_with(5, torch.randn(5)), dict(training=True), ValueError, "fastops.conv_bn_act: running_mean must have shape"),
    (_with(6, None), dict(training=True), ValueError, "fastops.conv_bn_act: give both running_mean and running_var"),
    (None, dict(training=True, residual=torch.randn(2, 4, 6, 6)), ValueError,
     "fastops.conv_bn_act: residual must have the output's shape \\(2, 4, 4, 4\\)"),
    (None, dict(training=True, residual=torch.randn(2, 4, 4, 4).double()), TypeError,
     "fastops.conv_bn_act: residual has dtype"),
    (None, dict(training=True, eps=-1.0), ValueError, "fastops.conv_bn_act: eps must be a positive finite float"),
    (None, dict(training=True, momentum=5.0), ValueError, "fastops.conv_bn_act: momentum must be a float in"),
])
def test_bad_inputs(args, kwargs, exc, match):
    good_args, good_kwargs = _good()
    with pytest.raises(exc, match=match):
        fastops.conv_bn_act(*(args or good_args), **{**good_kwargs, **kwargs})


@pytest.mark.parametrize("args, exc, match", [
    ([torch.randn(2, 4, 5, 5), torch.randn(6, 4, 0, 3)], ValueError, "fastops.conv_bias_act: weight kernel size must"),
    ([torch.randn(2, 0, 5, 5), torch.randn(6, 0, 3, 3)], ValueError, "fastops.conv_bias_act: x must have C_in >= 1"),
    ([None, torch.randn(6, 4, 3, 3)], TypeError, "fastops.conv_bias_act: x must be a torch.Tensor"),
    ([torch.randn(2, 4, 5, 5), None], TypeError, "fastops.conv_bias_act: weight must be a torch.Tensor"),
])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_bad_inputs_conv_bias_act(args, exc, match, backend):
    """Refused up front, the same on every backend (an empty kernel reached oneDNN; C_in = 0 ran forward on the
    cpu kernel and then failed in its backward)."""
    with fastops.use_backend(backend), pytest.raises(exc, match=match):
        fastops.conv_bias_act(*args, None, 1, 1)


def test_double_backward_raises():
    """Second-order gradients through the conv kernel raise instead of coming back as zeros."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    skip_unless_runnable(OP, "cpu", x, w, 1)
    grads = {}
    for backend in ("cpu", "reference"):
        with fastops.use_backend(backend):
            y = fastops.conv_bias_act(x, w, None, 1, 1, act="silu")
        grads[backend] = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
    for got, want, what in zip(grads["cpu"], grads["reference"], ("grad_x", "grad_weight")):
        assert_close(got, want, torch.float64, what)
    with pytest.raises(RuntimeError, match="fastops.conv_bias_act: gradients of gradients"):
        torch.autograd.grad(grads["cpu"][1].sum(), (x, w))


@pytest.mark.parametrize("training", [False, True])
def test_reference_backend_takes_fp32_parameters_with_fp64_x(training):
    """conv bias / BN parameters / running stats in fp32 with a float64 x: accepted by the op and the cpu
    backend, and by the reference backend (forced, or the fallback without fastops._C), which agrees."""
    case = CASES[2]
    tensors, stats, opts = _case(case, torch.float64)
    tensors = [None if t is None else t.float() if t.dim() == 1 else t for t in tensors]
    stats = [t.float() for t in stats]
    skip_unless_runnable(OP, "cpu", tensors[0], tensors[1], opts["groups"])
    go = torch.randn(case[0], case[2], *_out_hw(case), dtype=torch.float64)
    got, got_stats = _run("cpu", tensors, stats, opts, training, go)
    want, want_stats = _run("reference", tensors, stats, opts, training, go)
    for g, e, what in zip(got + got_stats, want + want_stats, NAMES + ("running_mean", "running_var")):
        if e is None:
            continue
        assert g.dtype == e.dtype, what
        if training and what == "grad_conv_bias":  # the batch mean removes the conv bias: its gradient is ~0
            assert g.abs().max() < 1e-9 and e.abs().max() < 1e-9
        else:
            assert_close(g, e, torch.float32, what)


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.conv_bias_act called directly (no Python front) refuses inconsistent inputs."""
    x, w = torch.randn(2, 8, 6, 6), torch.randn(4, 8, 3, 3)
    skip_unless_runnable(OP, "cpu", x, w, 1)
    conv = torch.ops.fastops.conv_bias_act
    with pytest.raises(RuntimeError, match="weight"):
        conv(x, torch.randn(4, 7, 3, 3), None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, "relu")
    with pytest.raises(RuntimeError, match="bias"):
        conv(x, w, torch.randn(5), None, [1, 1], [1, 1, 1, 1], [1, 1], 1, "relu")
    with pytest.raises(RuntimeError, match="residual"):
        conv(x, w, None, torch.randn(2, 4, 5, 6), [1, 1], [1, 1, 1, 1], [1, 1], 1, "relu")
    with pytest.raises(RuntimeError, match="groups"):
        conv(x, w, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 3, "relu")
    with pytest.raises(RuntimeError, match="act"):
        conv(x, w, None, None, [1, 1], [1, 1, 1, 1], [1, 1], 1, "tanh")
    with pytest.raises(RuntimeError, match="stride"):
        conv(x, w, None, None, [0, 1], [1, 1, 1, 1], [1, 1], 1, "relu")


def test_forced_backend_that_cannot_run_says_why():
    args, kwargs = _good()
    with fastops.use_backend("cuda"), pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        fastops.conv_bn_act(*args, **kwargs)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_output_added_to_in_place_keeps_gradients(backend, act):
    """Only relu / relu6 need the output in the backward; with other acts the output may be changed in place
    before backward (timm's `x = bn3(conv3(x)); x += shortcut`), as with PyTorch's own conv."""
    g = torch.Generator().manual_seed(0)
    x0, w0 = torch.randn(2, 8, 9, 9, generator=g), torch.randn(16, 8, 1, 1, generator=g)
    grads = {}
    for be in (backend, "reference"):
        x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        with fastops.use_backend(be):
            y = fastops.conv_bias_act(x, w, None, act=act)
        y += 1.0
        grads[be] = torch.autograd.grad(y.square().sum(), [x, w])
    for got, want, what in zip(grads[backend], grads["reference"], ("grad_x", "grad_weight")):
        assert_close(got, want, torch.float32, what, tol=1e-4)


def test_compiled_channels_last_chain_matches_eager():
    """torch.compile's code reuses one buffer for both folded weights and writes it without a version bump: a
    packed weight kept from the first conv must not serve the second (it did, rel. error ~1)."""
    torch.manual_seed(0)
    layers = [(torch.nn.Conv2d(16, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16).eval()) for _ in range(2)]
    for _, bn in layers:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)

    def f(x):
        for conv, bn in layers:
            x = fastops.conv_bn_act(x, conv.weight, None, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                                    bn.eps, padding=1)
        return x

    x = torch.randn(1, 16, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), fastops.use_backend("cpu"):
        want = f(x)
        compiled = torch.compile(f, fullgraph=True)
        for _ in range(2):  # the second call runs the cached compiled code
            assert_close(compiled(x), want, torch.float32, "compiled output")
