"""Model-level cases: fastops' ``pvt_v2_b0`` and ``pvt_v2_b2`` (fastops.models: every block's reduction one
fastops.spatial_reduction call, its attention one fastops.sr_attention call, its MLP's depthwise conv one
fastops.depthwise_conv2d call on the tokens in place) against timm's, batch 8, 224x224, fp32, eval-mode forward
(the harness runs ``fwd`` cases under torch.no_grad), on the same weights (timm's state_dict loaded strict; the
machinery is bench/models_common.py's).

Providers: ``eager`` the timm model, ``compile`` torch.compile of it, and ``cpu`` / ``cuda`` / ``triton`` the
fastops model with that backend forced (skipped with the reason where one of its ops cannot run). Layout
``nchw`` on a CPU (both layouts on CUDA; ``FASTOPS_BENCH_MODEL_LAYOUTS`` overrides): past the patch embedding
PVT's features are tokens, so channels_last changes little but the convolutions between stages.

The cases are slow (a CPU forward takes up to seconds, compiling a model minutes) and carry the ``slow``
marker; ``-k model.pvt_v2`` selects them, ``-k model.pvt_v2_b0`` one model. The summary compares each fastops
model with the better of timm eager and timm compiled (acceptance: pvt_v2_b0 >= 1.3x).
"""
import torch

from models_common import OP, ModelBench, model_layouts
from roofline import FUSED_BACKENDS, add_summary, fmt_time, parametrize

MODELS = ("pvt_v2_b0", "pvt_v2_b2")  # fastops.models names; timm's are the same
BATCH = 8
RES = 224
DTYPE = torch.float32
ACCEPT_X_BEST_TIMM = {"pvt_v2_b0": 1.3}

LAYOUTS = model_layouts()
# probe_res 64: PVTv2 takes any size whose stage maps are at least their reduction ratio (16x16 .. 2x2 here).
BENCH = ModelBench(MODELS, res=RES, batch=BATCH, dtype=DTYPE, probe_res=64)

CASES = [BENCH.case(name, layout) for name in MODELS for layout in LAYOUTS]


@parametrize(CASES)
def test_models_pvt(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    # Other model files share the op name "model": only this file's models and mode count here.
    mine = [r for r in results if r.op == OP and r.meta.get("model") in MODELS and r.mode == "fwd"]
    if not mine:
        return []
    t = {(r.meta["model"], r.layout, r.provider): r.time_s for r in mine}
    lines = [f"pvt summary (batch {BATCH}, {RES}x{RES}, fp32, eval forward): each provider's time; fastops "
             f"against the better of timm eager / timm compiled"]
    for layout in LAYOUTS:
        provs = [p for p in ("eager", "compile") + FUSED_BACKENDS if any((m, layout, p) in t for m in MODELS)]
        if not provs:
            continue
        lines.append(f"  {layout}: {'provider':<18} " + " ".join(f"{m:>12} {'×best-timm':>10}" for m in MODELS))
        for p in provs:
            fused = p in FUSED_BACKENDS
            cells = []
            for m in MODELS:
                tm = t.get((m, layout, p))
                base = [t[k] for k in ((m, layout, "eager"), (m, layout, "compile")) if k in t]
                x = f"{min(base) / tm:.2f}" if fused and tm and base else "-"
                cells.append(f"{fmt_time(tm) if tm else '-':>12} {x:>10}")
            label = f"{p} ({'fastops' if fused else 'timm'})"
            lines.append(f"  {'':<{len(layout)}}  {label:<18} " + " ".join(cells))
        for m, bar in ACCEPT_X_BEST_TIMM.items():
            base = [t[k] for k in ((m, layout, "eager"), (m, layout, "compile")) if k in t]
            for p in FUSED_BACKENDS:
                if (m, layout, p) in t and base:
                    x = min(base) / t[(m, layout, p)]
                    lines.append(f"  acceptance {m} {layout} {p}: ×best-timm {x:.2f} (>= {bar:.1f}: "
                                 f"{'PASS' if x >= bar else 'FAIL'})")
    if not any(r.provider in FUSED_BACKENDS for r in mine):
        lines.append("  no fastops model ran here (`python -m fastops info` says why)")
    return lines
