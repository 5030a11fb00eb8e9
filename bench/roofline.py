"""Roofline benchmark harness shared by every op's ``bench/test_<op>.py``.

A bench file lists :class:`Case` objects (where the shape comes from, its FLOPs, the fewest bytes it
must move, how to make its inputs, and its providers from :func:`op_providers`) and one test::

    CASES = [Case(op="foo", name="swin_t.s0-...", layout="nchw", mode="fwd", flops=..., bytes=...,
                  make_inputs=..., providers=op_providers("foo", reference_fn, fastops_fn, probe))]

    @parametrize(CASES)
    def test_foo(time_case, case, provider):
        time_case(case, provider)

``bench/conftest.py`` owns the session: it measures the machine's ceilings once (at the first timed
case), times each (case, provider) through pytest-benchmark, and at the end prints one table plus the
summaries that bench files registered with :func:`add_summary`, and writes ``bench/results/latest.json``
and ``bench/results/roofline.png``.

Set ``FASTOPS_BENCH_DEVICE=cpu`` to time CPU tensors on a CUDA machine.
"""
import contextlib
import ctypes
import ctypes.util
import dataclasses
import itertools
import json
import math
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

import fastops
from fastops import _ext, backends

MODES = ("fwd", "fwd+bwd")
NOISY = 1.5  # median / fastest round above which the table flags a timing
CONTENDED = 0.25  # cores of other work during a timing above which the table flags it
FUSED_BACKENDS = ("cpu", "cuda", "triton")


def bench_device() -> torch.device:
    name = os.environ.get("FASTOPS_BENCH_DEVICE", "").strip().lower()
    if not name:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


# Providers ---------------------------------------------------------------------------------------

class Provider:
    """One way of running a case: ``fn(*inputs) -> Tensor``."""

    def __init__(self, fn: Callable):
        self.fn = fn

    def why_not(self, device: torch.device, inputs: Optional[Sequence] = None) -> Optional[str]:
        return None

    def context(self):
        return contextlib.nullcontext()

    def build(self) -> Callable:
        return self.fn


class Compiled(Provider):
    """torch.compile of the reference, compiled once per case (the first call, outside the timing)."""

    def build(self) -> Callable:
        # Dynamo caches graphs per code object, and every case's function shares one: without the
        # reset, a handful of shapes reach the recompile limit and later cases silently run eager.
        torch._dynamo.reset()
        return torch.compile(self.fn, dynamic=False)


class Backend(Provider):
    """A fastops backend forced through ``fastops.use_backend``; the registry says whether it can run."""

    def __init__(self, op: str, backend: str, fn: Callable, probe: Callable[[torch.device], Sequence],
                 reason_args: Optional[Callable[[Sequence], Sequence]] = None):
        super().__init__(fn)
        self.op, self.backend, self.probe, self.reason_args = op, backend, probe, reason_args

    def why_not(self, device, inputs=None):
        if self.backend == "triton":
            if backends.triton_interpreting():
                return "TRITON_INTERPRET=1: the Triton interpreter is not a speed"
            if device.type != "cuda":
                return "triton is timed on CUDA tensors only (never its interpreter)"
        args = self.probe(device) if inputs is None else inputs
        if self.reason_args is not None:
            args = self.reason_args(args)
        return backends.reasons(self.op, *args)[self.backend]

    def context(self):
        # Forced once around the whole measurement, so no per-call cost lands in the timing.
        return fastops.use_backend(self.backend)


def op_providers(op: str, reference: Callable, fused: Callable, probe: Callable[[torch.device], Sequence],
                 reason_args: Optional[Callable[[Sequence], Sequence]] = None) -> Dict[str, Provider]:
    """eager (the reference), compile (torch.compile of it) and every fastops backend but `reference`.

    `probe(device)` gives small inputs for asking the registry at collection time which backends can run
    on the device at hand; the real inputs are asked again before timing (a skip says why not).
    """
    provs: Dict[str, Provider] = {"eager": Provider(reference), "compile": Compiled(reference)}
    for b in FUSED_BACKENDS:
        provs[b] = Backend(op, b, fused, probe, reason_args)
    return provs


# Cases -------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Case:
    """One timed shape. `bytes` is the fewest bytes the op must move (every input read once, every output
    written once); `make_inputs(device)` returns fresh tensors, the positional arguments of every provider
    (`None` allowed). In ``fwd+bwd`` the op's output is back-propagated into the inputs at `grad_inputs`, and
    with `grad_params` also into the trainable parameters of the provider's callable (an ``nn.Module``, or
    torch.compile of one): a model's training step, whose inputs need no gradient. `min_rounds` raises the
    number of timed rounds for slow calls, which the time budget alone would time once."""

    op: str
    name: str
    layout: str
    mode: str
    flops: float
    bytes: float
    make_inputs: Callable[[torch.device], Sequence[Optional[torch.Tensor]]]
    providers: Mapping[str, Provider]
    grad_inputs: Sequence[int] = ()
    grad_params: bool = False
    min_rounds: int = 1
    marks: Sequence[Any] = ()
    meta: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def id(self) -> str:
        return f"{self.name}-{self.layout}-{self.mode}"

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes


def parametrize(cases: Sequence[Case]):
    """``pytest.mark.parametrize("case, provider", ...)`` over every provider that can run on the device
    at hand; ids read ``<case>-<layout>-<mode>-<provider>`` so ``-k`` selects by any of them."""
    dev = bench_device()
    params = []
    for case in cases:
        for pname, prov in case.providers.items():
            if prov.why_not(dev) is None:
                params.append(pytest.param(case, pname, id=f"{case.id}-{pname}", marks=list(case.marks)))
    return pytest.mark.parametrize("case, provider", params)


# The machine's ceilings --------------------------------------------------------------------------

@dataclass
class Machine:
    device: str
    name: str
    threads: int
    copy_bytes_per_s: float
    matmul_flops_per_s: float
    l2_bytes: int
    details: Dict[str, Any]

    @property
    def ridge(self) -> float:
        """FLOP per byte where the compute ceiling meets the bandwidth ceiling."""
        return self.matmul_flops_per_s / self.copy_bytes_per_s


def _best_seconds(fn, reps: int, device: torch.device) -> float:
    fn()  # first call pays allocation, page faults, library warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return min(times)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    # Ceilings take the best rep: anything sharing the machine can only make a rep slower.
    return min(times)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_caches() -> Dict[str, int]:
    out = {}
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in sorted(os.listdir(base)):
            d = os.path.join(base, idx)
            with open(os.path.join(d, "level")) as f:
                level = f.read().strip()
            with open(os.path.join(d, "type")) as f:
                kind = f.read().strip()
            with open(os.path.join(d, "size")) as f:
                size = f.read().strip()
            mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
            out[f"L{level}{'' if kind == 'Unified' else kind[0].lower()}"] = int(size.rstrip("KMG")) * mult
    except (OSError, ValueError):
        pass
    return out


def keep_freed_memory() -> Optional[str]:
    """Make glibc malloc keep freed memory instead of handing it back to the OS; returns what was set, or
    None where it could not.

    PyTorch's CPU tensors come straight from malloc. By default each large block a call allocates (its
    output, any scratch copy inside the library) can be fresh mmap'd memory that faults in page by page on
    every call, and glibc's adaptive threshold flips between that and reuse depending on what ran before.
    On a VM a fault costs microseconds: eager NCHW depthwise (b=8, 32ch@112) faulted ~9k pages a call and
    read 20-30 ms instead of 5 ms, depending on the tests before it. Keeping memory makes every provider's
    timing its kernel's, as jemalloc/tcmalloc or the CUDA caching allocator would.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_trim_threshold, 2**31 - 1) == 1 and libc.mallopt(m_mmap_max, 0) == 1
    except (OSError, AttributeError):
        return None
    return "glibc mallopt M_MMAP_MAX=0 M_TRIM_THRESHOLD=2^31-1 (freed memory is reused)" if ok else None


def _busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        # user nice system idle iowait irq softirq steal (guest time is already inside user/nice); steal
        # counts as busy: the hypervisor gave those cycles to someone else.
        v = [int(t) for t in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


class OtherLoad:
    """``with OtherLoad() as load: ...`` then ``load.cores``: how many cores something other than this
    process kept busy meanwhile (None where /proc/stat is missing). Timings taken while other work ran
    are not speeds of the code; the table flags them."""

    cores: Optional[float] = None

    def __enter__(self):
        try:
            self._busy0 = _busy_seconds()
        except (OSError, ValueError, IndexError):
            self._busy0 = None
        self._own0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc):
        wall = time.perf_counter() - self._wall0
        # /proc/stat counts 10 ms ticks per CPU: shorter windows would read noise.
        if self._busy0 is not None and wall >= 0.1:
            other = _busy_seconds() - self._busy0 - (time.process_time() - self._own0)
            self.cores = max(0.0, other / wall)
        return False


def cpu_busy(interval: float = 0.5) -> Optional[float]:
    """Cores busy with other work over `interval` seconds while this process sleeps."""
    with OtherLoad() as load:
        time.sleep(interval)
    return load.cores


def measure_machine(device: torch.device) -> Machine:
    """Bandwidth from a copy far larger than the last-level cache (bytes read + written), FLOP/s from a
    large fp32 matmul (TF32 off: the kernels timed here do plain fp32 FMAs) or, on a CPU, a 3x3 oneDNN
    convolution where that is faster."""
    threads = torch.get_num_threads()
    details: Dict[str, Any] = {
        "python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
        "fastops": fastops.__version__, "fastops_C_loaded": _ext.C_LOADED, "fastops_C_error": _ext.C_ERROR,
        "fastops_build": dict(_ext.BUILD_INFO), "cpu": _cpu_model(), "logical_cpus": os.cpu_count(),
        "torch_threads": threads, "cpu_caches": _cpu_caches(),
    }
    from fastops.triton import TRITON_ERROR

    if TRITON_ERROR is None:
        import triton

        details["triton"] = triton.__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        details.update(gpu=props.name, sm_count=props.multi_processor_count,
                       capability=f"{props.major}.{props.minor}", gpu_memory=props.total_memory, l2_bytes=l2,
                       cudnn=torch.backends.cudnn.version())
        n_copy, n_mm, reps = 2**28, 8192, 10  # 1 GiB copy
    else:
        name = details["cpu"]
        l2 = details["cpu_caches"].get("L2", 0)
        n_copy, n_mm, reps = 2**26, 2048, 5  # 256 MiB copy, beyond any L3 we meet
    src = torch.ones(n_copy, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() * src.element_size() / _best_seconds(lambda: dst.copy_(src), reps, device)
    del src, dst
    a = torch.randn(n_mm, n_mm, device=device)
    b = torch.randn(n_mm, n_mm, device=device)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        flops = 2 * n_mm**3 / _best_seconds(lambda: torch.mm(a, b), max(3, reps // 2), device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    del a, b
    how_flops = f"fp32 matmul {n_mm}^3"
    if device.type == "cpu":
        # torch.mm's BLAS can run narrower vectors than the CPU has: on a 2-core AVX-512 EPYC it reached 160
        # GFLOP/s and oneDNN's 3x3 convolution 395, which put kernels here at up to 2x "the ceiling". oneDNN picks
        # its kernels for the CPU it finds: the FLOP/s ceiling is the faster of the two.
        x = torch.randn(8, 256, 28, 28).contiguous(memory_format=torch.channels_last)
        w = torch.randn(256, 256, 3, 3)
        with torch.no_grad():
            conv = 2 * (x.numel() // x.shape[1]) * w.numel() / _best_seconds(lambda: F.conv2d(x, w, padding=1), reps, device)
        how_flops += f" ({flops / 1e9:.0f} GFLOP/s) or 3x3 conv 8x256x28x28 ({conv / 1e9:.0f} GFLOP/s), the faster"
        flops = max(flops, conv)
        del x, w
    if device.type == "cuda":
        torch.cuda.empty_cache()
    details["ceilings_how"] = (f"copy of {n_copy * 4 / 2**20:.0f} MiB fp32 (read+write bytes), "
                               f"{how_flops}, best of {reps}")
    return Machine(device.type, name, threads, bw, flops, l2, details)


# Timing ------------------------------------------------------------------------------------------

@dataclass
class Result:
    op: str
    case: str
    layout: str
    mode: str
    provider: str
    time_s: float
    min_s: float
    rounds: int
    calls_per_round: int
    input_sets: int
    flops: float
    bytes: float
    intensity: float
    gbps: float
    gflops: float
    bound: str
    pct_ceiling: float
    pct_copy_bw: float
    other_load_cores: Optional[float] = None
    page_faults_per_call: Optional[float] = None
    x_eager: Optional[float] = None
    x_compile: Optional[float] = None
    meta: Dict[str, Any] = field(default_factory=dict)


def _input_sets(case: Case, machine: Machine) -> int:
    """How many input copies to cycle through so that each call reads from memory, not L2 (GPU only:
    on the CPU, layers of a real network also hand each other cache-warm tensors)."""
    if machine.device != "cuda":
        return 1
    n = math.ceil(2 * machine.l2_bytes / case.bytes) + 1
    return max(2, min(n, int(2 * 2**30 // case.bytes), 256))


def _requires_grad(args, idx):
    out = list(args)
    for i in idx:
        if out[i] is not None:
            out[i] = out[i].detach().requires_grad_(True)
    return out


def _seconds(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


class Session:
    """Everything one pytest run measured; conftest owns one."""

    def __init__(self, device: torch.device, budget_s: float, malloc: Optional[str] = None):
        self.device = device
        self.budget_s = budget_s
        self.malloc = malloc or "system default"
        self.results: List[Result] = []
        self._machine: Optional[Machine] = None
        # Other work on the machine, read before the first timing and after the last.
        self.busy_before: Optional[float] = None
        self.busy_after: Optional[float] = None

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            self.busy_before = cpu_busy()
            self._machine = measure_machine(self.device)
        return self._machine

    def run(self, benchmark, case: Case, provider: str) -> Result:
        dev, machine = self.device, self.machine
        prov = case.providers[provider]
        torch.manual_seed(0)
        first = case.make_inputs(dev)
        why = prov.why_not(dev, first)
        if why is not None:
            pytest.skip(f"{provider}: {why}")
        sets = [first] + [case.make_inputs(dev) for _ in range(_input_sets(case, machine) - 1)]
        grad_ctx = torch.enable_grad() if case.mode == "fwd+bwd" else torch.no_grad()
        with prov.context(), grad_ctx:
            fn = prov.build()
            step = self._steps(fn, case, sets)  # its first calls compile / warm up, untimed
            result = self._time(benchmark, step, len(sets), case, provider, machine)
        self.results.append(result)
        return result

    @staticmethod
    def _steps(fn, case, sets):
        if case.mode == "fwd":
            for args in sets:
                fn(*args)
            return lambda i: fn(*sets[i])
        # autograd.grad computes the parameters' gradients as backward() would, without accumulating them
        # into .grad across calls (a training step starts from zeroed or None grads).
        params = [p for p in fn.parameters() if p.requires_grad] if case.grad_params else []
        prepared = []
        for args in sets:
            args = _requires_grad(args, case.grad_inputs)
            leaves = [args[i] for i in case.grad_inputs if args[i] is not None] + params
            y = fn(*args)
            gy = torch.randn_like(y)
            torch.autograd.grad(y, leaves, gy)
            prepared.append((args, leaves, gy))

        def step(i):
            args, leaves, gy = prepared[i]
            torch.autograd.grad(fn(*args), leaves, gy)

        return step

    def _time(self, benchmark, step, n_sets, case, provider, machine) -> Result:
        cuda = machine.device == "cuda"
        if cuda:
            counter = itertools.count()
            calls = 1

            # Synchronizing inside the timed call makes the host clock see the GPU's work; `calls` launches
            # per round keep the one synchronization small next to the kernels.
            def block():
                for _ in range(calls):
                    step(next(counter) % n_sets)
                torch.cuda.synchronize()

            torch.cuda.synchronize()
            t_block = min(_seconds(block) for _ in range(3))
            # Twice: the first reading is mostly launch and synchronization latency for small kernels.
            for _ in range(2):
                if t_block < 1e-3:
                    calls = max(1, min(2000, math.ceil(calls * 1.5e-3 / t_block)))
                    t_block = _seconds(block)
            min_rounds, max_rounds = 10, 200
        else:
            calls = 1

            def block():
                step(0)

            t_block = _seconds(block)
            min_rounds, max_rounds = 3, 2000
        budget = self.budget_s
        # A call slower than the whole budget is timed once more: the median of a few would cost minutes.
        rounds = 1 if t_block > budget else max(min_rounds, min(max_rounds, math.ceil(budget / t_block)))
        rounds = max(rounds, case.min_rounds)
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        with OtherLoad() as load:
            benchmark.pedantic(block, rounds=rounds, warmup_rounds=0, iterations=1)
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / (rounds * calls)
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is None:  # --benchmark-disable: keep the calibration reading
            med = mn = t_block
            rounds = 1
        else:
            med, mn = stats.median, stats.min
        t = med / calls
        gbps, gflops = case.bytes / t / 1e9, case.flops / t / 1e9
        memory = case.intensity < machine.ridge
        if memory:
            pct = 100 * case.bytes / t / machine.copy_bytes_per_s
        else:
            pct = 100 * case.flops / t / machine.matmul_flops_per_s
        res = Result(op=case.op, case=case.name, layout=case.layout, mode=case.mode, provider=provider,
                     time_s=t, min_s=mn / calls, rounds=rounds, calls_per_round=calls, input_sets=n_sets,
                     flops=case.flops, bytes=case.bytes, intensity=case.intensity, gbps=gbps, gflops=gflops,
                     bound="memory" if memory else "compute", pct_ceiling=pct,
                     pct_copy_bw=100 * case.bytes / t / machine.copy_bytes_per_s, other_load_cores=load.cores,
                     page_faults_per_call=faults, meta=dict(case.meta))
        try:
            benchmark.extra_info.update({k: v for k, v in dataclasses.asdict(res).items() if k != "meta"})
        except AttributeError:
            pass
        return res

    # Report --------------------------------------------------------------------------------------

    def finalize(self) -> None:
        """Speedups over eager and compile of the same (case, layout, mode), measured in this run."""
        by_key = {(r.op, r.case, r.layout, r.mode, r.provider): r for r in self.results}
        for r in self.results:
            for base, attr in (("eager", "x_eager"), ("compile", "x_compile")):
                b = by_key.get((r.op, r.case, r.layout, r.mode, base))
                setattr(r, attr, b.time_s / r.time_s if b is not None else None)

    def header(self) -> List[str]:
        m = self._machine
        if m is None:
            return ["roofline: nothing was timed"]
        d = m.details
        extra = f", {d['gpu']} sm_{d['capability'].replace('.', '')}" if m.device == "cuda" else ""
        lines = [f"roofline: device {m.device} ({m.name}{extra}); torch {d['torch']}, {m.threads} torch threads; "
                 f"fastops._C {'loaded' if d['fastops_C_loaded'] else 'MISSING'}; malloc: {self.malloc}",
                 f"ceilings (measured this run): copy {m.copy_bytes_per_s / 1e9:.1f} GB/s, fp32 matmul "
                 f"{m.matmul_flops_per_s / 1e9:.1f} GFLOP/s, ridge {m.ridge:.2f} FLOP/B  [{d['ceilings_how']}]"]
        busy = [b for b in (self.busy_before, self.busy_after) if b is not None]
        during = [r.other_load_cores for r in self.results if r.other_load_cores is not None]
        if busy or during:
            line = (f"other work on the CPUs (of {os.cpu_count()}): {self.busy_before or 0:.2f} cores before the "
                    f"run, {self.busy_after or 0:.2f} after")
            if during:
                flagged = sum(c > CONTENDED for c in during)
                line += (f", during the timings mean {sum(during) / len(during):.2f} max {max(during):.2f} "
                         f"({flagged} of {len(during)} timings over {CONTENDED})")
            lines.append(line)
            if max(busy + during) > CONTENDED:
                lines.append("WARNING: other work competed for the CPUs; flagged timings (and GPU launch "
                             "overheads) are not reliable: rerun those on a quiet machine")
        return lines

    def table(self) -> str:
        cols = ["case", "layout", "mode", "provider", "time", "GB/s", "GFLOP/s", "bound", "%ceil", "×eager",
                "×compile"]
        rows = []
        prev = None
        for r in self.results:
            key = (r.op, r.case, r.layout, r.mode)
            if prev is not None and key[:2] != prev[:2]:
                rows.append(None)
            prev = key
            rows.append([r.case, r.layout, r.mode, r.provider, fmt_time(r.time_s) + _flags(r), f"{r.gbps:.1f}",
                         f"{r.gflops:.1f}", r.bound[:3], f"{r.pct_ceiling:.0f}%", _fmt_x(r.x_eager),
                         _fmt_x(r.x_compile)])
        widths = [max([len(c)] + [len(row[i]) for row in rows if row]) for i, c in enumerate(cols)]
        right = set(range(4, len(cols))) - {7}

        def line(cells):
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

        out = [line(cols), line(["-" * w for w in widths])]
        out += [line(row) if row else "" for row in rows]
        if any("*" in _flags(r) for r in self.results):
            out.append(f"* the median is over {NOISY}x the fastest round: something disturbed that timing")
        if any("!" in _flags(r) for r in self.results):
            out.append(f"! other work kept over {CONTENDED} cores busy during that timing")
        return "\n".join(out)

    def to_json(self) -> Dict[str, Any]:
        m = self._machine
        return {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "argv": sys.argv,
            "device": self.device.type,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "budget_s": self.budget_s,
            "malloc": self.malloc,
            "other_cpu_load_cores": {"before": self.busy_before, "after": self.busy_after},
            "machine": None if m is None else {
                "name": m.name, "copy_GBps": m.copy_bytes_per_s / 1e9, "matmul_GFLOPs": m.matmul_flops_per_s / 1e9,
                "ridge_flop_per_byte": m.ridge, "l2_bytes": m.l2_bytes, **m.details},
            "results": [dataclasses.asdict(r) for r in self.results],
        }

    def save(self, out_dir: str) -> List[str]:
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, "latest.json")
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        written = [path]
        png = plot_roofline(self, os.path.join(out_dir, "roofline.png"))
        if png:
            written.append(png)
        return written


_PROVIDER_COLORS = {"eager": "tab:gray", "compile": "tab:blue", "cpu": "tab:red", "cuda": "tab:green",
                    "triton": "tab:purple"}


def plot_roofline(session: Session, path: str) -> Optional[str]:
    m = session._machine
    if m is None or not session.results:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return None
    res = session.results
    xs = [r.intensity for r in res]
    lo, hi = min(xs + [m.ridge]) / 2, max(xs + [m.ridge]) * 4
    peak_g, bw_g = m.matmul_flops_per_s / 1e9, m.copy_bytes_per_s / 1e9
    fig, ax = plt.subplots(figsize=(12, 6.5))
    grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ax.plot(grid, [min(peak_g, x * bw_g) for x in grid], color="black", lw=2)
    ax.axvline(m.ridge, color="black", ls=":", lw=1)
    markers = {"fwd": "o", "fwd+bwd": "^"}
    for r in res:
        c = _PROVIDER_COLORS.get(r.provider, "tab:orange")
        filled = r.layout == "nchw"
        ax.scatter([r.intensity], [r.gflops], marker=markers.get(r.mode, "s"), s=28,
                   facecolors=c if filled else "none", edgecolors=c, linewidths=1.2, alpha=0.85)
    handles = [Line2D([], [], color="black", lw=2,
                      label=f"ceilings: copy {bw_g:.1f} GB/s, fp32 matmul {peak_g:.1f} GFLOP/s"),
               Line2D([], [], color="black", ls=":", lw=1, label=f"ridge {m.ridge:.2f} FLOP/B")]
    handles += [Line2D([], [], ls="", marker="o", color=_PROVIDER_COLORS.get(p, "tab:orange"), label=p)
                for p in dict.fromkeys(r.provider for r in res)]
    handles += [Line2D([], [], ls="", marker="o", color="k", label="fwd"),
                Line2D([], [], ls="", marker="^", color="k", label="fwd+bwd"),
                Line2D([], [], ls="", marker="o", color="k", label="nchw (filled)"),
                Line2D([], [], ls="", marker="o", color="k", mfc="none", label="channels_last (hollow)")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("arithmetic intensity (FLOP / fewest bytes)")
    ax.set_ylabel("achieved GFLOP/s")
    ops = ", ".join(sorted({r.op for r in res}))
    ax.set_title(f"{ops} on {m.device} ({m.name}, {m.threads} threads), torch {torch.__version__}", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# Summaries ---------------------------------------------------------------------------------------

_SUMMARIES: List[Callable[[List[Result], Machine], List[str]]] = []


def add_summary(fn: Callable[[List[Result], Machine], List[str]]):
    """Register ``fn(results, machine) -> lines``, printed after the table (results carry speedups)."""
    _SUMMARIES.append(fn)
    return fn


def summaries() -> List[Callable[[List[Result], Machine], List[str]]]:
    return list(_SUMMARIES)


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def speedup_stats(rows: Sequence[Result], attr: str):
    """(geomean, min, case at the min) of one speedup column (``x_eager`` / ``x_compile``) as strings, '-'
    where nothing was measured."""
    sel = [r for r in rows if getattr(r, attr)]
    if not sel:
        return "-", "-", ""
    worst = min(sel, key=lambda r: getattr(r, attr))
    return f"{geomean([getattr(r, attr) for r in sel]):.2f}", f"{getattr(worst, attr):.2f}", worst.case


def verdict(x: Optional[float], bar: float) -> str:
    return "-" if x is None else f"{x:.2f} (>= {bar:.1f}: {'PASS' if x >= bar else 'FAIL'})"


def acceptance_lines(results: Sequence[Result], op: str, what: str, bars: Mapping[str, Optional[float]],
                     modes: Sequence[str] = ("fwd",)) -> List[str]:
    """Per fastops provider, dtype and mode: geomean and worst speedup over eager and compile across the op's
    cases, and a PASS / FAIL against ``bars`` ({"x_eager": bar, "x_compile": bar}; None: no bar)."""
    mine = [r for r in results if r.op == op]
    fused = [p for p in FUSED_BACKENDS if any(r.provider == p for r in mine)]
    if mine and not fused:
        return [f"{op} summary: no fastops backend ran here (`python -m fastops info` says why)"]
    lines = []
    for prov in fused:
        lines.append(f"{op} summary, provider {prov}: speedup over eager ({what}) and over torch.compile")
        for dtype in sorted({r.meta.get("dtype", "") for r in mine}):
            for mode in MODES:
                rows = [r for r in mine if r.provider == prov and r.meta.get("dtype", "") == dtype and r.mode == mode]
                if not rows:
                    continue
                parts = []
                for attr in ("x_eager", "x_compile"):
                    g, m, at = speedup_stats(rows, attr)
                    bar = bars.get(attr) if mode in modes else None
                    gv = verdict(float(g), bar) if bar is not None and g != "-" else g
                    parts.append(f"{attr.replace('x_', '×')} geomean {gv}, min {m} ({at})")
                lines.append(f"  {dtype} {mode}, {len(rows)} cases: " + "; ".join(parts))
    return lines


def fmt_time(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.3f} s"


def _flags(r: Result) -> str:
    noisy = "*" if r.rounds > 1 and r.time_s > NOISY * r.min_s else ""
    contended = "!" if r.other_load_cores is not None and r.other_load_cores > CONTENDED else ""
    return (noisy + contended).ljust(2)


def _fmt_x(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"
