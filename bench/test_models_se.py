"""Model-level cases: fastops' ``seresnet50`` and ``resnet50`` (fastops.models) against timm's, batch 8, 224x224,
fp32, eval-mode forward (the harness runs ``fwd`` cases under torch.no_grad).

Providers, all on the same weights (the timm model's state_dict, loaded into the fastops model; the machinery
is bench/models_common.py's):

* ``eager``: the timm model (``timm.create_model(name, zero_init_last=False)``, seeded; zero_init_last off so
  that bn3 and the SE input are not all zeros);
* ``compile``: torch.compile of that timm model;
* ``cpu`` / ``cuda`` / ``triton``: ``fastops.models.create_model(name)`` with that fastops backend forced through
  ``fastops.use_backend`` (as bench/roofline.py's op providers do); a backend one of the model's ops cannot run
  is skipped with the reason.

The summary gives the acceptance metric of the SE work: fastops seresnet50 speed relative to fastops resnet50
(``t(resnet50) / t(seresnet50)``, target >= 0.97), measured by ``test_models_se_ratio_interleaved`` with the two
fastops models called alternately (the per-case timings run minutes apart, and this machine's speed drifts more
than the margin being measured), and each fastops model against the better of timm eager and timm compiled.
The interleaved test also times, as a third call of each round, the same seresnet50 with its conv3 and SE as two
ops (the fused ``fastops.conv1x1_squeeze_excite`` turned off): what the CPU model ran before that op.

These cases are slow (on a CPU a forward takes around a second and compiling a model minutes; a call longer
than --bench-budget is timed in one round after one warm-up and one calibration call). They carry the
``slow`` marker (registered in pyproject.toml): ``-m "not slow"`` leaves them out, as does
``-k "not model."``; ``-k model.seresnet50`` / ``-k model.resnet50`` select one model. Layouts: ``nchw`` on
CPU, ``nchw`` and ``nhwc`` (channels_last model and input) on CUDA; ``FASTOPS_BENCH_MODEL_LAYOUTS=nchw,nhwc``
overrides.
"""
import statistics
import time

import pytest
import torch

import fastops
from fastops import backends
from models_common import ALL_LAYOUTS, OP, ModelBench, model_layouts
from roofline import FUSED_BACKENDS, add_summary, bench_device, fmt_time, parametrize

BATCH = 8
RES = 224
DTYPE = torch.float32
MODELS = ("seresnet50", "resnet50")  # fastops.models names; timm's are the same
ACCEPT_RATIO = 0.97

LAYOUTS = model_layouts()
BENCH = ModelBench(MODELS, res=RES, batch=BATCH, dtype=DTYPE, timm_kwargs={"zero_init_last": False},
                   probe_res=64)

CASES = [BENCH.case(name, layout) for name in MODELS for layout in LAYOUTS]


@parametrize(CASES)
def test_models_se(time_case, case, provider):
    time_case(case, provider)


# The acceptance ratio, measured interleaved ------------------------------------------------------------
# The two models' cases above run minutes apart (timm compiles in between) and this machine's speed drifts
# by 10-20% over minutes, which moves their ratio by as much. Here the fastops models alternate call by
# call (resnet50, seresnet50, resnet50, ...), so drift lands on both alike; the ratio of the medians is the
# acceptance number, and the spread of the per-pair ratios says how steady it was.
PAIR_ROUNDS = 15
PAIRS = {}  # (layout, backend) -> (median t(resnet50), median t(seresnet50), per-pair ratios)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_models_se_ratio_interleaved(benchmark, roofline_session, backend, layout):
    # roofline_session: the run's malloc setting and machine header, as for the cases above.
    dev = bench_device()
    if backend == "triton" and (dev.type != "cuda" or backends.triton_interpreting()):
        pytest.skip("triton is timed on CUDA tensors only (never its interpreter)")
    if backend != "triton" and backends.c_ext_reason(dev, backend) is not None:
        pytest.skip(backends.c_ext_reason(dev, backend))
    x = torch.randn(BATCH, 3, RES, RES, device=dev, dtype=DTYPE).contiguous(memory_format=ALL_LAYOUTS[layout])
    models = {n: BENCH.fastops_model(n, layout).eval() for n in ("resnet50", "seresnet50")}
    # An ablation alongside: the same seresnet50 with each block's conv3 and SE as two ops (conv_bias_act, then
    # squeeze_excite), as it ran before fastops.conv1x1_squeeze_excite; on CUDA the two are what runs anyway.
    apart = "seresnet50, conv3 and SE apart"
    fusable = fastops.nn.conv_bn_se_fusable
    runs = dict(models, **{apart: models["seresnet50"]})
    times = {n: [] for n in runs}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def call(n, m):
        fastops.nn.conv_bn_se_fusable = (lambda *args: False) if n == apart else fusable
        try:
            return m(x)
        finally:
            fastops.nn.conv_bn_se_fusable = fusable

    def pairs():
        for _ in range(PAIR_ROUNDS):
            for n, m in runs.items():
                sync()
                t0 = time.perf_counter()
                call(n, m)
                sync()
                times[n].append(time.perf_counter() - t0)

    with fastops.use_backend(backend), torch.no_grad():
        for n, m in runs.items():
            call(n, m)  # warm-up (weights folded, kernels compiled)
        benchmark.pedantic(pairs, rounds=1, warmup_rounds=0, iterations=1)
    rn, se = statistics.median(times["resnet50"]), statistics.median(times["seresnet50"])
    PAIRS[(layout, backend)] = (rn, se, [a / b for a, b in zip(times["resnet50"], times["seresnet50"])],
                                statistics.median(times[apart]))


# Summary -------------------------------------------------------------------------------------------

@add_summary
def _summary(results, machine):
    # Other model files share the op name "model": only this file's models, batch and mode count here.
    mine = [r for r in results if r.op == OP and r.meta.get("model") in MODELS and r.mode == "fwd"
            and r.meta.get("batch") == BATCH]
    if not mine and not PAIRS:
        return []
    t = {(r.meta["model"], r.layout, r.provider): r.time_s for r in mine}
    lines = [f"models summary (batch {BATCH}, {RES}x{RES}, fp32, eval forward): seresnet50 speed relative to "
             f"resnet50 = t(resnet50) / t(seresnet50) (the acceptance, >= {ACCEPT_RATIO:.2f}, is the interleaved "
             f"line); "
             f"each fastops model against the better of timm eager / timm compiled"]
    for layout in LAYOUTS:
        provs = [p for p in ("eager", "compile") + FUSED_BACKENDS if any((m, layout, p) in t for m in MODELS)]
        if not provs:
            continue
        lines.append(f"  {layout}: {'provider':<18} {'seresnet50':>11} {'resnet50':>11} {'ratio':>7}  "
                     f"{'seresnet50 ×best-timm':>21} {'resnet50 ×best-timm':>19}")
        for p in provs:
            se, rn = t.get(("seresnet50", layout, p)), t.get(("resnet50", layout, p))
            ratio = f"{rn / se:.3f}" if se and rn else "-"
            fused = p in FUSED_BACKENDS
            vs = []
            for m, tm in (("seresnet50", se), ("resnet50", rn)):
                base = [t[k] for k in ((m, layout, "eager"), (m, layout, "compile")) if k in t]
                vs.append(f"{min(base) / tm:.2f}" if fused and tm and base else "-")
            label = f"{p} ({'fastops' if fused else 'timm'})"
            lines.append(f"  {'':<{len(layout)}}  {label:<18} {fmt_time(se) if se else '-':>11} "
                         f"{fmt_time(rn) if rn else '-':>11} {ratio:>7}  {vs[0]:>21} {vs[1]:>19}")
    if mine and not any(r.provider in FUSED_BACKENDS for r in mine):
        lines.append("  no fastops model ran here (`python -m fastops info` says why)")
    for (layout, backend), (rn, se, ratios, apart) in sorted(PAIRS.items()):
        verdict = "PASS" if rn / se >= ACCEPT_RATIO else "FAIL"
        lines.append(f"  acceptance {layout} {backend}, interleaved ({PAIR_ROUNDS} alternating calls each, medians): "
                     f"resnet50 {fmt_time(rn)}, seresnet50 {fmt_time(se)}, ratio {rn / se:.3f} (per pair "
                     f"{min(ratios):.3f}..{max(ratios):.3f}; >= {ACCEPT_RATIO:.2f}: {verdict}); "
                     f"ablation, seresnet50 with conv3 and SE as two ops: {fmt_time(apart)}, ratio {rn / apart:.3f}")
    return lines
