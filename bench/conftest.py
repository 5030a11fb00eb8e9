"""pytest wiring for the roofline benchmarks (the harness itself is bench/roofline.py).

    pytest bench/ --benchmark-only                      # everything, on CUDA if there is a GPU
    pytest bench/ --benchmark-only -k "mbv2 and 144"    # a selection
    pytest bench/ --benchmark-only -m bench_gpu         # the subset bench/gpu_check.sh times
"""
import os
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
# The bench files import the harness as `roofline` whatever pytest's import mode.
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import torch  # noqa: E402

import roofline  # noqa: E402


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pytest_addoption(parser):
    g = parser.getgroup("fastops roofline")
    g.addoption("--bench-budget", type=float, default=None,
                help="seconds of timed calls per (case, provider); default 0.3 on CPU, 0.15 on CUDA")
    g.addoption("--bench-threads", type=int, default=None,
                help="torch.set_num_threads for the run (default: the cores this process may use)")
    g.addoption("--bench-deadline", type=float, default=None,
                help="seconds after the session starts past which the remaining cases are skipped, so a "
                     "time-boxed run still ends with its table and files")
    g.addoption("--bench-system-malloc", action="store_true",
                help="leave glibc malloc as it is (by default the run keeps freed memory, see "
                     "roofline.keep_freed_memory, so that page faults do not land in the timings)")
    g.addoption("--bench-results", default=os.path.join(HERE, "results"),
                help="folder for latest.json and roofline.png")


def pytest_configure(config):
    config.addinivalue_line("markers", "bench_gpu: the subset of benchmark cases bench/gpu_check.sh times on a GPU")
    threads = config.getoption("--bench-threads") or _default_threads()
    torch.set_num_threads(threads)
    # Our one roofline table replaces pytest-benchmark's per-test table (its JSON options still work).
    if hasattr(config.option, "benchmark_quiet"):
        config.option.benchmark_quiet = True
    device = roofline.bench_device()
    budget = config.getoption("--bench-budget")
    if budget is None:
        budget = 0.15 if device.type == "cuda" else 0.3
    malloc = None if config.getoption("--bench-system-malloc") else roofline.keep_freed_memory()
    config._fastops_roofline = roofline.Session(device, budget, malloc)
    config._fastops_roofline_t0 = time.time()


@pytest.fixture
def roofline_session(request):
    return request.config._fastops_roofline


@pytest.fixture
def time_case(benchmark, roofline_session, request):
    """``time_case(case, provider)``: time one case with one provider and record it for the report."""
    deadline = request.config.getoption("--bench-deadline")

    def run(case, provider):
        if deadline is not None and time.time() - request.config._fastops_roofline_t0 > deadline:
            pytest.skip(f"--bench-deadline {deadline:.0f} s reached")
        return roofline_session.run(benchmark, case, provider)

    return run


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_fastops_roofline", None)
    if session is None:
        return
    if not session.results:
        # Only measurements outside the table ran (e.g. an interleaved model ratio): their summary lines.
        lines = [line for fn in roofline.summaries() for line in (fn([], session.machine) or [])]
        if lines:
            terminalreporter.section("fastops roofline")
            for line in session.header() + [""] + lines:
                terminalreporter.write_line(line)
        return
    session.busy_after = roofline.cpu_busy()
    session.finalize()
    tr = terminalreporter
    tr.section("fastops roofline")
    for line in session.header():
        tr.write_line(line)
    tr.write_line("")
    for line in session.table().splitlines():
        tr.write_line(line)
    for fn in roofline.summaries():
        lines = fn(session.results, session.machine)
        if lines:
            tr.write_line("")
            for line in lines:
                tr.write_line(line)
    out_dir = config.getoption("--bench-results")
    written = session.save(out_dir)
    tr.write_line("")
    shown = [os.path.relpath(p) if not os.path.relpath(p).startswith("..") else p for p in written]
    tr.write_line(f"saved: {', '.join(shown)}; "
                  f"{len(session.results)} timings in {time.time() - config._fastops_roofline_t0:.0f} s")
