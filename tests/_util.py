"""Helpers shared by the op tests: error metric, tolerances, layouts, backends."""
import contextlib
import os

import pytest
import torch

import fastops
from fastops import backends

# Relative error ||out - ref|| / ||ref|| allowed per dtype.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}

LAYOUTS = ("contiguous", "channels_last", "strided")
HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error; NaN/inf anywhere in `out` fails (returns inf)."""
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(out, ref, dtype, what="output", tol=None):
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e} ({dtype})"


def assert_close_reduced(out, ref, ref_same_dtype, dtype, what):
    """For a gradient that sums N*H*W terms into a handful of numbers (a BN or small conv weight's): such a
    sum may cancel, and then no implementation in `dtype` gets near `TOL` of the float64 result. The bound
    is the dtype tolerance or 8x the error of the reference computed in `dtype` (PyTorch's own kernels; on
    random cases the ratio of the two errors stays below ~5 either way),
    whichever is larger. Only for float32 / float64, where the kernels accumulate in the input's precision
    as PyTorch does; half / bf16 inputs accumulate in fp32 and must meet TOL as it is."""
    tol = TOL[dtype]
    if dtype in (torch.float32, torch.float64):
        tol = max(tol, 8 * rel_err(ref_same_dtype, ref))
    assert_close(out, ref, dtype, what, tol=tol)


def assert_close_vs_pytorch(out, ref, ref_same_dtype, dtype, what, factor=2.0):
    """For a result whose float64 reference no computation in `dtype` can reach within TOL, because an
    intermediate is rounded to `dtype` by design, as in PyTorch's own path (a half / bf16 conv output that a
    training-mode BN then normalises; activation masks that rounding flips near 0 in half / bf16 gradients):
    held to max(TOL, `factor` x the error of the same computation with PyTorch's ops in `dtype`)."""
    tol = max(TOL[dtype], factor * rel_err(ref_same_dtype, ref))
    assert_close(out, ref, dtype, what, tol=tol)


def check_compile_fullgraph(backend: str, f, run, names):
    """``run(fn)`` calls ``fn`` on fresh leaves and returns [output, grads...]: eager ``f`` and
    ``torch.compile(f, fullgraph=True)`` (called twice; the second call must not recompile) give the same
    values and gradients with ``backend`` forced. A None entry (an input without a gradient) is skipped."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    with fastops.use_backend(backend):
        eager = run(f)
        cnt = CompileCounterWithBackend("inductor")
        compiled = torch.compile(f, fullgraph=True, backend=cnt)
        first = run(compiled)
        second = run(compiled)
    assert cnt.frame_count == 1, f"compiled {cnt.frame_count} times"
    for got in (first, second):
        for g, e, what in zip(got, eager, names):
            if e is not None:
                assert_close(g, e, torch.float32, what)


@contextlib.contextmanager
def cpu_threads(n: int):
    """Runs the block with torch's intra-op thread count set to n (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def count_calls(monkeypatch, module, name: str) -> list:
    """Wraps ``module.name`` so that each call appends to the returned list (the call still happens)."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def forbid_calls(monkeypatch, module, name: str) -> None:
    """Makes any call of ``module.name`` fail the test."""
    def boom(*args, **kwargs):
        raise AssertionError(f"{module.__name__}.{name} was called")

    monkeypatch.setattr(module, name, boom)


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values in another memory layout: contiguous NCHW, channels_last, or a non-contiguous view."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # every other column of a wider tensor
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        big[..., 1::2] = float("nan")  # must never be read
        view = big[..., ::2]
        assert not view.is_contiguous()
        return view
    raise ValueError(layout)


def poison_allocator(numel: int, device="cpu"):
    """Fill and free memory the kernels' outputs are likely to reuse, so a missed write shows as NaN."""
    for dtype in (torch.float32, torch.float16):
        blocks = [torch.full((numel + 64,), float("nan"), dtype=dtype, device=device) for _ in range(4)]
        del blocks


def backend_params(op: str):
    """pytest params for every kernel backend; each is skipped, with the registry's reason, when it cannot
    run here (cpu/triton run on CPU tensors; cuda and triton-on-GPU run on CUDA tensors)."""
    params = [pytest.param(("cpu", "cpu"), id="cpu"),
              pytest.param(("triton", "cpu"), id="triton-interpret",
                           marks=pytest.mark.skipif(not INTERPRET, reason="interpreter off (GPU present)")),
              pytest.param(("cuda", "cuda"), id="cuda", marks=pytest.mark.gpu),
              pytest.param(("triton", "cuda"), id="triton-gpu", marks=[pytest.mark.gpu]),
              ]
    return params


def skip_unless_runnable(op: str, backend: str, *args):
    why = backends.reasons(op, *args)[backend]
    if why is not None:
        pytest.skip(f"{backend}: {why}")


__all__ = ["fastops", "TOL", "LAYOUTS", "rel_err", "assert_close", "assert_close_reduced", "assert_close_vs_pytorch", "make_layout", "poison_allocator",
           "backend_params", "skip_unless_runnable", "check_compile_fullgraph", "cpu_threads", "count_calls", "forbid_calls", "HAS_CUDA", "INTERPRET"]
