import torch
import torch.nn.functional as F

from .._layout import memory_format_of
from ._acts import ACTS, GATES
from .bn_act import batch_norm


def cbam(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias, bn_mean, bn_var,
         eps=1e-5, training=False, momentum=0.1, act="relu", gate="sigmoid"):
    """timm's CbamModule (ChannelAttn then SpatialAttn), step by step.

    fc1_weight (R, C), fc2_weight (C, R); conv_weight (1, 2, k, k), padding k // 2, no bias; bn_* (1,).
    In training mode bn_mean / bn_var (running stats) are updated in place, as F.batch_norm does."""
    def mlp(p):
        return F.linear(ACTS[act](F.linear(p, fc1_weight, fc1_bias)), fc2_weight, fc2_bias)

    ca = GATES[gate](mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))    # (N, C)
    x1 = x * ca[:, :, None, None]
    s = torch.cat([x1.mean(1, keepdim=True), x1.amax(1, keepdim=True)], 1)   # (N, 2, H, W)
    u = F.conv2d(s, conv_weight, None, 1, conv_weight.shape[-1] // 2)
    v = batch_norm(u, bn_mean, bn_var, bn_weight, bn_bias, training, momentum, eps)
    return (x1 * GATES[gate](v)).contiguous(memory_format=memory_format_of(x))
