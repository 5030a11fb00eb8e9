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


def conv1x1_squeeze_excite(x, weight, bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act="relu",
                           gate="sigmoid", residual=None, out_act="none"):
    """:func:`squeeze_excite` of ``conv2d(x, weight, bias)`` (a 1x1 convolution, weight (C, C_in, 1, 1)).

    bias may be fp32 next to a half x (a folded BatchNorm's); the convolution adds it in fp32, rounding once."""
    y = F.conv2d(x, weight)
    if bias is not None:
        y = (y.to(bias.dtype) + bias[:, None, None]).to(x.dtype)
    return squeeze_excite(y, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act)
