"""depthwise_conv2d: every backend vs F.conv2d(groups=C) in float64, forward and all gradients."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops.nn.conv_bn import FusedConv2d
from fastops import backends
from fastops._layout import is_channels_last
from fastops.ops.depthwise_conv2d import _padding4

from ._util import (HAS_CUDA, INTERPRET, LAYOUTS, TOL, assert_close, backend_params, check_compile_fullgraph,
                    make_layout, poison_allocator, skip_unless_runnable)

OP = "depthwise_conv2d"

# (N, C, H, W, kernel, stride, padding, dilation): the models' layers plus odd ones they never use.
GEOMS = [
    (3, 37, 29, 17, 3, 1, 1, 1),        # odd everything, MobileNet 3x3 s1
    (1, 37, 29, 17, 3, 2, 1, 1),        # MobileNet 3x3 s2
    (2, 16, 14, 14, 7, 1, 3, 1),        # FastViT / ConvNeXt 7x7
    (2, 8, 13, 11, 5, 2, 2, 1),         # EfficientNet-style 5x5 s2
    (1, 5, 12, 15, (3, 5), (2, 1), (0, 2), (1, 1)),  # non-square kernel, stride and padding
    (2, 6, 20, 20, 3, 1, 2, 2),         # dilation 2
    (1, 3, 10, 9, 4, 1, "same", 1),     # even kernel, asymmetric "same" padding
    (1, 4, 9, 9, 3, 3, "valid", (2, 1)),  # stride 3, valid, non-square dilation
    (3, 1, 7, 5, 1, 1, 0, 1),           # C = 1, 1x1 kernel
    (1, 2, 33, 33, 31, 1, 15, 1),       # largest kernel
]


def _case(geom, dtype, layout, device="cpu"):
    N, C, H, W, k, s, p, d = geom
    kh, kw = (k, k) if isinstance(k, int) else k
    x = make_layout(torch.randn(N, C, H, W, device=device).to(dtype), layout)
    w = torch.randn(C, 1, kh, kw, device=device).to(dtype)
    b = torch.randn(C, device=device).to(dtype)
    return x, w, b, s, p, d


def _reference_f64(x, w, b, s, p, d, go):
    """Outputs and gradients of F.conv2d in float64 on the CPU (the oracle)."""
    xr, wr, br = (t.detach().cpu().double().requires_grad_() for t in (x, w, b))
    y = F.conv2d(xr, wr, br, s, p, d, groups=x.shape[1])
    y.backward(go.detach().cpu().double())
    return y.detach(), xr.grad, wr.grad, br.grad


def _run(backend, x, w, b, s, p, d, go):
    # detach() keeps x's strides (clone() would densify the strided case)
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, w, b))
    with fastops.use_backend(backend):
        y = fastops.depthwise_conv2d(xs, ws, bs, s, p, d)
        y.backward(go)
    return y, xs.grad, ws.grad, bs.grad


def _check_all(backend, geom, dtype, layout, device):
    x, w, b, s, p, d = _case(geom, dtype, layout, device)
    skip_unless_runnable(OP, backend, x, w, b)
    with torch.no_grad():
        shape = F.conv2d(x.float(), w.float(), None, s, p, d, groups=x.shape[1]).shape
    go = torch.randn(shape, device=device).to(dtype)
    y_ref, gx_ref, gw_ref, gb_ref = _reference_f64(x, w, b, s, p, d, go)
    poison_allocator(y_ref.numel() + x.numel(), device)
    y, gx, gw, gb = _run(backend, x, w, b, s, p, d, go)
    assert y.dtype == dtype and y.device == x.device
    # channels_last in, channels_last out; a tensor that is both layouts (C == 1 or H == W == 1) counts as NCHW
    want_cl = is_channels_last(x)
    assert want_cl == (layout == "channels_last" and not x.is_contiguous())
    assert y.is_contiguous(memory_format=torch.channels_last if want_cl else torch.contiguous_format)
    assert_close(y, y_ref, dtype, "output")
    assert_close(gx, gx_ref, dtype, "grad_input")
    assert_close(gw, gw_ref, dtype, "grad_weight")
    assert_close(gb, gb_ref, dtype, "grad_bias")


@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "x".join(map(str, g[:4])) + f"-k{g[4]}s{g[5]}p{g[6]}d{g[7]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_backend(geom, layout, dtype):
    _check_all("cpu", geom, dtype, layout, "cpu")


# The interpreter runs each program in numpy, so the Triton grid is smaller (but covers every branch:
# strides, dilation, asymmetric padding, layouts).
TRITON_GEOMS = [
    (2, 6, 11, 9, 3, 1, 1, 1),
    (1, 5, 13, 10, 3, 2, 1, 1),
    (1, 4, 10, 10, 7, 1, 3, 1),
    GEOMS[4], GEOMS[6], GEOMS[7],
]


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
@pytest.mark.parametrize("geom", TRITON_GEOMS, ids=lambda g: "x".join(map(str, g[:4])) + f"-k{g[4]}s{g[5]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(geom, layout, dtype):
    _check_all("triton", geom, dtype, layout, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("geom", GEOMS, ids=lambda g: "x".join(map(str, g[:4])) + f"-k{g[4]}s{g[5]}")
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends(backend, geom, layout, dtype):
    _check_all(backend, geom, dtype, layout, "cuda")


def test_reference_backend_matches_conv2d():
    x, w, b, s, p, d = _case(GEOMS[0], torch.float32, "channels_last")
    with fastops.use_backend("reference"):
        y = fastops.depthwise_conv2d(x, w, b, s, p, d)
    assert_close(y, F.conv2d(x.double(), w.double(), b.double(), s, p, d, groups=x.shape[1]), torch.float32)
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_cpu_streamed_output(monkeypatch):
    """FASTOPS_LLC_SHARE_BYTES=0 makes every fp32 channels_last output count as too large for the cache:
    the forward writes it with streaming stores where a vector is 32-byte aligned (C = 16, 48) and plain
    stores elsewhere (C = 37: misaligned pixels and a scalar channel tail). Same values."""
    monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", "0")
    for geom in [GEOMS[0], GEOMS[1], (2, 16, 14, 14, 7, 1, 3, 1), (2, 48, 15, 13, 3, 2, 1, 1)]:
        _check_all("cpu", geom, torch.float32, "channels_last", "cpu")


@pytest.mark.parametrize("k, s", [(3, 1), (5, 1), (7, 1), (3, 2), (5, 2)])
@pytest.mark.parametrize("dtype, C, share", [(torch.float32, 35, None), (torch.bfloat16, 35, None),
                                             (torch.float32, 32, "0")], ids=["fp32", "bf16", "fp32-streamed"])
def test_cpu_channels_last_row_tiles(k, s, dtype, C, share, monkeypatch):
    """channels_last rows with these kernel widths and strides go through tiles of 8 / 4 / 1 pixels that
    mask the padding at the row's ends, and the last tile of a row may overlap the one before: every width
    from 1 to 19 and every padding up to k - 1 (wider than the kernel's half, so both ends are masked), with
    channels in 16-channel groups and left over (C = 35), or whole groups stored around the cache (C = 32,
    FASTOPS_LLC_SHARE_BYTES=0), each output element checked, and in fp32 each element of grad_input and of
    grad_weight (summed per kernel row with the input window sliding in registers) and grad_bias."""
    if share is not None:
        monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", share)
    torch.manual_seed(0)
    w = torch.randn(C, 1, 3, k).to(dtype)
    b = torch.randn(C).to(dtype)
    for W in range(1, 20):
        for p in range(k):
            if W + 2 * p < k:
                continue
            x = torch.randn(2, C, 4, W).to(dtype).to(memory_format=torch.channels_last).requires_grad_()
            with fastops.use_backend("cpu"):
                y = fastops.depthwise_conv2d(x, w, b, s, (1, p))
            xr = x.detach().double().requires_grad_()
            ref = F.conv2d(xr, w.double(), b.double(), s, (1, p), groups=C)
            tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output's own rounding
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"W={W} p={p}: {m}")
            if dtype == torch.float32:
                # grad_input: at stride 1 the same tiles' convolution of grad_output with the flipped kernel, at
                # stride 2 two column phases of stride-1 tiles written to every other pixel
                ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
                with fastops.use_backend("cpu"):
                    y = fastops.depthwise_conv2d(x, ws, bs, s, (1, p))
                wr, br = w.double().requires_grad_(), b.double().requires_grad_()
                ref = F.conv2d(xr, wr, br, s, (1, p), groups=C)
                go = torch.randn_like(y)
                y.backward(go)
                ref.backward(go.double())
                for name, got, want in (("grad_input", x.grad, xr.grad), ("grad_weight", ws.grad, wr.grad),
                                        ("grad_bias", bs.grad, br.grad)):
                    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol,
                                               msg=lambda m: f"{name} W={W} p={p}: {m}")


@pytest.mark.parametrize("s", [1, 2, 3])
@pytest.mark.parametrize("k", [3, 7])
@pytest.mark.parametrize("C", [3, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_cpu_nchw_rows_of_every_width(s, k, C, dtype):
    """NCHW planes are copied into phase buffers by whole vectors at stride 1 and 2 (even / odd columns
    deinterleaved) and column by column past the last whole vector and at other strides; the register tiles
    cover 1 to 8 rows. With C a multiple of 16 (fp16 / fp32, kernel widths with row tiles, outputs up to 32
    wide) 16 planes at a time are transposed to pixels of 16 channels and back instead, 8 pixels at a time
    and the rest one by one, forward and (strides 1 and 2) backward. With AVX-512, fp32 3x3 outputs 9 to 32 wide at
    stride 1 are computed straight from the planes (masked row loads, tiles of 8 rows, the last one
    overlapping, or row by row below 8 rows). Every width from 1 to 40 with padding 0 to 2 and 1 to 13 output
    rows, each output element checked, and in fp32 at strides 1 and 2 each gradient element."""
    torch.manual_seed(0)
    w = torch.randn(C, 1, k, k).to(dtype)
    b = torch.randn(C).to(dtype)
    for W in range(1, 41):
        for p in range(3):
            H = 1 + (W % 9) * s
            if W + 2 * p < k or H + 2 * p < k:
                continue
            grads = dtype == torch.float32 and s <= 2
            x = torch.randn(2, C, H, W).to(dtype).requires_grad_(grads)
            ws, bs = w.clone().requires_grad_(grads), b.clone().requires_grad_(grads)
            with fastops.use_backend("cpu"):
                y = fastops.depthwise_conv2d(x, ws, bs, s, p)
            xr, wr, br = (t.detach().double().requires_grad_(grads) for t in (x, w, b))
            ref = F.conv2d(xr, wr, br, s, p, groups=C)
            tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.float64: 1e-12}[dtype]
            torch.testing.assert_close(y.double(), ref, rtol=tol, atol=tol, msg=lambda m: f"W={W} p={p}: {m}")
            if grads:
                go = torch.randn_like(y)
                y.backward(go)
                ref.backward(go.double())
                for name, got, want in (("grad_input", x.grad, xr.grad), ("grad_weight", ws.grad, wr.grad),
                                        ("grad_bias", bs.grad, br.grad)):
                    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4,
                                               msg=lambda m: f"{name} W={W} p={p}: {m}")


@settings(max_examples=40, deadline=None, derandomize=True)  # same examples every CI run
@given(n=st.integers(1, 3), c=st.integers(1, 40), h=st.integers(1, 24), w=st.integers(1, 24),
       kh=st.integers(1, 7), kw=st.integers(1, 7), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 3), pw=st.integers(0, 3), dh=st.integers(1, 3), dw=st.integers(1, 3),
       cl=st.booleans())
def test_cpu_random_geometries(n, c, h, w, kh, kw, sh, sw, ph, pw, dh, dw, cl):
    """Unseen shapes: any geometry F.conv2d accepts must match it, forward and backward."""
    if h + 2 * ph < dh * (kh - 1) + 1 or w + 2 * pw < dw * (kw - 1) + 1:
        return  # F.conv2d rejects it too; the error path has its own test
    geom = (n, c, h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
    _check_all("cpu", geom, torch.float32, "channels_last" if cl else "contiguous", "cpu")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("geom", [(2, 3, 7, 6, 3, 2, 1, 1), (1, 2, 6, 7, (2, 3), 1, "same", 2)])
def test_gradcheck_cpu_float64(layout, geom):
    x, w, b, s, p, d = _case(geom, torch.float64, layout)
    inputs = tuple(t.detach().requires_grad_() for t in (x, w, b))

    def f(x, w, b):
        with fastops.use_backend("cpu"):
            return fastops.depthwise_conv2d(x, w, b, s, p, d)

    assert torch.autograd.gradcheck(f, inputs)


def _opcheck_args(dtype=torch.float32, cl=False):
    x, w, b, s, p, d = _case((2, 5, 9, 8, 3, 2, 1, 1), dtype, "channels_last" if cl else "contiguous")
    pad = _padding4(p, 3, 3, (s, s), (d, d))
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [s, s], pad, [d, d]


@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "nhwc"])
def test_opcheck_cpp(cl):
    skip_unless_runnable(OP, "cpu", *_opcheck_args()[:3])
    args = _opcheck_args(cl=cl)
    torch.library.opcheck(torch.ops.fastops.depthwise_conv2d.default, args)
    x, w = args[0].detach(), args[1].detach()
    go = torch.randn(2, 5, 5, 4).contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
    torch.library.opcheck(torch.ops.fastops.depthwise_conv2d_backward.default, (go, x, w, *args[3:]))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_opcheck_triton():
    args = _opcheck_args()
    torch.library.opcheck(torch.ops.fastops.depthwise_conv2d_triton.default, args)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_torch_compile_fullgraph(backend):
    x, w, b, s, p, d = _case((2, 6, 11, 10, 3, 1, 1, 1), torch.float32, "channels_last")

    def f(x, w, b):
        return fastops.depthwise_conv2d(x, w, b, s, p, d).relu()

    def run(fn):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y = fn(xs, ws, bs)
        y.square().sum().backward()
        return y, xs.grad, ws.grad, bs.grad

    check_compile_fullgraph(backend, f, run, ("output", "grad_x", "grad_w", "grad_b"))


def test_grad_modes():
    """The op without autograd's layer (no grad needed) and with it: the same values, a graph only where one
    is wanted, and gradients through it."""
    torch.manual_seed(4)
    x = torch.randn(2, 6, 9, 8, requires_grad=True)
    w = torch.randn(6, 1, 3, 3, requires_grad=True)
    skip_unless_runnable(OP, "cpu", x, w)
    with fastops.use_backend("cpu"):
        y = fastops.depthwise_conv2d(x, w, padding=1)
        assert y.requires_grad and y.grad_fn is not None
        gx, gw = torch.autograd.grad(y.square().sum(), (x, w))
        ref = F.conv2d(x.double(), w.double(), padding=1, groups=6)
        rgx, rgw = torch.autograd.grad(ref.square().sum(), (x, w))
        assert_close(gx, rgx, torch.float32)
        assert_close(gw, rgw, torch.float32)
        for ctx in (torch.no_grad, torch.inference_mode):
            with ctx():
                y2 = fastops.depthwise_conv2d(x, w, padding=1)
            assert not y2.requires_grad and y2.grad_fn is None
            assert torch.equal(y2, y.detach())
        y3 = fastops.depthwise_conv2d(x.detach(), w.detach(), padding=1)
        assert not y3.requires_grad and torch.equal(y3, y.detach())


def test_autocast_cpu_bf16():
    x = torch.randn(2, 8, 10, 10)
    conv = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.depthwise_conv2d(x, conv.weight, conv.bias, padding=1)
        ref = conv(x)
    assert y.dtype == torch.bfloat16 == ref.dtype
    assert_close(y, ref.float(), torch.bfloat16)
    y.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.dtype == torch.float32


def test_autocast_leaves_float64_alone():
    """autocast never casts float64 (F.conv2d stays float64 inside it), so neither do fastops' ops."""
    x, w = torch.randn(2, 8, 6, 6, dtype=torch.float64), torch.randn(8, 1, 3, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.depthwise_conv2d(x, w, padding=1)
        ref = F.conv2d(x, w, None, 1, 1, 1, 8)
    assert y.dtype == torch.float64 == ref.dtype
    assert_close(y, ref, torch.float64)


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    return torch.randn(2, 4, 8, 8), torch.randn(4, 1, 3, 3), torch.randn(4)


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda x, w, b: (x.int(), w, b), TypeError, "x must have a floating dtype"),
    (lambda x, w, b: (x, w.int(), b), TypeError, "weight must have a floating dtype"),
    (lambda x, w, b: (x, w.double(), b), TypeError, "weight has dtype torch.float64 but x"),
    (lambda x, w, b: (x[0], w, b), ValueError, "x must be 4-D"),
    (lambda x, w, b: (x, torch.randn(4, 2, 3, 3), b), ValueError, r"weight must have shape \(C, 1, kh, kw\)"),
    (lambda x, w, b: (x, torch.randn(5, 1, 3, 3), b), ValueError, "weight must have shape"),
    (lambda x, w, b: (x, torch.randn(4, 3, 3), b), ValueError, "weight must be 4-D"),
    (lambda x, w, b: (x, torch.randn(4, 1, 32, 3), b), ValueError, "kernel size must be within 1..31"),
    (lambda x, w, b: (x, w, torch.randn(5)), ValueError, "bias must have shape"),
    (lambda x, w, b: (x, w.to("meta"), b), ValueError, "weight is on meta but x is on cpu"),
    (lambda x, w, b: (x, w, b.to("meta")), ValueError, "bias is on meta"),
    (lambda x, w, b: (x[:, :, :2, :2], w, b), ValueError, "larger than the padded input x"),
    (lambda x, w, b: ([[1.0]], w, b), TypeError, "x must be a torch.Tensor"),
    (lambda x, w, b: (x, torch.randn(4, 1, 0, 3), b), ValueError, "weight kernel size must be within 1..31, got 0x3"),
])
def test_bad_inputs(mutate, exc, match):
    x, w, b = mutate(*_good())
    with pytest.raises(exc, match=match):
        fastops.depthwise_conv2d(x, w, b)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(stride=0), ValueError, "stride must be >= 1"),
    (dict(stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
    (dict(dilation=0), ValueError, "dilation must be >= 1"),
    (dict(padding=-1), ValueError, "padding must be >= 0"),
    (dict(padding=2**61), ValueError, "padding must be <= 1048576"),
    (dict(stride=(1, 2**20 + 1)), ValueError, "stride must be <= 1048576"),
    (dict(dilation=2**40), ValueError, "dilation must be <= 1048576"),
    (dict(padding="full"), ValueError, "padding must be an int, a pair, 'same' or 'valid'"),
    (dict(padding="same", stride=2), ValueError, "padding='same' needs stride 1"),
])
def test_bad_options(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fastops.depthwise_conv2d(*_good(), **kwargs)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_zero_channels_refused_on_every_backend(backend):
    """C = 0 ran on the cpu kernel but not through F.conv2d (groups=0): refused up front, the same everywhere."""
    x, w, b = _good()
    with fastops.use_backend(backend), pytest.raises(ValueError, match="fastops.depthwise_conv2d: x must have C >= 1"):
        fastops.depthwise_conv2d(x[:, :0], w[:0], b[:0], padding=1)


def _double_backward(backend):
    torch.manual_seed(5)
    x = torch.randn(2, 4, 7, 7, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    with fastops.use_backend(backend):
        gx, gw = torch.autograd.grad(fastops.depthwise_conv2d(x, w, None, 1, 1).square().sum(), (x, w),
                                     create_graph=True)
    return x, w, gx, gw


def test_double_backward_raises_and_first_order_grads_are_unchanged():
    """Without an autograd kernel on the backward op, PyTorch only warned and the second-order gradients came
    back as zeros. They now raise (the reference backend stays twice differentiable); first-order gradients
    taken with create_graph=True are those of the reference."""
    x, w, gx, gw = _double_backward("cpu")
    rx, rw, rgx, rgw = _double_backward("reference")
    assert gx.requires_grad
    assert_close(gx, rgx, torch.float64, "grad_x")
    assert_close(gw, rgw, torch.float64, "grad_weight")
    with fastops.use_backend("cpu"):
        plain = torch.autograd.grad(fastops.depthwise_conv2d(x, w, None, 1, 1).square().sum(), (x, w))
    assert torch.equal(plain[0], gx.detach()) and torch.equal(plain[1], gw.detach())
    with pytest.raises(RuntimeError, match="fastops.depthwise_conv2d: gradients of gradients .*"
                                           "FASTOPS_BACKEND=reference"):
        torch.autograd.grad(gx.sum(), (x, w))
    ref = torch.autograd.grad(rgx.sum(), (rx, rw))
    assert ref[0].abs().sum() > 0 and ref[1].abs().sum() > 0


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_double_backward_raises_triton():
    xs = torch.randn(2, 4, 7, 7, requires_grad=True)
    ws = torch.randn(4, 1, 3, 3, requires_grad=True)
    with fastops.use_backend("triton"):
        (gx,) = torch.autograd.grad(fastops.depthwise_conv2d(xs, ws, None, 1, 1).square().sum(), xs,
                                    create_graph=True)
    with pytest.raises(RuntimeError, match="fastops.depthwise_conv2d: gradients of gradients"):
        torch.autograd.grad(gx.sum(), (xs, ws))


def test_forced_backend_that_cannot_run_says_why():
    with fastops.use_backend("cuda"):
        with pytest.raises(backends.BackendUnavailable, match="cuda.*cannot run.*needs CUDA tensors"):
            fastops.depthwise_conv2d(*_good())
    if INTERPRET:
        with fastops.use_backend("triton"), pytest.raises(backends.BackendUnavailable, match="float64"):
            fastops.depthwise_conv2d(*(t.double() for t in _good()))


def test_env_var_forces_backend(monkeypatch):
    monkeypatch.setenv("FASTOPS_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FASTOPS_BACKEND='nonsense' is not a backend"):
        fastops.depthwise_conv2d(*_good())
    monkeypatch.setenv("FASTOPS_BACKEND", "reference")
    assert backends.choose(OP, torch.device("cpu"), *_good()) == "reference"
    monkeypatch.delenv("FASTOPS_BACKEND")
    expected = "cpu" if backends.reasons(OP, *_good())["cpu"] is None else "reference"
    assert backends.choose(OP, torch.device("cpu"), *_good()) == expected


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.* called directly (no Python front) still refuses inconsistent inputs."""
    skip_unless_runnable(OP, "cpu", *_good())
    x, w, b = _good()
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.fastops.depthwise_conv2d(x, torch.randn(3, 1, 3, 3), b, [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        torch.ops.fastops.depthwise_conv2d(x, torch.randn(4, 1, 9, 9), b, [1, 1], [0, 0, 0, 0], [1, 1])
    with pytest.raises(RuntimeError, match="grad_output must have shape"):
        torch.ops.fastops.depthwise_conv2d_backward(torch.randn(2, 4, 5, 5), x, w, [1, 1], [0, 0, 0, 0], [1, 1])


# Modules and model conversion --------------------------------------------------------------------

def test_module_state_dict_compatible_with_conv2d():
    conv = nn.Conv2d(12, 12, 5, stride=2, padding=2, groups=12)
    mod = fastops.nn.DepthwiseConv2d(12, 5, stride=2, padding=2)
    assert set(mod.state_dict()) == set(conv.state_dict())
    mod.load_state_dict(conv.state_dict())
    x = torch.randn(2, 12, 17, 19)
    assert_close(mod(x), conv(x).double(), torch.float32)


def test_optimize_swaps_depthwise_convs_and_keeps_outputs():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    n_dw = sum(isinstance(m, nn.Conv2d) and m.groups > 1 for m in model.modules())
    fastops.optimize(model)
    # Each is followed by a BatchNorm2d and a ReLU6, so optimize fuses all three into one conv_bn_act call.
    swapped = [m for m in model.modules() if isinstance(m, (fastops.nn.DepthwiseConv2d, FusedConv2d)) and m.groups > 1]
    assert len(swapped) == n_dw == 17
    assert all(type(m) in (fastops.nn.DepthwiseConv2d, FusedConv2d) for m in model.modules()
               if isinstance(m, nn.Conv2d) and m.groups > 1)
    with torch.no_grad():
        out = model(x)
    assert_close(out, ref.double(), torch.float32, tol=1e-4)  # 50+ layers of fp32 rounding
    assert "features.1.conv.0.0.weight" in model.state_dict()


def test_optimize_timm_mobilenetv2():
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv2_100", pretrained=False, num_classes=10).eval()
    x = torch.randn(1, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        fastops.optimize(model)
        out = model(x)
    dw = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert dw and all(type(m) in (fastops.nn.DepthwiseConv2d, FusedConv2d) for m in dw)
    assert set(model.state_dict()) == keys
    assert_close(out, ref.double(), torch.float32, tol=1e-4)
