"""Model-level cases: fastops' ``seresnet50`` and ``resnet50`` (fastops.models) against timm's, batch 8, 224x224,
fp32, eval-mode forward (the harness runs ``fwd`` cases under torch.no_grad).

Providers, all on the same weights (the timm model's state_dict, loaded into the fastops model):

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
import functools
import importlib
import os
from typing import Optional

import pytest
import timm
import torch

import fastops
from fastops import backends
from roofline import FUSED_BACKENDS, Case, Provider, add_summary, bench_device, fmt_time, parametrize

OP = "model"
BATCH = 8
RES = 224
DTYPE = torch.float32
MODELS = ("seresnet50", "resnet50")  # fastops.models names; timm's are the same
ALL_LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
ACCEPT_RATIO = 0.97


def _layouts():
    env = os.environ.get("FASTOPS_BENCH_MODEL_LAYOUTS", "").strip()
    if env:
        names = [n.strip() for n in env.split(",") if n.strip()]
        bad = [n for n in names if n not in ALL_LAYOUTS]
        if bad:
            raise ValueError(f"FASTOPS_BENCH_MODEL_LAYOUTS: unknown layout(s) {bad}; expected {list(ALL_LAYOUTS)}")
        return names
    # A whole-model timing costs seconds per call on a CPU: one layout there.
    return list(ALL_LAYOUTS) if bench_device().type == "cuda" else ["nchw"]


LAYOUTS = _layouts()


# fastops.models --------------------------------------------------------------------------------

def _import_fastops_models():
    """fastops.models, after importing its model files; (module or None, import error or None)."""
    try:
        fm = importlib.import_module("fastops.models")
    except Exception as e:  # noqa: BLE001  (the reason is reported in the skip)
        return None, f"import fastops.models failed: {type(e).__name__}: {e}"
    err = None
    try:  # registers seresnet50 / resnet50 if models/__init__.py does not import it itself
        importlib.import_module("fastops.models.resnet")
    except Exception as e:  # noqa: BLE001
        err = f"import fastops.models.resnet failed: {type(e).__name__}: {e}"
    return fm, err


_FM, _FM_ERROR = _import_fastops_models()


def _missing(name: str) -> Optional[str]:
    """Why fastops.models cannot build `name`, or None."""
    if _FM is None:
        return _FM_ERROR
    have = _FM.list_models()
    if name in have:
        return None
    why = f"fastops.models has no {name!r} yet (list_models() = {have})"
    return f"{why}; {_FM_ERROR}" if _FM_ERROR else why


# Models, built once per (name, layout) and shared by the providers --------------------------------

@functools.lru_cache(maxsize=None)
def _timm_model(name: str, layout: str):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, zero_init_last=False).eval()
    return m.to(device=bench_device(), dtype=DTYPE, memory_format=ALL_LAYOUTS[layout])


@functools.lru_cache(maxsize=None)
def _fastops_model(name: str, layout: str):
    ref = _timm_model(name, layout)
    m = _FM.create_model(name, fused=True)
    # timm's state_dict keys, as fastops.models promises: a mismatch is a bug in the model, not a skip.
    m.load_state_dict(ref.state_dict(), strict=True)
    return m.eval().to(device=bench_device(), dtype=DTYPE, memory_format=ALL_LAYOUTS[layout])


class TimmModel(Provider):
    """timm's model, eager or torch.compile'd (compiled once per case, at its first call, untimed)."""

    def __init__(self, name: str, layout: str, compiled: bool):
        super().__init__(None)
        self.name, self.layout, self.compiled = name, layout, compiled

    def build(self):
        m = _timm_model(self.name, self.layout)
        if not self.compiled:
            return m
        torch._dynamo.reset()  # as roofline.Compiled: a fresh cache per case
        return torch.compile(m, dynamic=False)


class FastopsModel(Provider):
    """fastops.models.create_model(name) with one fastops backend forced around the whole measurement."""

    def __init__(self, name: str, layout: str, backend: str):
        super().__init__(None)
        self.name, self.layout, self.backend = name, layout, backend

    def why_not(self, device, inputs=None):
        why = _missing(self.name)
        if why is not None:
            return why
        if self.backend == "triton":
            if backends.triton_interpreting():
                return "TRITON_INTERPRET=1: the Triton interpreter is not a speed"
            if device.type != "cuda":
                return "triton is timed on CUDA tensors only (never its interpreter)"
            why = backends.triton_reason(device)
        else:
            why = backends.c_ext_reason(device, self.backend)
        if why is not None or inputs is None:
            return why
        # Before timing: can every fastops op of the model run on this backend? A small forward says.
        x = torch.randn(1, 3, 64, 64, device=device, dtype=DTYPE).contiguous(memory_format=ALL_LAYOUTS[self.layout])
        try:
            with fastops.use_backend(self.backend), torch.no_grad():
                _fastops_model(self.name, self.layout)(x)
        except backends.BackendUnavailable as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return None

    def context(self):
        return fastops.use_backend(self.backend)

    def build(self):
        return _fastops_model(self.name, self.layout)


# Cases ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _counts(name: str):
    """(FLOPs of one 224x224 image, parameter + buffer elements), from a forward on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        m = timm.create_model(name, pretrained=False).eval()
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            m(torch.empty(1, 3, RES, RES))
    return fc.get_total_flops(), sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers())


def _case(name: str, layout: str) -> Case:
    flops1, n_params = _counts(name)
    esz = torch.finfo(DTYPE).bits // 8
    # FLOPs: convolutions and the classifier (FlopCounterMode, 2 per multiply-add; BN, activations, pooling
    # and SE / CBAM elementwise work not counted). Fewest bytes: the weights and buffers read once, the images
    # read and the logits written; the activations between layers are left out (they are far more, but a
    # floor is what the harness asks for), so these cases read as compute-bound.
    flops = BATCH * flops1
    nbytes = esz * (n_params + BATCH * 3 * RES * RES + BATCH * 1000)
    fmt = ALL_LAYOUTS[layout]

    def make_inputs(device):
        return (torch.randn(BATCH, 3, RES, RES, device=device, dtype=DTYPE).contiguous(memory_format=fmt),)

    providers = {"eager": TimmModel(name, layout, False), "compile": TimmModel(name, layout, True)}
    for b in FUSED_BACKENDS:
        providers[b] = FastopsModel(name, layout, b)
    return Case(op=OP, name=f"model.{name}-b{BATCH}h{RES}", layout=layout, mode="fwd", flops=flops, bytes=nbytes,
                make_inputs=make_inputs, providers=providers, marks=[pytest.mark.slow],
                meta={"model": name, "batch": BATCH, "res": RES, "dtype": str(DTYPE).replace("torch.", ""),
                      "eval": True, "fastops_missing": _missing(name)})


CASES = [_case(name, layout) for name in MODELS for layout in LAYOUTS]


@parametrize(CASES)
def test_models_se(time_case, case, provider):
    time_case(case, provider)


# Summary -------------------------------------------------------------------------------------------

@add_summary
def _summary(results, machine):
    mine = [r for r in results if r.op == OP]
    if not mine:
        return []
    t = {(r.meta["model"], r.layout, r.provider): r.time_s for r in mine}
    lines = [f"models summary (batch {BATCH}, {RES}x{RES}, fp32, eval forward): seresnet50 speed relative to "
             f"resnet50 = t(resnet50) / t(seresnet50), acceptance for the fastops models >= {ACCEPT_RATIO:.2f}; "
             f"each fastops model against the better of timm eager / timm compiled"]
    missing = [f"{m}: {_missing(m)}" for m in MODELS if _missing(m)]
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
        lines.append("  no fastops model ran here" + (f" ({'; '.join(missing)})" if missing else
                                                      " (`python -m fastops info` says why)"))
    return lines
