import torch.nn.functional as F

from .._layout import memory_format_of
from ._acts import ACTS, GATES, OUT_ACTS


def squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act="relu", gate="sigmoid", residual=None,
                   out_act="none"):
    """timm's SEModule (+ SE-ResNet's residual add and activation), step by step.

    fc1_weight (R, C), fc2_weight (C, R) (1x1 conv weights flattened); out in x's layout."""
    s = x.mean((2, 3))                                   # (N, C)
    h = ACTS[act](F.linear(s, fc1_weight, fc1_bias))     # (N, R)
    g = GATES[gate](F.linear(h, fc2_weight, fc2_bias))   # (N, C)
    y = x * g[:, :, None, None]
    if residual is not None:
        y = y + residual
    return OUT_ACTS[out_act](y).contiguous(memory_format=memory_format_of(x))
