"""Model-level benchmark machinery shared by the ``bench/test_models_*.py`` files: a fastops.models model
against timm's, on the same weights.

A :class:`ModelBench` holds a family of models (timm names, which fastops.models also uses), the input
resolution, batch and dtype, and builds their :class:`roofline.Case` objects. Its providers:

* ``eager``: the timm model (``timm.create_model(name, **timm_kwargs)``, seeded);
* ``compile``: torch.compile of that timm model;
* ``cpu`` / ``cuda`` / ``triton``: ``fastops.models.create_model(name)`` with the timm model's state_dict loaded
  (``strict=True``) and that fastops backend forced through ``fastops.use_backend`` (as bench/roofline.py's op
  providers do); a backend one of the model's ops cannot run is skipped with the registry's reason.

Modes: ``fwd`` is an eval-mode forward (the harness runs it under torch.no_grad); ``fwd+bwd`` is a training
step: the model in train mode, forward, then the backward of the logits into every trainable parameter
(``Case.grad_params``; the images need no gradient).

Models are built once per (name, layout) and shared by the providers; each provider sets the model's train /
eval mode when it is built, so one model serves both modes. Layouts: ``nchw`` (contiguous) and ``nhwc``
(channels_last model and input).
"""
import os
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import pytest
import timm
import torch

import fastops
import fastops.models as fastops_models
from fastops import backends
from roofline import FUSED_BACKENDS, Case, Provider, bench_device, fmt_time

OP = "model"
ALL_LAYOUTS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}
NUM_CLASSES = 1000
# A whole-model call takes about a second on a CPU; the harness would time it once, and one reading of it
# varied by 1.4x between runs here. The median of a few is what the summaries compare.
MODEL_ROUNDS = 5


def model_layouts() -> List[str]:
    """``FASTOPS_BENCH_MODEL_LAYOUTS=nchw,nhwc`` if set; else both layouts on CUDA, ``nchw`` on a CPU."""
    env = os.environ.get("FASTOPS_BENCH_MODEL_LAYOUTS", "").strip()
    if env:
        names = [n.strip() for n in env.split(",") if n.strip()]
        bad = [n for n in names if n not in ALL_LAYOUTS]
        if bad:
            raise ValueError(f"FASTOPS_BENCH_MODEL_LAYOUTS: unknown layout(s) {bad}; expected {list(ALL_LAYOUTS)}")
        return names
    # A whole-model timing costs seconds per call on a CPU: one layout there.
    return list(ALL_LAYOUTS) if bench_device().type == "cuda" else ["nchw"]


class ModelBench:
    """One family of models timed at one resolution, batch and dtype.

    `timm_kwargs` go to ``timm.create_model`` only (the fastops model takes the timm model's weights, so its
    own initialisation does not matter); `probe_res` is the image size of the small forward that asks, before
    timing, whether every fastops op of the model can run on a backend (a model with a strict input size needs
    its own).
    """

    def __init__(self, names: Iterable[str], *, res: int, batch: int, dtype: torch.dtype = torch.float32,
                 timm_kwargs: Optional[Mapping] = None, probe_res: Optional[int] = None):
        self.names = tuple(names)
        self.res, self.batch, self.dtype = res, batch, dtype
        self.timm_kwargs = dict(timm_kwargs or {})
        self.probe_res = probe_res or res
        self._timm: Dict[Tuple[str, str], torch.nn.Module] = {}
        self._fastops: Dict[Tuple[str, str], torch.nn.Module] = {}
        self._counts: Dict[Tuple[str, bool], Tuple[float, int, int]] = {}

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    # Models, built once per (name, layout) and shared by the providers ----------------------------

    def timm_model(self, name: str, layout: str) -> torch.nn.Module:
        key = (name, layout)
        if key not in self._timm:
            torch.manual_seed(0)
            m = timm.create_model(name, pretrained=False, **self.timm_kwargs).eval()
            self._timm[key] = m.to(device=bench_device(), dtype=self.dtype, memory_format=ALL_LAYOUTS[layout])
        return self._timm[key]

    def fastops_model(self, name: str, layout: str) -> torch.nn.Module:
        key = (name, layout)
        if key not in self._fastops:
            ref = self.timm_model(name, layout)
            m = fastops_models.create_model(name, fused=True)
            # timm's state_dict keys, as fastops.models promises: a mismatch is a bug in the model, not a skip.
            m.load_state_dict(ref.state_dict(), strict=True)
            self._fastops[key] = m.eval().to(device=bench_device(), dtype=self.dtype,
                                             memory_format=ALL_LAYOUTS[layout])
        return self._fastops[key]

    # Cases ---------------------------------------------------------------------------------------

    def counts(self, name: str, train: bool) -> Tuple[float, int, int]:
        """(FLOPs of one image, parameter + buffer elements, trainable parameter elements), from the timm
        model on the meta device: an eval forward, or for `train` a train-mode forward and the backward into
        the parameters."""
        key = (name, train)
        if key not in self._counts:
            from torch.utils.flop_counter import FlopCounterMode

            with torch.device("meta"):
                m = timm.create_model(name, pretrained=False, **self.timm_kwargs).train(train)
                x = torch.empty(1, 3, self.res, self.res)
                params = [p for p in m.parameters() if p.requires_grad]
                with FlopCounterMode(display=False) as fc:
                    if train:
                        y = m(x)
                        torch.autograd.grad(y, params, torch.empty_like(y))
                    else:
                        with torch.no_grad():
                            m(x)
            self._counts[key] = (fc.get_total_flops(),
                                 sum(p.numel() for p in m.parameters()) + sum(b.numel() for b in m.buffers()),
                                 sum(p.numel() for p in params))
        return self._counts[key]

    def case(self, name: str, layout: str, mode: str = "fwd", marks: Sequence = (pytest.mark.slow,)) -> Case:
        train = mode == "fwd+bwd"
        flops1, n_state, n_train = self.counts(name, train)
        esz = torch.finfo(self.dtype).bits // 8
        B, R = self.batch, self.res
        # FLOPs: FlopCounterMode's count (convolutions, matmuls and attention, 2 per multiply-add; norms,
        # activations, pooling and elementwise work not counted), per image times the batch. Fewest bytes: the
        # weights and buffers read once, the images read and the logits written; a training step also writes
        # every parameter's gradient and reads the logits' gradient. The activations between layers are left
        # out (they are far more, but a floor is what the harness asks for), so these cases read as
        # compute-bound.
        flops = B * flops1
        nbytes = esz * (n_state + B * 3 * R * R + B * NUM_CLASSES)
        if train:
            nbytes += esz * (n_train + B * NUM_CLASSES)
        fmt = ALL_LAYOUTS[layout]
        dtype = self.dtype

        def make_inputs(device):
            return (torch.randn(B, 3, R, R, device=device, dtype=dtype).contiguous(memory_format=fmt),)

        providers: Dict[str, Provider] = {"eager": TimmModel(self, name, layout, False, train),
                                          "compile": TimmModel(self, name, layout, True, train)}
        for b in FUSED_BACKENDS:
            providers[b] = FastopsModel(self, name, layout, b, train)
        return Case(op=OP, name=f"model.{name}-b{B}h{R}", layout=layout, mode=mode, flops=flops, bytes=nbytes,
                    make_inputs=make_inputs, providers=providers, grad_params=train, min_rounds=MODEL_ROUNDS,
                    marks=list(marks),
                    meta={"model": name, "batch": B, "res": R, "dtype": self.dtype_name, "eval": not train})


class TimmModel(Provider):
    """timm's model, eager or torch.compile'd (compiled once per case, at its first call, untimed)."""

    def __init__(self, bench: ModelBench, name: str, layout: str, compiled: bool, train: bool = False):
        super().__init__(None)
        self.bench, self.name, self.layout, self.compiled, self.train = bench, name, layout, compiled, train

    def build(self):
        m = self.bench.timm_model(self.name, self.layout).train(self.train)
        if not self.compiled:
            return m
        torch._dynamo.reset()  # as roofline.Compiled: a fresh cache per case
        return torch.compile(m, dynamic=False)


class FastopsModel(Provider):
    """fastops.models.create_model(name) with one fastops backend forced around the whole measurement."""

    def __init__(self, bench: ModelBench, name: str, layout: str, backend: str, train: bool = False):
        super().__init__(None)
        self.bench, self.name, self.layout, self.backend, self.train = bench, name, layout, backend, train

    def why_not(self, device, inputs=None):
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
        r = self.bench.probe_res
        x = torch.randn(1, 3, r, r, device=device, dtype=self.bench.dtype).contiguous(
            memory_format=ALL_LAYOUTS[self.layout])
        try:
            with fastops.use_backend(self.backend), torch.no_grad():
                self.bench.fastops_model(self.name, self.layout).train(self.train)(x)
        except backends.BackendUnavailable as e:
            return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        return None

    def context(self):
        return fastops.use_backend(self.backend)

    def build(self):
        return self.bench.fastops_model(self.name, self.layout).train(self.train)


def best_timm_summary(results, models: Sequence[str], title: str, accept: Mapping[str, float],
                      layouts: Sequence[str], width: int = 12, batch: Optional[int] = None) -> List[str]:
    """The summary lines of a model file: per layout, each provider's eval-forward time for each of `models`,
    every fastops provider's speed against the better of timm eager / timm compiled, and a PASS / FAIL line
    per model in `accept` ({name: bar}). Other model files share the op name "model" (and may time the same
    model): only the given models' ``fwd`` results count, and only those at `batch` when it is given."""
    mine = [r for r in results if r.op == OP and r.meta.get("model") in models and r.mode == "fwd"
            and (batch is None or r.meta.get("batch") == batch)]
    if not mine:
        return []
    t = {(r.meta["model"], r.layout, r.provider): r.time_s for r in mine}

    def best_timm(m, layout):
        base = [t[k] for k in ((m, layout, "eager"), (m, layout, "compile")) if k in t]
        return min(base) if base else None

    lines = [f"{title}: each provider's time; fastops against the better of timm eager / timm compiled"]
    for layout in layouts:
        provs = [p for p in ("eager", "compile") + FUSED_BACKENDS if any((m, layout, p) in t for m in models)]
        if not provs:
            continue
        lines.append(f"  {layout}: {'provider':<18} " + " ".join(f"{m:>{width}} {'×best-timm':>10}" for m in models))
        for p in provs:
            fused = p in FUSED_BACKENDS
            cells = []
            for m in models:
                tm, base = t.get((m, layout, p)), best_timm(m, layout)
                x = f"{base / tm:.2f}" if fused and tm and base else "-"
                cells.append(f"{fmt_time(tm) if tm else '-':>{width}} {x:>10}")
            label = f"{p} ({'fastops' if fused else 'timm'})"
            lines.append(f"  {'':<{len(layout)}}  {label:<18} " + " ".join(cells))
        for m, bar in accept.items():
            base = best_timm(m, layout)
            for p in FUSED_BACKENDS:
                if (m, layout, p) in t and base:
                    x = base / t[(m, layout, p)]
                    lines.append(f"  acceptance {m} {layout} {p}: ×best-timm {x:.2f} (>= {bar:.1f}: "
                                 f"{'PASS' if x >= bar else 'FAIL'})")
    if not any(r.provider in FUSED_BACKENDS for r in mine):
        lines.append("  no fastops model ran here (`python -m fastops info` says why)")
    return lines
