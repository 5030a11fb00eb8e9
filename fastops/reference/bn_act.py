"""BatchNorm (+ residual) + activation in plain PyTorch: ``nn.BatchNorm2d`` then the activation, with an
optional residual added before it."""
from typing import Optional

import torch
import torch.nn.functional as F

# The activations the conv / BN ops take by name (timm's names; "gelu" is the exact erf GELU).
BN_ACTS = {
    "none": lambda z: z,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "gelu": F.gelu,
    "hardswish": F.hardswish,
}


def bn_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float = 1e-5,
           act: str = "relu", residual: Optional[torch.Tensor] = None, training: bool = False,
           momentum: float = 0.1) -> torch.Tensor:
    """``act(F.batch_norm(x, ...) + residual)``; in training mode the running statistics (when given) are
    updated in place by ``F.batch_norm``."""
    y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return BN_ACTS[act](y)
