"""window_attention: every backend vs the step-by-step timm path in float64, forward and every gradient;
that path itself vs timm's SwinTransformerBlock."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops import backends
from fastops.reference import window_attention as ref_window_attention

from ._util import (INTERPRET, TOL, assert_close, assert_close_reduced, check_compile_fullgraph, cpu_threads,
                    poison_allocator, skip_unless_runnable)

OP = "window_attention"

# (B, H, W, heads, head_dim, window, shift, bias, pad)
CASES = [
    (2, 14, 14, 3, 16, (7, 7), (3, 3), True, True),    # Swin SW-MSA, map a multiple of the window
    (1, 13, 17, 2, 8, (7, 7), (3, 3), True, True),     # odd H, W: padding and shift together
    (2, 8, 8, 2, 16, (8, 8), (0, 0), True, False),     # window 8, W-MSA
    (1, 9, 11, 1, 24, (4, 5), (2, 1), False, True),    # non-square window, shift in both dims
    (1, 10, 9, 2, 5, (3, 4), (1, 0), True, True),      # shift along H only, odd head_dim
    (3, 5, 6, 2, 16, (7, 7), (3, 3), True, True),      # window larger than the map
    (2, 2, 3, 2, 8, (7, 7), (3, 5), True, True),       # shift larger than the map (timm's always_partition)
    (1, 7, 7, 4, 32, (7, 9), (0, 4), True, False),     # 7x9 window, shift along W only
]
NAMES = ("output", "grad_qkv", "grad_rel_pos_bias", "grad_pad_qkv")


def _case_id(c):
    B, H, W, nh, hd, win, sh, bias, pad = c
    return (f"{B}x{H}x{W}-h{nh}d{hd}-w{win[0]}x{win[1]}-s{sh[0]}x{sh[1]}" + ("-bias" if bias else "")
            + ("-pad" if pad else ""))


def _case(case, dtype, device="cpu"):
    B, H, W, nh, hd, win, shift, bias, pad = case
    C = nh * hd
    n = win[0] * win[1]
    qkv = torch.randn(B, H, W, 3 * C, device=device).to(dtype)
    # Bias and pad are parameters: fp32 next to half / bf16 activations (as under AMP), fp64 for fp64.
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    b = torch.randn(nh, n, n, device=device, dtype=pdt) if bias else None
    p = torch.randn(3 * C, device=device, dtype=pdt) if pad else None
    return [qkv, b, p], dict(num_heads=nh, window_size=win, shift_size=shift)


def _run(backend, tensors, opts, go, cast=lambda t: t):
    leaves = [None if t is None else cast(t).detach().requires_grad_() for t in tensors]
    qkv, b, p = leaves
    with fastops.use_backend(backend):
        y = fastops.window_attention(qkv, rel_pos_bias=b, pad_qkv=p, **opts)
    y.backward(cast(go))
    return [y] + [None if t is None else t.grad for t in leaves]


def _check_all(backend, case, dtype, device, qkv_view=False):
    tensors, opts = _case(case, dtype, device)
    skip_unless_runnable(OP, backend, tensors[0], case[4], case[5][0] * case[5][1])
    B, H, W, nh, hd = case[:5]
    go = torch.randn(B, H, W, nh * hd, device=device).to(dtype)
    cpu = [None if t is None else t.cpu() for t in tensors]
    ref = _run("reference", cpu, opts, go.cpu(), lambda t: t.double())
    ref_same = _run("reference", cpu, opts, go.cpu()) if dtype in (torch.float32, torch.float64) else ref
    if qkv_view:  # the same values as a non-contiguous view
        big = torch.full((*tensors[0].shape[:-1], 2 * tensors[0].shape[-1]), float("nan"), dtype=dtype, device=device)
        big[..., ::2] = tensors[0]
        tensors[0] = big[..., ::2]
    poison_allocator(2 * tensors[0].numel(), device)
    got = _run(backend, tensors, opts, go)
    y = got[0]
    assert y.dtype == dtype and y.device == tensors[0].device and y.is_contiguous()
    for g, r, rs, what in zip(got, ref, ref_same, NAMES):
        if what == "grad_pad_qkv" and r is None and g is not None:  # no padding token: the reference never read it
            assert not g.any(), "grad_pad_qkv must be zero when the map needs no padding"
            continue
        assert (g is None) == (r is None), what
        if g is None:
            continue
        if what == "grad_qkv" or what == "output":
            assert g.dtype == dtype, what
            assert_close(g, r, dtype, what)
        else:  # sums over every window of the batch: see assert_close_reduced
            assert g.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
            assert_close_reduced(g, r, rs, dtype, what)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_backend(dtype, case):
    _check_all("cpu", case, dtype, "cpu")


def test_cpu_backend_non_contiguous_qkv():
    _check_all("cpu", CASES[1], torch.float32, "cpu", qkv_view=True)


@pytest.mark.parametrize("case", [(2, 14, 13, 2, 16, (7, 7), (3, 3), True, True),   # whole lines: streamed
                                  (1, 9, 11, 3, 8, (4, 5), (2, 1), True, False)],   # half lines: cached
                         ids=_case_id)
def test_cpu_streamed_output(case, monkeypatch):
    """FASTOPS_LLC_SHARE_BYTES=0 makes every output count as too large for the cache: the fp32 forward then
    writes each head's slice of a token row with streaming stores where the slices are whole 64-byte lines."""
    monkeypatch.setenv("FASTOPS_LLC_SHARE_BYTES", "0")
    _check_all("cpu", case, torch.float32, "cpu")


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
@pytest.mark.parametrize("case", CASES[1:7], ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(dtype, case):
    _check_all("triton", case, dtype, "cpu")


SWIN_T = [  # the Swin-T stages at batch 2, with and without shift (stage 4's 7x7 map runs unshifted in Swin-T)
    (2, 56, 56, 3, 32, (7, 7), (3, 3), True, False),
    (2, 28, 28, 6, 32, (7, 7), (0, 0), True, False),
    (2, 14, 14, 12, 32, (7, 7), (3, 3), True, False),
    (2, 7, 7, 24, 32, (7, 7), (0, 0), True, False),
    (2, 24, 24, 4, 32, (12, 12), (6, 6), True, True),  # Swin-B/384's window 12
    (1, 31, 29, 2, 64, (8, 8), (4, 4), True, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("case", CASES + SWIN_T, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_backends(backend, dtype, case):
    if backend == "triton" and dtype == torch.float32:
        pytest.skip("fp32 tl.dot may use tf32 on GPU: covered at 3e-4 by test_gpu_triton_fp32")
    _check_all(backend, case, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES[:3] + SWIN_T[:1], ids=_case_id)
def test_gpu_triton_fp32(case, monkeypatch):
    monkeypatch.setitem(TOL, torch.float32, 3e-4)
    _check_all("triton", case, torch.float32, "cuda")


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), h=st.integers(1, 15), w=st.integers(1, 15), nh=st.integers(1, 3), hd=st.integers(1, 20),
       wh=st.integers(1, 8), ww=st.integers(1, 8), data=st.data(), bias=st.booleans(), pad=st.booleans())
def test_cpu_random_shapes(b, h, w, nh, hd, wh, ww, data, bias, pad):
    sh = data.draw(st.integers(0, wh - 1))
    sw = data.draw(st.integers(0, ww - 1))
    _check_all("cpu", (b, h, w, nh, hd, (wh, ww), (sh, sw), bias, pad), torch.float32, "cpu")


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(threads):
    with cpu_threads(threads):
        _check_all("cpu", CASES[0], torch.float32, "cpu")
        _check_all("cpu", CASES[5], torch.float32, "cpu")


@pytest.mark.parametrize("case", [(2, 5, 6, 2, 3, (3, 4), (1, 2), True, True),
                                  (1, 4, 3, 1, 4, (5, 5), (0, 0), True, True)], ids=_case_id)
def test_gradcheck_cpu_float64(case):
    tensors, opts = _case(case, torch.float64)
    inputs = tuple(t.detach().requires_grad_() for t in tensors)

    def f(qkv, b, p):
        with fastops.use_backend("cpu"):
            return fastops.window_attention(qkv, rel_pos_bias=b, pad_qkv=p, **opts)

    assert torch.autograd.gradcheck(f, inputs)


def _op_args(case=CASES[1], dtype=torch.float32):
    (qkv, b, p), opts = _case(case, dtype)
    hd = case[4]
    return (qkv.requires_grad_(), opts["num_heads"], list(opts["window_size"]), list(opts["shift_size"]),
            b.requires_grad_(), hd ** -0.5, p.requires_grad_())


def test_opcheck_cpp():
    args = _op_args()
    skip_unless_runnable(OP, "cpu", args[0])
    torch.library.opcheck(torch.ops.fastops.window_attention.default, args)
    qkv, nh, ws, ss, b, scale, p = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = torch.ops.fastops.window_attention(qkv, nh, ws, ss, b, scale, p)
    torch.library.opcheck(torch.ops.fastops.window_attention_backward.default,
                          (torch.randn_like(out), qkv, out, lse, nh, ws, ss, b, scale, p, True, True))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_opcheck_triton():
    torch.library.opcheck(torch.ops.fastops.window_attention_triton.default, _op_args())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_torch_compile_fullgraph(backend):
    tensors, opts = _case(CASES[1], torch.float32)

    def f(qkv, b, p):
        return fastops.window_attention(qkv, rel_pos_bias=b, pad_qkv=p, **opts) * 2

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves]

    check_compile_fullgraph(backend, f, run, NAMES)


def test_autocast_cpu_bf16():
    """Under autocast the op runs in the autocast dtype (qkv comes from a Linear), bias and pad stay fp32."""
    (qkv, b, p), opts = _case(CASES[0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.window_attention(qkv, rel_pos_bias=b, pad_qkv=p, **opts)
    assert y.dtype == torch.bfloat16
    ref = ref_window_attention(qkv.double(), opts["num_heads"], opts["window_size"], opts["shift_size"], b.double(),
                               None, p.double())
    assert_close(y, ref, torch.bfloat16)


@pytest.mark.parametrize("H, W, window, shift, always", [
    (14, 14, 7, 3, False), (13, 17, 7, 3, True), (9, 11, (4, 5), (2, 1), True), (5, 6, 7, 3, True),
    (8, 8, 4, 0, True), (10, 9, (3, 4), (1, 0), True)])
def test_reference_is_timm_block_attn(H, W, window, shift, always):
    """The oracle itself: proj(reference(qkv(x))) equals timm's SwinTransformerBlock._attn(x) in float64."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    blk = timm_swin.SwinTransformerBlock(48, (H, W), num_heads=3, window_size=window, shift_size=shift,
                                         always_partition=always).double().eval()
    torch.nn.init.normal_(blk.attn.relative_position_bias_table)
    torch.nn.init.normal_(blk.attn.qkv.bias)
    x = torch.randn(2, H, W, 48, dtype=torch.double)
    a = blk.attn
    got = a.proj(ref_window_attention(a.qkv(x), 3, blk.window_size, blk.shift_size, a._get_rel_pos_bias()[0],
                                      a.scale, a.qkv.bias))
    assert_close(got, blk._attn(x), torch.float64)
    with fastops.use_backend("cpu"):
        fused = fastops.window_attention(a.qkv(x), 3, blk.window_size, blk.shift_size, a._get_rel_pos_bias()[0],
                                         None, a.qkv.bias)
    assert_close(a.proj(fused), blk._attn(x), torch.float64)


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    return [torch.randn(2, 7, 7, 3 * 8)], dict(num_heads=2, window_size=7, shift_size=3,
                                               rel_pos_bias=torch.randn(2, 49, 49), pad_qkv=torch.randn(24))


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ([torch.randn(2, 7, 7, 24).int()], {}, TypeError, "qkv must have a floating dtype"),
    ([torch.randn(7, 7, 24)], {}, ValueError, "qkv must be 4-D"),
    ([torch.randn(2, 7, 7, 20)], {}, ValueError, "qkv's last dim must be 3 \\* C with C a multiple of num_heads"),
    ([torch.randn(2, 7, 7, 25)], {}, ValueError, "qkv's last dim must be 3 \\* C"),
    ([torch.randn(2, 0, 7, 24)], {}, ValueError, "B, H, W >= 1"),
    (None, dict(num_heads=0), ValueError, "num_heads must be a positive int"),
    (None, dict(window_size=(7, 0)), ValueError, "window_size must be >= 1"),
    (None, dict(shift_size=7), ValueError, "shift_size must be smaller than window_size"),
    (None, dict(shift_size=(1, 8)), ValueError, "shift_size must be smaller than window_size"),
    (None, dict(shift_size=-1), ValueError, "shift_size must be >= 0"),
    (None, dict(window_size="7"), TypeError, "window_size must be an int or a pair"),
    (None, dict(rel_pos_bias=torch.randn(2, 49, 48)), ValueError, "rel_pos_bias must have shape"),
    (None, dict(rel_pos_bias=torch.randn(49, 49)), ValueError, "rel_pos_bias must be 3-D"),
    (None, dict(rel_pos_bias=torch.randn(2, 49, 49, device="meta")), ValueError, "rel_pos_bias is on meta"),
    (None, dict(pad_qkv=torch.randn(23)), ValueError, "pad_qkv must have shape \\(24,\\)"),
    (None, dict(pad_qkv=torch.randn(24, device="meta")), ValueError, "pad_qkv is on meta"),
    (None, dict(scale=float("nan")), ValueError, "scale must be a finite float"),
    ([torch.randn(2, 8, 8, 0)], dict(num_heads=2, window_size=4, shift_size=0, rel_pos_bias=None, pad_qkv=None),
     ValueError, "fastops.window_attention: qkv's last dim must be 3 \\* C .* and C >= 1, got 0"),
])
def test_bad_inputs(args, kwargs, exc, match):
    good_args, good_kwargs = _good()
    with pytest.raises(exc, match=match):
        fastops.window_attention(*(args or good_args), **{**good_kwargs, **kwargs})


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.window_attention called directly (no Python front) refuses inconsistent inputs."""
    qkv = torch.randn(1, 7, 7, 24)
    skip_unless_runnable(OP, "cpu", qkv)
    with pytest.raises(RuntimeError, match="rel_pos_bias"):
        torch.ops.fastops.window_attention(qkv, 2, [7, 7], [3, 3], torch.randn(2, 49, 48), 0.5, None)
    with pytest.raises(RuntimeError, match="pad_qkv"):
        torch.ops.fastops.window_attention(qkv, 2, [7, 7], [3, 3], None, 0.5, torch.randn(23))
    with pytest.raises(RuntimeError, match="shift"):
        torch.ops.fastops.window_attention(qkv, 2, [7, 7], [7, 0], None, 0.5, None)
    with pytest.raises(RuntimeError, match="num_heads"):
        torch.ops.fastops.window_attention(qkv, 5, [7, 7], [0, 0], None, 0.5, None)


def test_forced_backend_that_cannot_run_says_why():
    args, kwargs = _good()
    with fastops.use_backend("cuda"), pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        fastops.window_attention(*args, **kwargs)


@pytest.mark.parametrize("dtype, pdt", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                        (torch.float32, torch.float64), (torch.float64, torch.float32)])
def test_reference_backend_takes_parameters_of_another_dtype(dtype, pdt):
    """rel_pos_bias / pad_qkv in another floating dtype than qkv (an fp32 table with fp16 qkv): the reference
    backend (forced, or the fallback without fastops._C) accepts them too and agrees with cpu."""
    (qkv, b, p), opts = _case(CASES[1], torch.float32)
    qkv, b, p = qkv.to(dtype), b.to(pdt), p.to(pdt)
    skip_unless_runnable(OP, "cpu", qkv, CASES[1][4], 49)
    out = {}
    for backend in ("cpu", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (qkv, b, p)]
        with fastops.use_backend(backend):
            y = fastops.window_attention(leaves[0], rel_pos_bias=leaves[1], pad_qkv=leaves[2], **opts)
        y.float().square().sum().backward()
        out[backend] = [y] + [t.grad for t in leaves]
    for got, want, what in zip(out["cpu"], out["reference"], NAMES):
        assert got.dtype == want.dtype, what
        assert_close(got, want, dtype, what, tol=max(TOL[dtype], TOL[pdt]) * 2)


def test_double_backward_raises():
    """Second-order gradients through the kernels raise instead of coming back as zeros."""
    (qkv, b, p), opts = _case(CASES[1], torch.float64)
    skip_unless_runnable(OP, "cpu", qkv, CASES[1][4], 49)
    qkv.requires_grad_()
    with fastops.use_backend("cpu"):
        (g,) = torch.autograd.grad(fastops.window_attention(qkv, rel_pos_bias=b, pad_qkv=p, **opts).square().sum(),
                                   qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="fastops.window_attention: gradients of gradients"):
        torch.autograd.grad(g.sum(), qkv)


def test_backend_size_limits_are_reported():
    """What a GPU kernel cannot hold is a registry reason (so `auto` moves on), never a wrong result."""
    from fastops.ops.window_attention import _cuda_limits, _triton_limits

    qkv = torch.randn(1, 17, 17, 3 * 4)
    assert "at most 4096" in _cuda_limits(qkv, 4, 65 * 65)
    assert "head_dim 160" in _cuda_limits(qkv, 160, 49)
    assert _cuda_limits(qkv, 32, 144) is None
    if INTERPRET:
        assert "at most 256 tokens" in backends.reasons(OP, qkv, 4, 17 * 17)["triton"]
        assert "float32" in _triton_limits(qkv, 64, 49)            # fp32 keeps 3 tf32 parts on chip
        assert _triton_limits(qkv.half(), 64, 49) is None
        assert _triton_limits(qkv, 32, 49) is None                 # Swin-T's heads


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)"))])
def test_peaked_softmax_gradients_as_accurate_as_autograd(backend):
    """Large logits (|q.k| * scale ~ 100): the softmax rows are nearly one-hot and the true dS is tiny, so a
    backward whose recomputed P sums to 1 only within the logits' rounding loses the q / k gradients; the
    kernels must stay as close to the float64 truth as autograd through the fp32 reference does."""
    g = torch.Generator().manual_seed(0)
    qkv64 = torch.randn(2, 14, 14, 96, generator=g, dtype=torch.float64) * 20
    go64 = torch.randn(2, 14, 14, 32, generator=g, dtype=torch.float64)

    def grad(qkv, go, be):
        qkv = qkv.clone().requires_grad_()
        with fastops.use_backend(be):
            y = fastops.window_attention(qkv, 4, 7, 3)
        return torch.autograd.grad(y, qkv, go)[0].double()

    skip_unless_runnable(OP, backend, qkv64.float(), 8, 49)
    truth = grad(qkv64, go64, "reference")
    err = lambda gq: ((gq - truth).abs().max() / truth.abs().max()).item()  # noqa: E731
    ref_err = err(grad(qkv64.float(), go64.float(), "reference"))
    got = err(grad(qkv64.float(), go64.float(), backend))
    assert got <= 4 * ref_err + 1e-6, f"{backend}: {got:.2e} against autograd's {ref_err:.2e}"
