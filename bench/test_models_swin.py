"""Model-level cases: fastops' ``swin_tiny_patch4_window7_224`` (fastops.models, every block's attention one
fastops.window_attention call) against timm's, batch 8, 224x224, fp32, on the same weights (timm's state_dict
loaded strict; the machinery is bench/models_common.py's).

Two cases, both named ``model.swin_tiny_patch4_window7_224-b8h224``:

* ``fwd``: eval-mode forward (the harness runs it under torch.no_grad);
* ``fwd+bwd``: a training step: the model in train mode (drop path active at timm's default rate, 0.1, in both
  models), forward, then the backward of the logits (a random upstream gradient, as if from the loss) into
  every parameter; the images need no gradient.

Providers: ``eager`` the timm model, ``compile`` torch.compile of it, and ``cpu`` / ``cuda`` / ``triton`` the
fastops model with that backend forced (skipped with the reason where one of its ops cannot run). Layout
``nchw`` only: the input image is the only 4-d tensor (Swin's features are NHWC from the patch embedding on),
so channels_last would change nothing but the patch-embedding convolution.

The cases are slow (a CPU forward takes seconds, compiling the model minutes) and carry the ``slow`` marker;
``-k model.swin`` selects them, ``-k "model.swin and not bwd"`` only the forward. The summary compares the fastops
forward with the better of timm eager and timm compiled (acceptance >= 1.2x) and gives the same ratio for the
training step.
"""
import torch

from models_common import OP, ModelBench
from roofline import FUSED_BACKENDS, MODES, add_summary, fmt_time, parametrize

MODEL = "swin_tiny_patch4_window7_224"
BATCH = 8
RES = 224
DTYPE = torch.float32
LAYOUT = "nchw"
ACCEPT_X_BEST_TIMM = 1.2

# probe_res = RES: the patch embedding takes only the size it was built for.
BENCH = ModelBench((MODEL,), res=RES, batch=BATCH, dtype=DTYPE, probe_res=RES)

CASES = [BENCH.case(MODEL, LAYOUT, mode) for mode in MODES]


@parametrize(CASES)
def test_models_swin(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    mine = [r for r in results if r.op == OP and r.meta.get("model") == MODEL]
    if not mine:
        return []
    t = {(r.mode, r.provider): r.time_s for r in mine}
    lines = [f"swin summary ({MODEL}, batch {BATCH}, {RES}x{RES}, fp32): each provider's time; fastops against "
             f"the better of timm eager / timm compiled; acceptance for the eval forward (fwd) >= "
             f"{ACCEPT_X_BEST_TIMM:.1f}x; fwd+bwd is the training step",
             f"  {'mode':<8} {'provider':<18} {'time':>11} {'×best-timm':>10}"]
    for mode in MODES:
        base = [t[k] for k in ((mode, "eager"), (mode, "compile")) if k in t]
        for p in ("eager", "compile") + FUSED_BACKENDS:
            tm = t.get((mode, p))
            if tm is None:
                continue
            fused = p in FUSED_BACKENDS
            x = min(base) / tm if fused and base else None
            verdict = ""
            if x is not None and mode == "fwd":
                verdict = "PASS" if x >= ACCEPT_X_BEST_TIMM else "FAIL"
            label = f"{p} ({'fastops' if fused else 'timm'})"
            lines.append(f"  {mode:<8} {label:<18} {fmt_time(tm):>11} {'-' if x is None else f'{x:.2f}':>10}  "
                         f"{verdict}")
    if not any(r.provider in FUSED_BACKENDS for r in mine):
        lines.append("  no fastops model ran here (`python -m fastops info` says why)")
    return lines
