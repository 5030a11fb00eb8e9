"""Model-level cases: fastops' ``mobilenetv2_100``, ``resnet50`` and ``densenet121`` (fastops.models: every
conv -> BN -> activation one fastops.nn.conv_bn_act_modules call, BN folded into the conv in eval, the residual
adds of MobileNetV2 / ResNet-50 in the same call; DenseNet's pre-activations fastops.nn.bn_act_module calls)
against timm's, batch 8, 224x224, fp32, eval-mode forward (the harness runs ``fwd`` cases under
torch.no_grad), on the same weights (timm's state_dict loaded strict; the machinery is bench/models_common.py's).

Providers: ``eager`` the timm model, ``compile`` torch.compile of it, and ``cpu`` / ``cuda`` / ``triton`` the
fastops model with that backend forced (skipped with the reason where one of its ops cannot run). Layout
``nchw`` on a CPU (both layouts on CUDA; ``FASTOPS_BENCH_MODEL_LAYOUTS`` overrides).

The cases are slow (a CPU forward takes up to a second or two, compiling a model minutes) and carry the
``slow`` marker; ``-k model.mobilenetv2_100`` / ``-k model.densenet121`` select one model (``-k model.resnet50``
also selects bench/test_models_se.py's resnet50 cases). The summary compares each fastops model with the
better of timm eager and timm compiled (acceptance: mobilenetv2_100 >= 1.2x, resnet50 >= 1.1x; densenet121 is
reported without a target). mobilenetv2_100 and resnet50 are also timmed at batch 1 (``-b1h224``), without a
target.
"""
import torch

from models_common import ModelBench, best_timm_summary, model_layouts
from roofline import add_summary, parametrize

MODELS = ("mobilenetv2_100", "resnet50", "densenet121")  # fastops.models names; timm's are the same
BATCH = 8
RES = 224
DTYPE = torch.float32
ACCEPT_X_BEST_TIMM = {"mobilenetv2_100": 1.2, "resnet50": 1.1}

LAYOUTS = model_layouts()
# probe_res 64: every one of these models takes any size down to 32x32.
BENCH = ModelBench(MODELS, res=RES, batch=BATCH, dtype=DTYPE, probe_res=64)

# Batch 1 (serving one image at a time): no target, reported beside the batch-8 acceptance. Here the
# weights are a larger share of each convolution's traffic than the activations.
SERVE_MODELS = ("mobilenetv2_100", "resnet50")
SERVE = ModelBench(SERVE_MODELS, res=RES, batch=1, dtype=DTYPE, probe_res=64)

CASES = ([BENCH.case(name, layout) for name in MODELS for layout in LAYOUTS]
         + [SERVE.case(name, layout) for name in SERVE_MODELS for layout in LAYOUTS])


@parametrize(CASES)
def test_models_convbn(time_case, case, provider):
    time_case(case, provider)


@add_summary
def _summary(results, machine):
    return (best_timm_summary(results, MODELS, f"conv-bn summary (batch {BATCH}, {RES}x{RES}, fp32, eval forward)",
                              ACCEPT_X_BEST_TIMM, LAYOUTS, width=15, batch=BATCH)
            + best_timm_summary(results, SERVE_MODELS, f"conv-bn summary (batch 1, {RES}x{RES}, fp32, eval forward)",
                                {}, LAYOUTS, width=15, batch=1))
