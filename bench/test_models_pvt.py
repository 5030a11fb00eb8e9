"""Model-level cases: fastops' ``pvt_v2_b0`` and ``pvt_v2_b2`` (fastops.models: every block's reduction one
fastops.spatial_reduction call, its attention one fastops.sr_attention call, its MLP's depthwise conv + GELU one
fastops.conv_bias_act call on the tokens in place) against timm's, batch 8, 224x224, fp32, eval-mode forward
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

from models_common import ModelBench, best_timm_summary, model_layouts
from roofline import add_summary, parametrize

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
    return best_timm_summary(results, MODELS, f"pvt summary (batch {BATCH}, {RES}x{RES}, fp32, eval forward)",
                             ACCEPT_X_BEST_TIMM, LAYOUTS, width=12)
