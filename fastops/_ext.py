"""Loads the compiled extension ``fastops._C`` if it can; fastops works without it (reference backend)."""
C_LOADED = False
C_ERROR = None
BUILD_INFO = {}

try:
    import torch  # noqa: F401  (the extension links against torch's libraries)

    from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)

    C_LOADED = True
    BUILD_INFO = dict(kv.split("=", 1) for kv in torch.ops.fastops._build_info().split(";") if "=" in kv)
except Exception as e:  # ImportError, undefined symbol, ABI mismatch ...
    C_ERROR = f"{type(e).__name__}: {e}"


def cuda_archs():
    """CUDA archs the extension was compiled for, e.g. ['8.0', '9.0']; [] if none."""
    archs = BUILD_INFO.get("cuda_archs", "")
    return [a for a in archs.replace(" ", ";").split(";") if a] if BUILD_INFO.get("with_cuda") == "1" else []
