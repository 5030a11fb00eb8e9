"""PVT spatial-reduction attention in plain PyTorch, as timm's ``pvt_v2.Attention`` runs it between its
q / kv Linear layers and ``proj``: reshape + permute into heads, softmax attention, transpose back."""
from typing import Optional

import torch


def sr_attention(q: torch.Tensor, kv: torch.Tensor, num_heads: int, scale: Optional[float] = None) -> torch.Tensor:
    B, N, C = q.shape
    hd = C // num_heads
    scale = hd ** -0.5 if scale is None else scale
    qh = q.reshape(B, N, num_heads, hd).permute(0, 2, 1, 3)
    k, v = kv.reshape(B, -1, 2, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)
    attn = ((qh * scale) @ k.transpose(-2, -1)).softmax(dim=-1)
    return (attn @ v).transpose(1, 2).reshape(B, N, C)
