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
(``t(resnet50) / t(seresnet50)``, target >= 0.97), and each fastops model against the better of timm eager and
timm compiled.

These cases are slow (on a CPU a forward takes around a second and compiling a model minutes; a call longer
than --bench-budget is timed in one round after one warm-up and one calibration call). They carry the
``slow`` marker (registered in pyproject.toml): ``-m "not slow"`` leaves them out, as does
``-k "not model."``; ``-k model.seresnet50`` / ``-k model.resnet50`` select one model. Layouts: ``nchw`` on
CPU, ``nchw`` and ``nhwc`` (channels_last model and input) on CUDA; ``FASTOPS_BENCH_MODEL_LAYOUTS=nchw,nhwc``
overrides.
"""
import torch

from models_common import OP, ModelBench, model_layouts
from roofline import FUSED_BACKENDS, add_summary, fmt_time, parametrize

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


# Summary -------------------------------------------------------------------------------------------

@add_summary
def _summary(results, machine):
    # Other model files share the op name "model": only this file's models and mode count here.
    mine = [r for r in results if r.op == OP and r.meta.get("model") in MODELS and r.mode == "fwd"]
    if not mine:
        return []
    t = {(r.meta["model"], r.layout, r.provider): r.time_s for r in mine}
    lines = [f"models summary (batch {BATCH}, {RES}x{RES}, fp32, eval forward): seresnet50 speed relative to "
             f"resnet50 = t(resnet50) / t(seresnet50), acceptance for the fastops models >= {ACCEPT_RATIO:.2f}; "
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
            verdict = ""
            if fused and se and rn:
                verdict = "PASS" if rn / se >= ACCEPT_RATIO else "FAIL"
            vs = []
            for m, tm in (("seresnet50", se), ("resnet50", rn)):
                base = [t[k] for k in ((m, layout, "eager"), (m, layout, "compile")) if k in t]
                vs.append(f"{min(base) / tm:.2f}" if fused and tm and base else "-")
            label = f"{p} ({'fastops' if fused else 'timm'})"
            lines.append(f"  {'':<{len(layout)}}  {label:<18} {fmt_time(se) if se else '-':>11} "
                         f"{fmt_time(rn) if rn else '-':>11} {ratio:>7}  {vs[0]:>21} {vs[1]:>19}  {verdict}")
    if not any(r.provider in FUSED_BACKENDS for r in mine):
        lines.append("  no fastops model ran here (`python -m fastops info` says why)")
    return lines
