"""Swin (shifted-)window attention in plain PyTorch, step by step as timm's ``SwinTransformerBlock._attn``
and ``WindowAttention`` run it (roll -> pad -> partition -> attention -> reverse -> crop -> roll back),
but starting from the qkv of the whole map instead of the normalised tokens."""
from typing import Optional, Tuple

import torch


def shift_region_mask(hp: int, wp: int, window: Tuple[int, int], shift: Tuple[int, int], device=None) -> torch.Tensor:
    """timm's SW-MSA mask over the padded (hp, wp) grid: (nW, N, N), 0 inside a region, -100 across."""
    wh, ww = window
    sh, sw = shift
    img = torch.zeros(hp, wp, device=device)
    cnt = 0
    for hs in (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)):
        for ws in (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)):
            img[hs, ws] = cnt
            cnt += 1
    ids = img.view(hp // wh, wh, wp // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    diff = ids.unsqueeze(1) - ids.unsqueeze(2)
    return torch.where(diff != 0, -100.0, 0.0)


def window_attention(qkv: torch.Tensor, num_heads: int, window_size: Tuple[int, int],
                     shift_size: Tuple[int, int] = (0, 0), rel_pos_bias: Optional[torch.Tensor] = None,
                     scale: Optional[float] = None, pad_qkv: Optional[torch.Tensor] = None) -> torch.Tensor:
    B, H, W, C3 = qkv.shape
    C = C3 // 3
    hd = C // num_heads
    wh, ww = window_size
    sh, sw = shift_size
    scale = hd ** -0.5 if scale is None else scale
    shifted = sh > 0 or sw > 0
    x = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2)) if shifted else qkv
    pad_h, pad_w = (wh - H % wh) % wh, (ww - W % ww) % ww
    fill = qkv.new_zeros(C3) if pad_qkv is None else pad_qkv.to(qkv.dtype)
    if pad_h:
        x = torch.cat([x, fill.expand(B, pad_h, W, C3)], dim=1)
    if pad_w:
        x = torch.cat([x, fill.expand(B, H + pad_h, pad_w, C3)], dim=2)
    hp, wp = H + pad_h, W + pad_w
    n = wh * ww
    win = x.view(B, hp // wh, wh, wp // ww, ww, C3).permute(0, 1, 3, 2, 4, 5).reshape(-1, n, C3)
    q, k, v = win.reshape(-1, n, 3, num_heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B*nW, heads, N, hd)
    attn = (q * scale) @ k.transpose(-2, -1)
    if rel_pos_bias is not None:
        attn = attn + rel_pos_bias.unsqueeze(0)
    if shifted:
        mask = shift_region_mask(hp, wp, window_size, shift_size, qkv.device).to(attn.dtype)
        nw = mask.shape[0]
        attn = (attn.view(-1, nw, num_heads, n, n) + mask.unsqueeze(1).unsqueeze(0)).view(-1, num_heads, n, n)
    # A bias of another dtype (e.g. an fp32 table with fp16 qkv) promotes the scores; the probabilities then
    # meet v in v's dtype, as in timm's path under autocast. A no-op when the dtypes agree.
    attn = attn.softmax(dim=-1).to(v.dtype)
    o = (attn @ v).transpose(1, 2).reshape(-1, n, C)
    o = o.view(B, hp // wh, wp // ww, wh, ww, C).permute(0, 1, 3, 2, 4, 5).reshape(B, hp, wp, C)
    o = o[:, :H, :W, :]
    if shifted:
        o = torch.roll(o, shifts=(sh, sw), dims=(1, 2))
    return o.contiguous()
