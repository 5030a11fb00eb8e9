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


def batch_norm(x: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
               weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], training: bool, momentum: float,
               eps: float) -> torch.Tensor:
    """``F.batch_norm`` with the per-channel tensors in the dtype the kernels compute in (fp64 for fp64 x, else
    fp32): the ops take them in any floating dtype, F.batch_norm only in x's (or fp32 for half / bf16 x).
    Running stats of another dtype are updated through a copy, written back."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight, bias = (None if t is None else t.to(acc) for t in (weight, bias))
    rm, rv = (None if t is None else t.to(acc) for t in (running_mean, running_var))
    y = F.batch_norm(x, rm, rv, weight, bias, training, momentum, eps)
    if training:
        with torch.no_grad():
            for given, used in ((running_mean, rm), (running_var, rv)):
                if given is not None and used is not given:
                    given.copy_(used)
    return y


def bn_act(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
           running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], eps: float = 1e-5,
           act: str = "relu", residual: Optional[torch.Tensor] = None, training: bool = False,
           momentum: float = 0.1) -> torch.Tensor:
    """``act(F.batch_norm(x, ...) + residual)``; in training mode the running statistics (when given) are
    updated in place by ``F.batch_norm``."""
    y = batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    return BN_ACTS[act](y)
