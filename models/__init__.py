"""fastops.models: model definitions (timm names and state_dict keys) that call fastops ops.

``create_model(name, fused=True, **kwargs)`` builds a registered model; ``fused=False`` runs the
reference ops. Models register themselves with :func:`register_model`.
"""
from typing import Callable, Dict, List

import torch

_MODELS: Dict[str, Callable] = {}


def register_model(fn: Callable) -> Callable:
    _MODELS[fn.__name__] = fn
    return fn


def channels_last_input(x: torch.Tensor) -> torch.Tensor:
    """The image batch in channels_last, the layout the fused conv models run in.

    oneDNN's and cuDNN's convolutions work on NHWC natively (an NCHW input is reordered on every call) and the
    fastops depthwise / bn_act / attention kernels read both layouts, so the fused models convert the input
    once at the stem; the logits are the same, only the strides of ``forward_features``' map differ.
    """
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def list_models() -> List[str]:
    return sorted(_MODELS)


def create_model(name: str, fused: bool = True, **kwargs):
    if name not in _MODELS:
        raise ValueError(f"fastops.models.create_model: unknown model {name!r}; available: {list_models()}")
    return _MODELS[name](fused=fused, **kwargs)


from . import resnet  # noqa: E402,F401  (registers the ResNet family)
from . import swin  # noqa: E402,F401  (registers the Swin Transformer family)
from . import pvt_v2  # noqa: E402,F401  (registers the PVTv2 family)
from . import mobilenetv2  # noqa: E402,F401  (registers the MobileNetV2 family)
from . import densenet  # noqa: E402,F401  (registers the DenseNet family)
