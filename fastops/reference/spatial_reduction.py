"""PVT's spatial reduction in plain PyTorch, as timm's ``pvt_v2.Attention`` computes the tokens it feeds to
``kv``: tokens -> map, strided Conv2d (or AdaptiveAvgPool2d(7) + 1x1 Conv2d in linear mode), back to tokens,
LayerNorm (+ GELU in linear mode)."""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

POOL_SIZE = 7


def spatial_reduction(x: torch.Tensor, feat_size: Sequence[int], weight: torch.Tensor, bias: Optional[torch.Tensor],
                      norm_weight: torch.Tensor, norm_bias: torch.Tensor, sr_ratio: int, linear: bool = False,
                      eps: float = 1e-5) -> torch.Tensor:
    B, N, C = x.shape
    H, W = feat_size
    m = x.permute(0, 2, 1).reshape(B, C, H, W)
    if linear:
        m = F.conv2d(F.adaptive_avg_pool2d(m, POOL_SIZE), weight, bias)
    else:
        m = F.conv2d(m, weight, bias, stride=sr_ratio)
    y = m.reshape(B, weight.shape[0], -1).permute(0, 2, 1)
    y = F.layer_norm(y, (y.shape[-1],), norm_weight, norm_bias, eps)
    return F.gelu(y) if linear else y
