"""Convolution with a bias + residual + activation epilogue, and conv -> BatchNorm -> activation, in plain
PyTorch: what ``nn.Conv2d`` -> ``nn.BatchNorm2d`` -> activation (+ residual before the activation) computes."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .bn_act import BN_ACTS, bn_act


def conv_bn_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], bn_weight: Optional[torch.Tensor],
                bn_bias: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], eps: float = 1e-5, stride=1, padding=0, dilation=1,
                groups: int = 1, act: str = "relu", residual: Optional[torch.Tensor] = None, training: bool = False,
                momentum: float = 0.1) -> torch.Tensor:
    """``act(BN(conv2d(x)) + residual)`` with ``F.conv2d`` and ``F.batch_norm`` (padding: int, pair, "same",
    "valid", or [top, left, bottom, right])."""
    if isinstance(padding, Sequence) and not isinstance(padding, str) and len(padding) == 4:
        top, left, bottom, right = padding
        if (top, left) != (bottom, right):
            x = F.pad(x, (left, right, top, bottom))
            padding = 0
        else:
            padding = (top, left)
    y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    return bn_act(y, bn_weight, bn_bias, running_mean, running_var, eps, act, residual, training, momentum)


def conv_bias_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  residual: Optional[torch.Tensor], stride: Sequence[int], padding: Sequence[int],
                  dilation: Sequence[int], groups: int, act: str) -> torch.Tensor:
    """The kernel op ``fastops::conv_bias_act``: ``act(conv2d(x, weight) + bias + residual)``, padding
    [top, left, bottom, right]; bias and residual added in fp32 (fp64 for fp64 x), rounded once at the end."""
    top, left, bottom, right = padding
    xp = F.pad(x, (left, right, top, bottom)) if (top, left) != (bottom, right) else x
    pad = 0 if (top, left) != (bottom, right) else (top, left)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = F.conv2d(xp, weight, None, stride, pad, dilation, groups).to(acc)
    if bias is not None:
        y = y + bias.to(acc).view(1, -1, 1, 1)
    if residual is not None:
        y = y + residual.to(acc)
    return BN_ACTS[act](y).to(x.dtype)
