"""Compile every fastops Triton kernel ahead of time for given GPU targets, without a GPU.

    python -m fastops.triton.aot 80 90      # prints one JSON line per (kernel variant, arch)

Compiles run in one worker process per core (``FASTOPS_AOT_JOBS=N`` sets the number; 1: in this process).

Each kernel module lists its launch variants in ``aot_specs(dtype)``. Must run with TRITON_INTERPRET
unset: the interpreter replaces the language functions the compiler needs.
"""
import concurrent.futures
import importlib
import json
import multiprocessing
import os
import pkgutil
import sys
import time


def specs():
    import fastops.triton as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"fastops.triton.{info.name}")
        if not hasattr(mod, "aot_specs"):
            continue
        # fp16 for every variant; bf16 and fp32 for the first two (the element type changes only loads/stores),
        # or the first AOT_VARIANTS_PER_DTYPE where a module's tiles or dot precision depend on the dtype
        per_dtype = getattr(mod, "AOT_VARIANTS_PER_DTYPE", 2)
        for dtype in ("fp16", "bf16", "fp32"):
            variants = mod.aot_specs(dtype)
            for i, (kernel, sig, constexprs) in enumerate(variants if dtype == "fp16" else variants[:per_dtype]):
                cid = "-".join(f"{k}{v}" for k, v in constexprs.items())
                yield f"{info.name}.{kernel.__name__}-{dtype}-{cid}-{i}", kernel, sig, constexprs


def compile_one(kernel, sig, constexprs, cc):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    t0 = time.time()
    k = triton.compile(ASTSource(kernel, sig, constexprs=constexprs), target=GPUTarget("cuda", cc, 32))
    ptx = k.asm["ptx"]
    return {"cubin_bytes": len(k.asm["cubin"]), "target_ok": f".target sm_{cc}" in ptx,
            "shared": k.metadata.shared, "num_warps": k.metadata.num_warps,
            "mma": "mma.sync" in ptx or "wgmma" in ptx, "seconds": round(time.time() - t0, 2)}


def _compile_job(job):
    """(variant index, cc) -> its JSON line; runs in a worker process (kernels are looked up again there,
    since jitted functions do not pickle)."""
    index, cc = job
    name, kernel, sig, constexprs = list(specs())[index]
    try:
        res = compile_one(kernel, sig, constexprs, cc)
    except Exception as e:  # reported per variant; the caller decides
        res = {"error": f"{type(e).__name__}: {e}"[:2000]}
    return json.dumps({"name": name, "cc": cc, **res})


def main(argv):
    archs = [int(a) for a in argv] or [80, 90]
    jobs = [(i, cc) for i in range(len(list(specs()))) for cc in archs]
    # Each compile is single-threaded; one worker per core (FASTOPS_AOT_JOBS overrides).
    workers = int(os.environ.get("FASTOPS_AOT_JOBS", "0")) or len(os.sched_getaffinity(0))
    if workers <= 1:
        for job in jobs:
            print(_compile_job(job), flush=True)
        return
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for line in pool.map(_compile_job, jobs, chunksize=4):
            print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
