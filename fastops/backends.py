"""Which backend runs an op: a registry of can-run predicates, and the choice rule.

Each op registers, per backend, a predicate ``can_run(*args) -> None | str`` returning ``None`` when the
backend can run those inputs, else the reason it cannot. ``choose`` then picks:

* ``FASTOPS_BACKEND=reference|cpu|cuda|triton`` (or :func:`use_backend`) forces one; a forced backend
  that cannot run the inputs raises :class:`BackendUnavailable` with the reason (never a silent fallback).
* otherwise, for CUDA tensors the op's preferred GPU order, for CPU tensors ``cpu``; the first backend
  that can run wins, ``reference`` last.
"""
import contextlib
import os
from typing import Callable, Dict, List, Optional

import torch

from . import _ext

BACKENDS = ("reference", "cpu", "cuda", "triton")

_registry: Dict[str, Dict[str, Callable[..., Optional[str]]]] = {}
_gpu_order: Dict[str, List[str]] = {}
_forced: List[str] = []


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run the given inputs."""


def register(op: str, backend: str, can_run: Callable[..., Optional[str]]) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    _registry.setdefault(op, {})[backend] = can_run


def set_gpu_order(op: str, order: List[str]) -> None:
    _gpu_order[op] = list(order)


def ops() -> List[str]:
    return sorted(_registry)


def reasons(op: str, *args) -> Dict[str, Optional[str]]:
    """For each backend: None if it can run these inputs, else why not."""
    table = _registry[op]
    return {b: (table[b](*args) if b in table else "not implemented for this op") for b in BACKENDS}


def forced_backend() -> Optional[str]:
    name = _forced[-1] if _forced else os.environ.get("FASTOPS_BACKEND", "")
    name = (name or "").strip().lower()
    if name in ("", "auto"):
        return None
    if name not in BACKENDS:
        raise ValueError(f"FASTOPS_BACKEND={name!r} is not a backend; expected auto or one of {BACKENDS}")
    return name


@contextlib.contextmanager
def use_backend(name: Optional[str]):
    """Force a backend for the ops called inside the block (``None`` or ``"auto"``: automatic choice)."""
    _forced.append(name or "auto")
    try:
        forced_backend()  # validate the name now
        yield
    finally:
        _forced.pop()


def choose(op: str, device: torch.device, *args) -> str:
    table = _registry[op]
    forced = forced_backend()
    if forced is not None:
        if forced not in table:
            raise BackendUnavailable(f"fastops.{op}: backend {forced!r} is not implemented for this op")
        why = table[forced](*args)
        if why is not None:
            raise BackendUnavailable(f"fastops.{op}: backend {forced!r} cannot run these inputs: {why}")
        return forced
    order = _gpu_order.get(op, ["cuda", "triton"]) if device.type == "cuda" else ["cpu"]
    for name in order + ["reference"]:
        if name in table and table[name](*args) is None:
            return name
    raise BackendUnavailable(f"fastops.{op}: no backend can run these inputs: {reasons(op, *args)}")


# Predicates shared by every op ------------------------------------------------------------------

def c_ext_reason(device: torch.device, backend: str) -> Optional[str]:
    """Why the C++ backend `backend` ('cpu' or 'cuda') cannot run on `device`, or None."""
    if not _ext.C_LOADED:
        return f"fastops._C is not loaded ({_ext.C_ERROR})"
    if backend == "cpu" and device.type != "cpu":
        return f"tensors are on {device}, the cpu backend needs CPU tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"tensors are on {device}, the cuda backend needs CUDA tensors"
        if _ext.BUILD_INFO.get("with_cuda") != "1":
            return "fastops._C was built without CUDA (FASTOPS_CUDA=0, or no nvcc at build time)"
    return None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_reason(device: torch.device) -> Optional[str]:
    from .triton import TRITON_ERROR

    if TRITON_ERROR is not None:
        return f"triton is unavailable ({TRITON_ERROR})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    if device.type == "cpu":
        return "triton runs CPU tensors only under its interpreter (TRITON_INTERPRET=1 before importing fastops)"
    return f"triton cannot run tensors on {device}"


def register_kernel_backends(op: str, limits: Optional[Dict[str, Callable[..., Optional[str]]]] = None) -> None:
    """The usual predicates of an op whose first argument is its main input ``x``: ``reference`` always;
    ``cpu`` / ``cuda`` when fastops._C is loaded (and built with CUDA) and x is on that device; ``triton``
    on CUDA tensors or under the interpreter. float64 runs on ``cpu`` and ``reference`` only.
    ``limits[backend](x, *rest)``, where given, adds that backend's own limits (sizes, dtypes) as a reason."""
    limits = limits or {}

    def can_cpp(backend):
        def can_run(x, *rest):
            why = c_ext_reason(x.device, backend)
            if why is None and backend == "cuda" and x.dtype == torch.float64:
                return "float64 is not supported on CUDA (use float32/float16/bfloat16)"
            if why is None and backend in limits:
                why = limits[backend](x, *rest)
            return why
        return can_run

    def can_triton(x, *rest):
        why = triton_reason(x.device)
        if why is None and x.dtype == torch.float64:
            return "float64 is not supported by the Triton kernels"
        if why is None and "triton" in limits:
            why = limits["triton"](x, *rest)
        return why

    register(op, "reference", lambda *args: None)
    register(op, "cpu", can_cpp("cpu"))
    register(op, "cuda", can_cpp("cuda"))
    register(op, "triton", can_triton)
    # No GPU timing has chosen between the two yet; the CUDA C++ kernels are tried first.
    set_gpu_order(op, ["cuda", "triton"])
