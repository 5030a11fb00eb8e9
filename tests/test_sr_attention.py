"""sr_attention: every backend vs the timm-path reference in float64, forward and both gradients; the
reference itself (with spatial_reduction's) vs timm's pvt_v2.Attention."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fastops
from fastops import backends
from fastops.reference import sr_attention as ref_sr_attention
from fastops.reference import spatial_reduction as ref_spatial_reduction

from ._util import (INTERPRET, TOL, assert_close, check_compile_fullgraph, cpu_threads, poison_allocator,
                    skip_unless_runnable)

OP = "sr_attention"

# (B, N, Nr, heads, head_dim)
CASES = [
    (2, 64, 49, 1, 32),    # a PVTv2 stage-1 head over the 7x7 reduced map (fewer queries)
    (1, 37, 7, 2, 24),     # odd N, head_dim not a multiple of 8
    (3, 1, 1, 1, 8),       # one query, one key
    (1, 50, 300, 2, 8),    # keys longer than one block: online softmax across blocks
    (2, 49, 49, 4, 16),    # PVTv2 stage 4: no reduction, Nr = N
    (1, 23, 17, 5, 5),     # odd everything
]
NAMES = ("output", "grad_q", "grad_kv")


def _case_id(c):
    B, N, nr, nh, hd = c
    return f"{B}x{N}-kv{nr}-h{nh}d{hd}"


def _case(case, dtype, device="cpu"):
    B, N, nr, nh, hd = case
    C = nh * hd
    return [torch.randn(B, N, C, device=device).to(dtype), torch.randn(B, nr, 2 * C, device=device).to(dtype)], nh


def _run(backend, tensors, nh, go, cast=lambda t: t, scale=None):
    leaves = [cast(t).detach().requires_grad_() for t in tensors]
    with fastops.use_backend(backend):
        y = fastops.sr_attention(*leaves, nh, scale)
    y.backward(cast(go))
    return [y] + [t.grad for t in leaves]


def _check_all(backend, case, dtype, device, views=False, scale=None):
    tensors, nh = _case(case, dtype, device)
    skip_unless_runnable(OP, backend, tensors[0], case[4], case[2])
    B, N = case[:2]
    go = torch.randn(B, N, nh * case[4], device=device).to(dtype)
    ref = _run("reference", [t.cpu() for t in tensors], nh, go.cpu(), lambda t: t.double(), scale)
    if views:  # the same values as non-contiguous views (every other channel of a wider tensor)
        for i, t in enumerate(tensors):
            big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=dtype, device=device)
            big[..., ::2] = t
            tensors[i] = big[..., ::2]
    poison_allocator(4 * tensors[0].numel() + 4 * tensors[1].numel(), device)
    got = _run(backend, tensors, nh, go, scale=scale)
    assert got[0].dtype == dtype and got[0].is_contiguous() and got[0].shape == tensors[0].shape
    for g, r, what in zip(got, ref, NAMES):
        assert g.dtype == dtype, what
        assert_close(g, r, dtype, what)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_cpu_backend(dtype, case):
    _check_all("cpu", case, dtype, "cpu")


def test_cpu_backend_non_contiguous_inputs_and_scale():
    _check_all("cpu", CASES[1], torch.float32, "cpu", views=True, scale=0.37)


@pytest.mark.parametrize("case", [(1, 40, 4100, 1, 16), (2, 300, 1024, 2, 32)], ids=_case_id)
def test_cpu_long_kv(case):
    """Segmentation-sized key sets (a 512x512 input gives 256..4096 reduced tokens)."""
    _check_all("cpu", case, torch.float32, "cpu")


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter is off (a GPU is present: see the gpu tests)")
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton_interpreted(dtype, case):
    _check_all("triton", case, dtype, "cpu")


PVT_V2_B2 = [  # the PVTv2-b2 stages at batch 2 (N, Nr = 49, heads, head_dim 64), and a 512x512 stage 1
    (2, 3136, 49, 1, 64), (2, 784, 49, 2, 64), (2, 196, 49, 5, 64), (2, 49, 49, 8, 64), (1, 16384, 256, 1, 64),
    (1, 1000, 4100, 2, 32),
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
@pytest.mark.parametrize("case", CASES[:4] + PVT_V2_B2[:1], ids=_case_id)
def test_gpu_triton_fp32(case, monkeypatch):
    monkeypatch.setitem(TOL, torch.float32, 3e-4)
    _check_all("triton", case, torch.float32, "cuda")


@settings(max_examples=25, deadline=None, derandomize=True)
@given(b=st.integers(1, 2), n=st.integers(1, 70), nr=st.integers(1, 90), nh=st.integers(1, 3),
       hd=st.integers(1, 20))
def test_cpu_random_shapes(b, n, nr, nh, hd):
    _check_all("cpu", (b, n, nr, nh, hd), torch.float32, "cpu")


@pytest.mark.parametrize("threads", [1, 3])
def test_cpu_thread_counts(threads):
    with cpu_threads(threads):
        _check_all("cpu", CASES[0], torch.float32, "cpu")
        _check_all("cpu", CASES[3], torch.float32, "cpu")


@pytest.mark.parametrize("case", [(2, 5, 3, 2, 3), (1, 7, 9, 1, 4)], ids=_case_id)
def test_gradcheck_cpu_float64(case):
    tensors, nh = _case(case, torch.float64)
    inputs = tuple(t.detach().requires_grad_() for t in tensors)

    def f(q, kv):
        with fastops.use_backend("cpu"):
            return fastops.sr_attention(q, kv, nh)

    assert torch.autograd.gradcheck(f, inputs)


def _op_args(case=CASES[1], dtype=torch.float32):
    (q, kv), nh = _case(case, dtype)
    return (q.requires_grad_(), kv.requires_grad_(), nh, case[4] ** -0.5)


def test_opcheck_cpp():
    args = _op_args()
    skip_unless_runnable(OP, "cpu", args[0])
    torch.library.opcheck(torch.ops.fastops.sr_attention.default, args)
    q, kv, nh, scale = (a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    out, lse = torch.ops.fastops.sr_attention(q, kv, nh, scale)
    torch.library.opcheck(torch.ops.fastops.sr_attention_backward.default,
                          (torch.randn_like(out), q, kv, out, lse, nh, scale))


@pytest.mark.skipif(not INTERPRET, reason="interpreter off")
def test_opcheck_triton():
    torch.library.opcheck(torch.ops.fastops.sr_attention_triton.default, _op_args())


@pytest.mark.parametrize("backend", ["cpu", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRET, reason="interpreter off"))])
def test_torch_compile_fullgraph(backend):
    tensors, nh = _case(CASES[1], torch.float32)

    def f(q, kv):
        return fastops.sr_attention(q, kv, nh) * 2

    def run(fn):
        leaves = [t.detach().clone().requires_grad_() for t in tensors]
        y = fn(*leaves)
        y.square().sum().backward()
        return [y] + [t.grad for t in leaves]

    check_compile_fullgraph(backend, f, run, NAMES)


def test_autocast_cpu_bf16():
    (q, kv), nh = _case(CASES[0], torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fastops.sr_attention(q, kv, nh)
    assert y.dtype == torch.bfloat16
    assert_close(y, ref_sr_attention(q.double(), kv.double(), nh), torch.bfloat16)


@pytest.mark.parametrize("sr_ratio, linear, feat", [(8, False, (16, 24)), (4, False, (13, 11)), (2, False, (7, 9)),
                                                    (1, False, (5, 6)), (1, True, (13, 11)), (1, True, (5, 4))])
def test_references_are_timm_attention(sr_ratio, linear, feat):
    """The oracles themselves: proj(sr_attention(q(x), kv(spatial_reduction(x)))) equals timm's
    pvt_v2.Attention(x) in float64 (with the cpu kernels too)."""
    pvt = pytest.importorskip("timm.models.pvt_v2")
    a = pvt.Attention(48, num_heads=3, sr_ratio=sr_ratio, linear_attn=linear).double().eval()
    for m in a.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    x = torch.randn(2, feat[0] * feat[1], 48, dtype=torch.double)
    want = a(x, feat)
    reduce = linear or sr_ratio > 1

    def path(sra, sr):
        src = sr(x, feat, a.sr.weight, a.sr.bias, a.norm.weight, a.norm.bias, sr_ratio, linear, a.norm.eps) \
            if reduce else x
        return a.proj(sra(a.q(x), a.kv(src), 3, a.scale))

    assert_close(path(ref_sr_attention, ref_spatial_reduction), want, torch.float64)
    with fastops.use_backend("cpu"):
        assert_close(path(fastops.sr_attention, fastops.spatial_reduction), want, torch.float64)


# Bad inputs: each raises an error that names the argument. ------------------------------------------

def _good():
    return [torch.randn(2, 10, 16), torch.randn(2, 4, 32), 2], {}


@pytest.mark.parametrize("args, kwargs, exc, match", [
    ([torch.randn(2, 10, 16).int(), torch.randn(2, 4, 32), 2], {}, TypeError, "q must have a floating dtype"),
    ([torch.randn(10, 16), torch.randn(2, 4, 32), 2], {}, ValueError, "q must be 3-D"),
    ([torch.randn(2, 10, 16), torch.randn(4, 32), 2], {}, ValueError, "kv must be 3-D"),
    ([torch.randn(2, 10, 16), torch.randn(2, 4, 30), 2], {}, ValueError, "kv must have shape \\(B, Nr, 2\\*C\\)"),
    ([torch.randn(2, 10, 16), torch.randn(1, 4, 32), 2], {}, ValueError, "kv must have shape"),
    ([torch.randn(2, 10, 16), torch.randn(2, 0, 32), 2], {}, ValueError, "Nr >= 1"),
    ([torch.randn(2, 0, 16), torch.randn(2, 4, 32), 2], {}, ValueError, "B, N, C >= 1"),
    ([torch.randn(2, 10, 16), torch.randn(2, 4, 32), 3], {}, ValueError, "multiple of num_heads=3"),
    ([torch.randn(2, 10, 16), torch.randn(2, 4, 32), 0], {}, ValueError, "num_heads must be a positive int"),
    ([torch.randn(2, 10, 16), torch.randn(2, 4, 32).double(), 2], {}, TypeError, "kv has dtype torch.float64"),
    ([torch.randn(2, 10, 16), torch.randn(2, 4, 32, device="meta"), 2], {}, ValueError, "kv is on meta"),
    (None, dict(scale=float("inf")), ValueError, "scale must be a finite float"),
])
def test_bad_inputs(args, kwargs, exc, match):
    good_args, good_kwargs = _good()
    with pytest.raises(exc, match=match):
        fastops.sr_attention(*(args or good_args), **{**good_kwargs, **kwargs})


def test_direct_op_call_checks_shapes():
    """torch.ops.fastops.sr_attention called directly (no Python front) refuses inconsistent inputs."""
    q = torch.randn(2, 10, 16)
    skip_unless_runnable(OP, "cpu", q)
    with pytest.raises(RuntimeError, match="kv"):
        torch.ops.fastops.sr_attention(q, torch.randn(2, 4, 30), 2, 0.5)
    with pytest.raises(RuntimeError, match="num_heads"):
        torch.ops.fastops.sr_attention(q, torch.randn(2, 4, 32), 3, 0.5)
    out, lse = torch.ops.fastops.sr_attention(q, torch.randn(2, 4, 32), 2, 0.5)
    with pytest.raises(RuntimeError, match="lse"):
        torch.ops.fastops.sr_attention_backward(out, q, torch.randn(2, 4, 32), out, lse[:, :1], 2, 0.5)


def test_forced_backend_that_cannot_run_says_why():
    args, kwargs = _good()
    with fastops.use_backend("cuda"), pytest.raises(backends.BackendUnavailable, match="needs CUDA tensors"):
        fastops.sr_attention(*args, **kwargs)


def test_backend_size_limits_are_reported():
    """What a GPU kernel cannot hold is a registry reason (so `auto` moves on), never a wrong result."""
    from fastops.ops.sr_attention import _cuda_limits, _triton_limits

    q = torch.randn(1, 4, 8 * 160)
    assert "head_dim 160" in _cuda_limits(q, 160, 49)
    assert _cuda_limits(q, 128, 4100) is None
    assert "at most 65535" in _cuda_limits(torch.randn(1, 1, 70000), 1, 49)
    if INTERPRET:
        assert _triton_limits(q.half(), 64, 49) is None
        assert "float64" in _triton_limits(q.double(), 64, 49)
