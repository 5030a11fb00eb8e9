"""Pyramid Vision Transformer v2 with timm's model names and state_dict keys, on the fastops PVT ops.

The layout follows ``timm.models.pvt_v2`` (timm 1.x: an overlapping patch embedding, four stages whose
stages 1..3 start with an overlapping strided-conv ``downsample``, tokens (B, N, C) inside a stage, NCHW
between stages), so ``model.load_state_dict(timm.create_model(name).state_dict())`` works with
``strict=True``.

* ``fused=True``: every block's attention is :func:`fastops.spatial_reduction` (where the stage reduces) and
  :func:`fastops.sr_attention`, every MLP's depthwise conv :func:`fastops.depthwise_conv2d` on the tokens
  in place (see :class:`fastops.nn.SRAttention` and :class:`fastops.nn.MlpWithDepthwiseConv`).
* ``fused=False``: the same modules (same keys) computed with :func:`fastops.reference.spatial_reduction`,
  :func:`fastops.reference.sr_attention` and ``F.conv2d``, timm's step-by-step computation; no fastops
  kernel is called.

Any input size works for which every stage's map is at least its ``sr_ratio`` on each side (as in timm;
e.g. 160x224, or sizes that are not multiples of 32). Patch embeddings, LayerNorm, Linear, GELU and the
head are plain PyTorch. timm is not imported here.
"""
import math
from typing import Sequence

import torch
import torch.nn as nn

from fastops.nn import MlpWithDepthwiseConv, SRAttention
from fastops.nn.layers import DropPath, acts_as_identity

from . import register_model

__all__ = ["PyramidVisionTransformerV2", "PyramidVisionTransformerStage", "Block", "OverlapPatchEmbed"]

# timm's ``timm.layers.LayerNorm`` (the blocks' and stages' norms) defaults to eps 1e-6; the patch embeddings
# and the attention's reduction use nn.LayerNorm's 1e-5.
BLOCK_NORM_EPS = 1e-6


def _per_stage(v, n, what):
    """timm's ``to_ntuple``: a scalar repeated, a sequence kept (and checked to have one entry per stage)."""
    v = tuple(v) if isinstance(v, (list, tuple)) else (v,) * n
    if len(v) != n:
        raise ValueError(f"fastops.models PyramidVisionTransformerV2: {what} needs one entry per stage ({n}), "
                         f"got {v!r}")
    return v


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch conv (kernel ``patch_size``, padding ``patch_size // 2``, stride ``stride``), NHWC out,
    then LayerNorm. Keys: ``proj`` (Conv2d), ``norm``."""

    def __init__(self, patch_size=7, stride=4, in_chans=3, embed_dim=768):
        super().__init__()
        patch = (patch_size, patch_size) if isinstance(patch_size, int) else tuple(patch_size)
        if max(patch) <= stride:
            raise ValueError(f"fastops.models PyramidVisionTransformerV2: patch_size {patch} must be larger than "
                             f"the stride {stride}")
        self.patch_size = patch
        self.proj = nn.Conv2d(in_chans, embed_dim, patch, stride=stride, padding=(patch[0] // 2, patch[1] // 2))
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) -> (B, H', W', embed_dim)."""
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


class Block(nn.Module):
    """PVTv2 block on (B, N, dim) tokens of an (H, W) map:
    ``x + dp(attn(norm1(x), hw))`` then ``x + dp(mlp(norm2(x), hw))``.
    Keys: ``norm1``, ``attn.*`` (:class:`fastops.nn.SRAttention`), ``norm2``, ``mlp.*``
    (:class:`fastops.nn.MlpWithDepthwiseConv`, with the extra ReLU in linear mode, as timm)."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, sr_ratio=1, linear_attn=False, qkv_bias=False,
                 proj_drop=0.0, attn_drop=0.0, drop_path=0.0, fused=True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.attn = SRAttention(dim, num_heads=num_heads, sr_ratio=sr_ratio, linear_attn=linear_attn,
                                qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, fused=fused)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=BLOCK_NORM_EPS)
        self.mlp = MlpWithDepthwiseConv(dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop,
                                        extra_relu=linear_attn, fused=fused)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor, feat_size: Sequence[int]) -> torch.Tensor:
        # With the drop path an identity (eval), the shortcut goes into the attention's and the MLP's last
        # GEMM (their epilogue, when fused).
        if acts_as_identity(self.drop_path1):
            x = self.attn(self.norm1(x), feat_size, residual=x)
        else:
            x = x + self.drop_path1(self.attn(self.norm1(x), feat_size))
        if acts_as_identity(self.drop_path2):
            return self.mlp(self.norm2(x), feat_size, residual=x)
        return x + self.drop_path2(self.mlp(self.norm2(x), feat_size))


class PyramidVisionTransformerStage(nn.Module):
    """Optional :class:`OverlapPatchEmbed` (3x3, stride 2: ``downsample``, None in stage 0), ``depth`` blocks
    on the tokens, LayerNorm; NCHW out. Keys: ``downsample.{proj, norm}``, ``blocks.{j}.*``, ``norm``."""

    def __init__(self, dim, dim_out, depth, downsample=True, num_heads=8, sr_ratio=1, linear_attn=False,
                 mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0, drop_path=0.0, fused=True):
        super().__init__()
        if downsample:
            self.downsample = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=dim, embed_dim=dim_out)
        else:
            if dim != dim_out:
                raise ValueError(f"fastops.models PyramidVisionTransformerV2: a stage without downsample needs "
                                 f"dim == dim_out, got {dim} and {dim_out}")
            self.downsample = None
        rates = drop_path if isinstance(drop_path, (list, tuple)) else [drop_path] * depth
        self.blocks = nn.ModuleList([
            Block(dim_out, num_heads, mlp_ratio=mlp_ratio, sr_ratio=sr_ratio, linear_attn=linear_attn,
                  qkv_bias=qkv_bias, proj_drop=proj_drop, attn_drop=attn_drop, drop_path=rates[j], fused=fused)
            for j in range(depth)])
        self.norm = nn.LayerNorm(dim_out, eps=BLOCK_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) NCHW (stages with downsample) or (B, H, W, C) (stage 0, from the patch embedding)
        -> (B, dim_out, H', W') contiguous NCHW."""
        if self.downsample is not None:
            x = self.downsample(x)
        B, H, W, C = x.shape
        feat_size = (H, W)
        x = x.reshape(B, H * W, C)
        for blk in self.blocks:
            x = blk(x, feat_size)
        x = self.norm(x)
        return x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()


class PyramidVisionTransformerV2(nn.Module):
    """timm's ``PyramidVisionTransformerV2``: overlapping patch embedding (7x7, stride 4), four stages of
    spatial-reduction attention blocks (each stage after the first starts with a 3x3 stride-2 overlapping
    patch embedding), average pool, ``head``. Same state_dict keys as timm's model of the same name and
    arguments.

    Args (timm's names and defaults): in_chans, num_classes (0: ``head`` is Identity), global_pool
        (``"avg"`` or ``""``), depths, embed_dims, num_heads, sr_ratios, mlp_ratios (each an int / float or
        one per stage), qkv_bias, linear (the ``*_li`` variants: pooled reduction to 7x7 and an extra ReLU
        in the MLPs), drop_rate (before ``head``), proj_drop_rate, attn_drop_rate (must be 0),
        drop_path_rate (stochastic depth, linear over all blocks).
        fused: the fastops ops (True) or the reference computation (False).

    Not provided: timm's ``forward_intermediates`` / feature extraction, ``norm_layer`` choice and gradient
    checkpointing.
    """

    def __init__(self, in_chans=3, num_classes=1000, global_pool="avg", depths=(3, 4, 6, 3),
                 embed_dims=(64, 128, 256, 512), num_heads=(1, 2, 4, 8), sr_ratios=(8, 4, 2, 1),
                 mlp_ratios=(8.0, 8.0, 4.0, 4.0), qkv_bias=True, linear=False, drop_rate=0.0, proj_drop_rate=0.0,
                 attn_drop_rate=0.0, drop_path_rate=0.0, fused=True):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"fastops.models PyramidVisionTransformerV2: global_pool must be 'avg' or '', "
                             f"got {global_pool!r}")
        if attn_drop_rate:
            raise ValueError(f"fastops.models PyramidVisionTransformerV2: attn_drop_rate must be 0 (the fused op "
                             f"has no attention dropout), got {attn_drop_rate!r}")
        n = len(depths)
        embed_dims = _per_stage(embed_dims, n, "embed_dims")
        num_heads = _per_stage(num_heads, n, "num_heads")
        sr_ratios = _per_stage(sr_ratios, n, "sr_ratios")
        mlp_ratios = _per_stage(mlp_ratios, n, "mlp_ratios")
        self.fused = bool(fused)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.depths = tuple(depths)
        self.linear = bool(linear)

        self.patch_embed = OverlapPatchEmbed(patch_size=7, stride=4, in_chans=in_chans, embed_dim=embed_dims[0])
        # timm's calculate_drop_path_rates(stagewise=True): linear over all blocks, split per stage.
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, start, prev = [], 0, embed_dims[0]
        for i in range(n):
            stages.append(PyramidVisionTransformerStage(
                prev, embed_dims[i], depths[i], downsample=i > 0, num_heads=num_heads[i], sr_ratio=sr_ratios[i],
                linear_attn=linear, mlp_ratio=mlp_ratios[i], qkv_bias=qkv_bias, proj_drop=proj_drop_rate,
                attn_drop=attn_drop_rate, drop_path=rates[start:start + depths[i]], fused=fused))
            start += depths[i]
            prev = embed_dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        """timm's init: truncated-normal (std 0.02) Linear weights, zero biases; convs normal with
        std sqrt(2 / fan_out)."""
        weight = getattr(m, "weight", None)
        if weight is None or weight.device.type == "meta":
            return
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self):
        return set()

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool=None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"fastops.models PyramidVisionTransformerV2: global_pool must be 'avg' or '', "
                                 f"got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        p = next(self.parameters())
        self.head = (nn.Linear(self.num_features, num_classes, device=p.device, dtype=p.dtype)
                     if num_classes > 0 else nn.Identity())
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_features, H', W') NCHW (H' = H / 32 for multiples of 32)."""
        return self.stages(self.patch_embed(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool:
            x = x.mean(dim=(-1, -2))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


_KWARGS = {"in_chans", "num_classes", "global_pool", "depths", "embed_dims", "num_heads", "sr_ratios", "mlp_ratios",
           "qkv_bias", "linear", "drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate"}


def _create(defaults, fused, pretrained=False, **kwargs) -> PyramidVisionTransformerV2:
    if pretrained:
        raise ValueError("fastops.models: pretrained=True is not supported; load a checkpoint (e.g. timm's "
                         "state_dict) with model.load_state_dict")
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise TypeError(f"fastops.models PyramidVisionTransformerV2: unsupported arguments {unknown}; "
                        f"supported: {sorted(_KWARGS)}")
    return PyramidVisionTransformerV2(fused=fused, **dict(defaults, **kwargs))


_B1_DIMS = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))


@register_model
def pvt_v2_b0(fused=True, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B0 (timm ``pvt_v2_b0``)."""
    return _create(dict(depths=(2, 2, 2, 2), embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8)), fused, **kwargs)


@register_model
def pvt_v2_b1(fused=True, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B1 (timm ``pvt_v2_b1``)."""
    return _create(dict(depths=(2, 2, 2, 2), **_B1_DIMS), fused, **kwargs)


@register_model
def pvt_v2_b2(fused=True, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B2 (timm ``pvt_v2_b2``)."""
    return _create(dict(depths=(3, 4, 6, 3), **_B1_DIMS), fused, **kwargs)


@register_model
def pvt_v2_b3(fused=True, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B3 (timm ``pvt_v2_b3``)."""
    return _create(dict(depths=(3, 4, 18, 3), **_B1_DIMS), fused, **kwargs)


@register_model
def pvt_v2_b4(fused=True, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B4 (timm ``pvt_v2_b4``)."""
    return _create(dict(depths=(3, 8, 27, 3), **_B1_DIMS), fused, **kwargs)


@register_model
def pvt_v2_b5(fused=True, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B5 (timm ``pvt_v2_b5``: MLP ratio 4 in every stage)."""
    return _create(dict(depths=(3, 6, 40, 3), mlp_ratios=(4, 4, 4, 4), **_B1_DIMS), fused, **kwargs)


@register_model
def pvt_v2_b2_li(fused=True, **kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-B2-Li (timm ``pvt_v2_b2_li``: linear-complexity attention, keys and values pooled to 7x7)."""
    return _create(dict(depths=(3, 4, 6, 3), linear=True, **_B1_DIMS), fused, **kwargs)
