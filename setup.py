"""Build fastops and its compiled extension ``fastops._C``.

    pip install --no-build-isolation -e .

Environment knobs (printed at build time):
  FASTOPS_CUDA=auto|0|1   compile csrc/cuda/*.cu: auto = when nvcc and a CUDA build of torch exist
                          (a GPU is *not* needed: the CUDA code is compiled and linked without one)
  TORCH_CUDA_ARCH_LIST    e.g. "8.0;9.0"; default: the visible GPU's arch, else "8.0;9.0"
  FASTOPS_NATIVE=1|0      compile the CPU kernels for this machine's ISA (-march=native); default 1
  FASTOPS_DEBUG=1         -O0 -g
  MAX_JOBS                parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes that guess
    /usr/local, which has no CUDA headers. Prefer a real toolkit folder when the user named none."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.exists(os.path.join(cand, "bin", "nvcc")) and os.path.exists(
            os.path.join(cand, "include", "cuda_runtime.h")
        ):
            os.environ["CUDA_HOME"] = cand
            return


def _cuda_wanted(torch_mod):
    flag = os.environ.get("FASTOPS_CUDA", "auto").lower()
    if flag in ("0", "false", "no", "off"):
        return False, "disabled by FASTOPS_CUDA=0"
    from torch.utils.cpp_extension import CUDA_HOME

    have_nvcc = CUDA_HOME is not None and (
        os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")) or shutil.which("nvcc") is not None
    )
    have_cuda_torch = torch_mod.version.cuda is not None
    if have_nvcc and have_cuda_torch:
        return True, f"nvcc in {CUDA_HOME}, torch built with CUDA {torch_mod.version.cuda}"
    why = []
    if not have_nvcc:
        why.append("nvcc not found")
    if not have_cuda_torch:
        why.append("torch is a CPU-only build")
    if flag in ("1", "true", "yes", "on"):
        sys.exit("FASTOPS_CUDA=1 but CUDA cannot be built: " + ", ".join(why))
    return False, ", ".join(why)


def _arch_list(torch_mod):
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env, "TORCH_CUDA_ARCH_LIST"
    try:
        if torch_mod.cuda.is_available():
            caps = sorted({torch_mod.cuda.get_device_capability(i) for i in range(torch_mod.cuda.device_count())})
            return ";".join(f"{a}.{b}" for a, b in caps), "visible GPU"
    except Exception:  # no driver: fall through to the default
        pass
    return "8.0;9.0", "default (no GPU visible)"


def _pip_cuda_include():
    """torch's CUDA headers include cusparse.h & co., shipped in the pip `nvidia` packages."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        for sub in ("nvidia/cu13/include", "nvidia/cu12/include"):
            p = os.path.join(base, sub)
            if os.path.isdir(p):
                dirs.append(p)
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def _extensions():
    _locate_cuda_home()
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("FASTOPS_DEBUG", "0") == "1"
    native = os.environ.get("FASTOPS_NATIVE", "1") == "1"
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is OpenMP inside the headers, so without it the kernels run on one
    # thread. The extension then needs libgomp.so.1, which resolves to the copy torch already loaded.
    cxx += ["-fopenmp"]
    if native:
        cxx.append("-march=native")
    with_cuda, cuda_why = _cuda_wanted(torch)
    defines = []
    archs, archs_from = "", ""
    include_dirs = [os.path.join(ROOT, "csrc")]
    if with_cuda:
        archs, archs_from = _arch_list(torch)
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += _pip_cuda_include()
        defines.append(("FASTOPS_WITH_CUDA", "1"))
    defines.append(("FASTOPS_CUDA_ARCHS", '"' + archs.replace(";", " ") + '"'))
    print("fastops build configuration:")
    print(f"  torch {torch.__version__} (CUDA {torch.version.cuda}), python {sys.version.split()[0]}")
    print(f"  CPU sources: {len([s for s in sources if not s.endswith('.cu')])}, flags: {' '.join(cxx)}")
    print(f"  CUDA: {'yes' if with_cuda else 'no'} ({cuda_why})")
    if with_cuda:
        print(f"  CUDA archs: {archs} (from {archs_from}); extra includes: {include_dirs[1:]}")
    kw = dict(
        name="fastops._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=defines,
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        nvcc = (["-O0", "-g", "-G"] if debug else ["-O3"]) + ["--use_fast_math", "-lineinfo"]
        ext = CUDAExtension(extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kw)
    else:
        ext = CppExtension(extra_compile_args={"cxx": cxx}, **kw)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="fastops",
    version="0.1.0",
    description="Fused Triton / CUDA C++ / CPU C++ kernels for vision models, as torch custom ops",
    packages=find_packages(include=["fastops", "fastops.*"]) + ["fastops.models"],
    package_dir={"fastops.models": "models"},
    python_requires=">=3.9",
    install_requires=["torch>=2.6"],
    extras_require={"triton": ["triton>=3.2"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["fastops=fastops.__main__:main"]},
)
