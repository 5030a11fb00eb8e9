"""Triton kernels. Importable without triton: TRITON_ERROR then says why they cannot run."""
TRITON_ERROR = None
try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401
except Exception as e:  # pragma: no cover - depends on the install
    TRITON_ERROR = f"{type(e).__name__}: {e}"
