"""Every Triton kernel, compiled ahead of time for sm_80 and sm_90 with the launchers' constexprs.

The interpreter forgives what the compiler does not (non-power-of-two blocks, tl.dot shapes, shared
memory overflow); compiling for real GPU targets here, without a GPU, catches those. The compiles run
in a subprocess without TRITON_INTERPRET (the interpreter patches the language the compiler needs).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastops.triton import aot  # noqa: E402

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
NAMES = [name for name, *_ in aot.specs()]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastops.triton.aot", "80", "90"], capture_output=True,
                         text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {(r["name"], r["cc"]): r for r in rows}


def test_there_are_kernels_to_compile():
    assert any("depthwise_conv2d" in n for n in NAMES)


@pytest.mark.parametrize("cc", [80, 90])
@pytest.mark.parametrize("name", NAMES)
def test_compiles_for_gpu(compiled, name, cc):
    r = compiled[(name, cc)]
    assert "error" not in r, r.get("error")
    assert r["cubin_bytes"] > 0 and r["target_ok"]
    assert r["shared"] <= SHARED_LIMIT[cc]
