"""Swin Transformer with timm's model names and state_dict keys, on the fastops window-attention op.

The layout follows ``timm.models.swin_transformer`` (timm 1.x: the patch-merging downsample sits at the
start of stages 1..3, features flow NHWC), so ``model.load_state_dict(timm.create_model(name).state_dict())``
works with ``strict=True``.

* ``fused=True``: every block's attention is :func:`fastops.window_attention` (roll, pad, partition and
  mask inside the op; see :class:`fastops.nn.WindowAttention`).
* ``fused=False``: the same modules (same keys) computed with :func:`fastops.reference.window_attention`,
  timm's step-by-step computation; no fastops kernel is called.

Patch embedding, LayerNorm, Linear, GELU and the head are plain PyTorch. timm is not imported here.
"""
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastops.nn import SwinTransformerBlock
from fastops.nn.layers import linear_act

from . import register_model

__all__ = ["SwinTransformer", "SwinTransformerStage", "PatchEmbed", "PatchMerging"]


def _two(v) -> Tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(int(i) for i in v)


def _per_stage(v, n):
    """timm's ``to_ntuple``: a scalar repeated, a sequence kept."""
    return tuple(v) if isinstance(v, (list, tuple)) else (v,) * n


def _stage_windows(window_size, n) -> Tuple[Tuple[int, int], ...]:
    """One (h, w) window per stage from an int, an (h, w) pair, or one int / pair per stage (timm's
    rule: a sequence of two ints is one (h, w) for every stage)."""
    if not isinstance(window_size, (list, tuple)):
        window_size = (window_size,) * n
    elif len(window_size) == 2 and not isinstance(window_size[0], (list, tuple)):
        window_size = (tuple(window_size),) * n
    if len(window_size) != n:
        raise ValueError(f"fastops.models SwinTransformer: window_size needs one entry per stage ({n}), "
                         f"got {window_size!r}")
    windows = tuple(_two(w) for w in window_size)
    if any(w < 1 for ws in windows for w in ws):
        raise ValueError(f"fastops.models SwinTransformer: window sizes must be positive, got {windows}")
    return windows


class PatchEmbed(nn.Module):
    """Non-overlapping patch conv, NHWC out, then LayerNorm (timm ``PatchEmbed(output_fmt='NHWC')``).
    Keys: ``proj`` (Conv2d), ``norm``."""

    def __init__(self, img_size, patch_size, in_chans, embed_dim, strict_img_size=True):
        super().__init__()
        self.img_size = _two(img_size)
        self.patch_size = _two(patch_size)
        self.grid_size = tuple(s // p for s, p in zip(self.img_size, self.patch_size))
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[-2:]
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(f"fastops.models SwinTransformer: input size {(H, W)} does not match img_size "
                             f"{self.img_size} (pass strict_img_size=False for other sizes)")
        if H % self.patch_size[0] or W % self.patch_size[1]:
            raise ValueError(f"fastops.models SwinTransformer: input size {(H, W)} must be a multiple of the "
                             f"patch size {self.patch_size}")
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> one token: concatenate (top-left, bottom-left, top-right, bottom-right) channels
    (zero-padding odd H / W), LayerNorm(4C), Linear(4C -> out_dim, no bias). Keys: ``norm``, ``reduction``.
    ``fused`` runs the Linear through :func:`fastops.nn.layers.linear_act`."""

    def __init__(self, dim, out_dim=None, fused=False):
        super().__init__()
        self.dim = dim
        self.fused = fused
        self.out_dim = out_dim or 2 * dim
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, self.out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1:3]
        if H % 2 or W % 2:
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        x = self.norm(x)
        return linear_act(x, self.reduction) if self.fused else self.reduction(x)


class SwinTransformerStage(nn.Module):
    """Optional :class:`PatchMerging` (``downsample``; ``nn.Identity`` in stage 0) then ``depth`` blocks,
    every odd one shifted by half the window. Keys: ``downsample.{norm, reduction}``, ``blocks.{j}.*``."""

    def __init__(self, dim, out_dim, input_resolution, depth, downsample, num_heads, head_dim, window_size,
                 always_partition, dynamic_mask, mlp_ratio, qkv_bias, proj_drop, attn_drop, drop_path, fused):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.output_resolution = tuple((r + 1) // 2 for r in input_resolution) if downsample else input_resolution
        self.depth = depth
        if downsample:
            self.downsample = PatchMerging(dim, out_dim, fused=fused)
        else:
            if dim != out_dim:
                raise ValueError(f"fastops.models SwinTransformer: stage without downsample needs dim == out_dim, "
                                 f"got {dim} and {out_dim}")
            self.downsample = nn.Identity()
        shift = tuple(w // 2 for w in window_size)
        self.blocks = nn.Sequential(*[
            SwinTransformerBlock(out_dim, self.output_resolution, num_heads=num_heads, head_dim=head_dim,
                                 window_size=window_size, shift_size=0 if j % 2 == 0 else shift,
                                 always_partition=always_partition, dynamic_mask=dynamic_mask, mlp_ratio=mlp_ratio,
                                 qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop,
                                 drop_path=drop_path[j], fused=fused)
            for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class _Head(nn.Module):
    """Global average pool over H, W of the NHWC map, dropout, ``fc`` (timm ``ClassifierHead``, key ``fc``)."""

    def __init__(self, in_features, num_classes, drop_rate):
        super().__init__()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(x.mean((1, 2)))
        return x if pre_logits else self.fc(x)


class SwinTransformer(nn.Module):
    """timm's ``SwinTransformer``: patch embedding (NHWC), four stages of (shifted-)window attention blocks
    with patch merging between them, final LayerNorm, average pool, ``head.fc``. Same state_dict keys as
    timm's model of the same name and arguments.

    Args (timm's names and defaults):
        img_size, patch_size, in_chans, num_classes (0: ``head.fc`` is Identity), global_pool (``"avg"``),
        embed_dim (int, doubled per stage, or one per stage), depths, num_heads, head_dim, window_size (int,
        (h, w), or one per stage), always_partition, strict_img_size (False: any input whose sides are
        patch multiples; the stage windows and shifts stay those computed for ``img_size``, as in timm),
        dynamic_img_size (= not strict_img_size), mlp_ratio, qkv_bias, drop_rate (before ``head.fc``),
        proj_drop_rate, attn_drop_rate (must be 0), drop_path_rate (stochastic depth, linear over all blocks).
        fused: window attention via :func:`fastops.window_attention` (True) or the reference (False).

    Not provided: timm's ``set_input_size`` (it resamples the bias tables; resize timm's model, then load
    or convert it), ``forward_intermediates`` / feature extraction and gradient checkpointing.
    """

    def __init__(self, img_size=224, patch_size=4, in_chans=3, num_classes=1000, global_pool="avg", embed_dim=96,
                 depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), head_dim=None, window_size=7, always_partition=False,
                 strict_img_size=True, dynamic_img_size=False, mlp_ratio=4.0, qkv_bias=True, drop_rate=0.0,
                 proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.1, fused=True):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"fastops.models SwinTransformer: global_pool must be 'avg', got {global_pool!r}")
        if attn_drop_rate:
            raise ValueError(f"fastops.models SwinTransformer: attn_drop_rate must be 0 (the fused op has no "
                             f"attention dropout), got {attn_drop_rate!r}")
        if dynamic_img_size:
            strict_img_size = False
        n = len(depths)
        if len(_per_stage(num_heads, n)) != n:
            raise ValueError(f"fastops.models SwinTransformer: num_heads needs one entry per stage ({n}), "
                             f"got {num_heads!r}")
        self.fused = bool(fused)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.output_fmt = "NHWC"
        self.dynamic_img_size = not strict_img_size
        self.num_layers = n
        dims = [int(d) for d in embed_dim] if isinstance(embed_dim, (list, tuple)) \
            else [int(embed_dim * 2 ** i) for i in range(n)]
        self.embed_dim = embed_dim
        self.num_features = self.head_hidden_size = dims[-1]

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, dims[0], strict_img_size=strict_img_size)
        grid = self.patch_embed.grid_size
        windows = _stage_windows(window_size, n)
        heads = _per_stage(num_heads, n)
        head_dims = _per_stage(head_dim, n)
        mlp_ratios = _per_stage(mlp_ratio, n)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        layers, start, in_dim, scale = [], 0, dims[0], 1
        for i in range(n):
            layers.append(SwinTransformerStage(
                in_dim, dims[i], ((grid[0] + scale - 1) // scale, (grid[1] + scale - 1) // scale), depths[i],
                downsample=i > 0, num_heads=heads[i], head_dim=head_dims[i], window_size=windows[i],
                always_partition=always_partition, dynamic_mask=not strict_img_size, mlp_ratio=mlp_ratios[i],
                qkv_bias=qkv_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                drop_path=rates[start:start + depths[i]], fused=fused))
            start += depths[i]
            in_dim = dims[i]
            if i > 0:
                scale *= 2
        self.layers = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = _Head(self.num_features, num_classes, drop_rate)
        self._init_weights()

    def _init_weights(self):
        """timm's default ViT-style init: truncated-normal (std 0.02) Linear weights, zero Linear biases."""
        for m in self.modules():
            if isinstance(m, nn.Linear) and m.weight.device.type != "meta":
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        """Parameter names to train without weight decay (the relative position bias tables), as timm."""
        return {n for n, _ in self.named_parameters() if "relative_position_bias_table" in n}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, H / 32, W / 32, num_features), NHWC as timm."""
        return self.norm(self.layers(self.patch_embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


_KWARGS = {"img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depths", "num_heads",
           "head_dim", "window_size", "always_partition", "strict_img_size", "dynamic_img_size", "mlp_ratio",
           "qkv_bias", "drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"}


def _create(defaults, fused, pretrained=False, **kwargs) -> SwinTransformer:
    if pretrained:
        raise ValueError("fastops.models: pretrained=True is not supported; load a checkpoint (e.g. timm's "
                         "state_dict) with model.load_state_dict")
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise TypeError(f"fastops.models SwinTransformer: unsupported arguments {unknown}; "
                        f"supported: {sorted(_KWARGS)}")
    return SwinTransformer(fused=fused, **dict(defaults, **kwargs))


@register_model
def swin_tiny_patch4_window7_224(fused=True, **kwargs) -> SwinTransformer:
    """Swin-T @ 224 (timm ``swin_tiny_patch4_window7_224``)."""
    return _create(dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
                   fused, **kwargs)


@register_model
def swin_small_patch4_window7_224(fused=True, **kwargs) -> SwinTransformer:
    """Swin-S @ 224 (timm ``swin_small_patch4_window7_224``)."""
    return _create(dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
                   fused, **kwargs)


@register_model
def swin_base_patch4_window7_224(fused=True, **kwargs) -> SwinTransformer:
    """Swin-B @ 224 (timm ``swin_base_patch4_window7_224``)."""
    return _create(dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
                   fused, **kwargs)


@register_model
def swin_base_patch4_window12_384(fused=True, **kwargs) -> SwinTransformer:
    """Swin-B @ 384, window 12 (timm ``swin_base_patch4_window12_384``)."""
    return _create(dict(img_size=384, patch_size=4, window_size=12, embed_dim=128, depths=(2, 2, 18, 2),
                        num_heads=(4, 8, 16, 32)), fused, **kwargs)


@register_model
def swin_large_patch4_window7_224(fused=True, **kwargs) -> SwinTransformer:
    """Swin-L @ 224 (timm ``swin_large_patch4_window7_224``)."""
    return _create(dict(patch_size=4, window_size=7, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
                   fused, **kwargs)


@register_model
def swin_large_patch4_window12_384(fused=True, **kwargs) -> SwinTransformer:
    """Swin-L @ 384, window 12 (timm ``swin_large_patch4_window12_384``)."""
    return _create(dict(img_size=384, patch_size=4, window_size=12, embed_dim=192, depths=(2, 2, 18, 2),
                        num_heads=(6, 12, 24, 48)), fused, **kwargs)
