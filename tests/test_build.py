"""The build and the package: extension loaded, CUDA archs compiled in, info CLI, life without _C."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import fastops
from fastops import _ext


def test_extension_loaded():
    assert _ext.C_LOADED, f"fastops._C did not load: {_ext.C_ERROR}"


def _cuda_expected():
    from torch.utils.cpp_extension import CUDA_HOME

    return (os.environ.get("FASTOPS_CUDA", "auto") != "0" and torch.version.cuda is not None
            and CUDA_HOME is not None and shutil.which("nvcc") is not None)


@pytest.mark.skipif(not _cuda_expected(), reason="no nvcc or a CPU-only torch: CUDA sources are not built")
def test_cuda_objects_compiled_in():
    archs = _ext.cuda_archs()
    wanted = (["8.0", "9.0"] if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST")
              else [a for a in os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(" ", ";").split(";") if a])
    for a in wanted:
        assert a in archs, f"sm_{a.replace('.', '')} not compiled in (build says {archs})"
    # The shared object itself must hold the device code, not just the build's claim.
    cuobjdump = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    if not os.path.exists(cuobjdump):  # triton wheels ship one
        triton = pytest.importorskip("triton")
        cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(cuobjdump):
        pytest.skip("cuobjdump not found")
    so = fastops._C.__file__
    listing = subprocess.run([cuobjdump, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    for a in archs:
        assert f"sm_{a.replace('.', '')}" in listing, listing


def test_info_cli():
    out = subprocess.run([sys.executable, "-m", "fastops", "info"], capture_output=True, text=True, check=True).stdout
    assert "fastops._C: loaded" in out
    assert "depthwise_conv2d [cpu tensors]" in out
    assert "reference ok" in out.replace("  ", " ").replace("  ", " ")


_BLOCK_EXT = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "fastops._C":
            raise ImportError("simulated: no compiled extension")
sys.meta_path.insert(0, Block())
"""


def test_import_without_extension_falls_back_to_reference():
    code = _BLOCK_EXT + """
import torch, torch.nn.functional as F, fastops
from fastops.info import info_text
assert not fastops._ext.C_LOADED
x, w = torch.randn(1, 3, 8, 8), torch.randn(3, 1, 3, 3)
y = fastops.depthwise_conv2d(x, w, padding=1)
assert torch.allclose(y, F.conv2d(x, w, padding=1, groups=3))
try:
    with fastops.use_backend("cpu"):
        fastops.depthwise_conv2d(x, w)
    raise SystemExit("forced cpu backend should fail without _C")
except fastops.BackendUnavailable as e:
    assert "fastops._C is not loaded" in str(e), e
print(info_text())
"""
    env = dict(os.environ, FASTOPS_BACKEND="")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "fastops._C: NOT loaded (ImportError: simulated" in out.stdout
