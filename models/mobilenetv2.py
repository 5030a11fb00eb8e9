"""MobileNetV2 with timm's model names and state_dict keys, on fastops' fused conv -> BN -> activation.

The layout follows timm's ``EfficientNet`` class as its MobileNetV2 generator builds it (``conv_stem``,
``bn1``, ``blocks.<stage>.<block>``, ``conv_head``, ``bn2``, ``classifier``; a ``DepthwiseSeparableConv`` first
block with ``conv_dw, bn1, conv_pw, bn2``, then ``InvertedResidual`` blocks with ``conv_pw, bn1, conv_dw, bn2,
conv_pwl, bn3``), so ``model.load_state_dict(timm.create_model(name).state_dict())`` works with ``strict=True``.
Every norm is a :class:`BatchNormAct2d`: an ``nn.BatchNorm2d`` that owns its parameters (keys ``bn1.weight``,
``bn1.running_mean``, ...) followed by its activation, as timm's ``BatchNormAct2d``.

* ``fused=True``: every conv -> BN -> activation is one :func:`fastops.nn.conv_bn_act_modules` call; a block's
  skip connection goes into the projection's call as ``residual`` (act ``"none"``), except in training with an
  active drop path, which has to scale the branch before the add.
* ``fused=False``: the same modules computed by their own forwards (plain PyTorch); no fastops kernel is
  called.

timm is not imported here.
"""
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastops.nn as fnn
from fastops.nn.conv_bn import BNFoldCache
from fastops.nn.layers import DropPath

from . import channels_last_input, register_model

__all__ = ["MobileNetV2", "BatchNormAct2d", "DepthwiseSeparableConv", "InvertedResidual"]

# Activation names the fused op takes, with the module each stands for in the plain forward. The keys also
# accept timm's spellings of the same functions.
_ACT_MODULES = {
    "relu": lambda: nn.ReLU(inplace=True),
    "relu6": lambda: nn.ReLU6(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "gelu": lambda: nn.GELU(),
    "hardswish": lambda: nn.Hardswish(inplace=True),
}
_ACT_ALIASES = {"swish": "silu", "hard_swish": "hardswish"}


def act_name(act) -> str:
    """The fused op's name for an activation given as one of its names or timm's (``"swish"``,
    ``"hard_swish"``)."""
    name = _ACT_ALIASES.get(act, act) if isinstance(act, str) else None
    if name not in _ACT_MODULES:
        raise ValueError(f"fastops.models: act_layer {act!r} is not supported; use one of "
                         f"{sorted(_ACT_MODULES) + sorted(_ACT_ALIASES)}")
    return name


def make_divisible(v, divisor=8, min_value=None, round_limit=0.9) -> int:
    """timm's channel rounding: the nearest multiple of `divisor`, at least `min_value`, and never more than
    10% below `v` (these channel counts decide the state_dict shapes)."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


class BatchNormAct2d(nn.BatchNorm2d):
    """``act(BatchNorm2d(x))`` with the BN parameters and buffers on the module itself, as timm's
    ``BatchNormAct2d`` keeps them (so its keys are ``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``). ``act``: an activation name of the fused op, or ``None`` for no activation
    (timm's ``apply_act=False``). ``act_name`` is what the fused calls pass; ``fold_cache`` keeps the eval-mode
    fold into the preceding conv between fused calls; ``forward`` is the plain path."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 act: Optional[str] = "relu"):
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.act_name = act_name(act) if act is not None else "none"
        self.drop = nn.Identity()
        self.act = _ACT_MODULES[self.act_name]() if act is not None else nn.Identity()
        self.fold_cache = BNFoldCache()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def conv_bn_act(fused: bool, x: torch.Tensor, conv: nn.Conv2d, bn: BatchNormAct2d,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``bn.act(bn(conv(x)) + residual)``: one :func:`fastops.nn.conv_bn_act_modules` call when `fused`, else
    the modules' own forwards. The blocks pass a residual only when `bn` has no activation: timm adds the
    shortcut after the BN module, activation included, so only then is "before the activation" the same."""
    if fused:
        return fnn.conv_bn_act_modules(x, conv, bn, act=bn.act_name, residual=residual, fold_cache=bn.fold_cache)
    y = bn(conv(x))
    return y if residual is None else y + residual


def _drop_path_active(drop_path: nn.Module) -> bool:
    return isinstance(drop_path, DropPath) and drop_path.training and drop_path.drop_prob > 0.0


def _conv(in_chs, out_chs, k, stride=1, dilation=1, groups=1) -> nn.Conv2d:
    """timm's ``create_conv2d`` with its default padding: symmetric ``((stride - 1) + dilation * (k - 1)) // 2``,
    no bias."""
    pad = ((stride - 1) + dilation * (k - 1)) // 2
    return nn.Conv2d(in_chs, out_chs, k, stride=stride, padding=pad, dilation=dilation, groups=groups, bias=False)


class _Block(nn.Module):
    def _out(self, x: torch.Tensor, conv: nn.Conv2d, bn: BatchNormAct2d, shortcut: torch.Tensor) -> torch.Tensor:
        """The last conv -> BN, with the skip connection (``drop_path(x) + shortcut``) when the block has one.
        Fused, the add goes into the same call unless BN has an activation (the add would come after it) or
        an active drop path has to scale the branch first."""
        if not self.has_skip:
            return conv_bn_act(self.fused, x, conv, bn)
        if self.fused and bn.act_name == "none" and not _drop_path_active(self.drop_path):
            return conv_bn_act(True, x, conv, bn, residual=shortcut)
        return self.drop_path(conv_bn_act(self.fused, x, conv, bn)) + shortcut


class DepthwiseSeparableConv(_Block):
    """timm's ``DepthwiseSeparableConv``: depthwise conv -> bn1 (act) -> pointwise conv -> bn2 (act only with
    ``pw_act``), + shortcut when stride 1, in == out and not ``noskip``.
    Keys: ``conv_dw``, ``bn1``, ``conv_pw``, ``bn2`` (``aa``, ``se``: identities without parameters)."""

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, noskip=False, pw_act=False,
                 act="relu6", bn_kwargs=None, drop_path_rate=0.0, fused=True):
        super().__init__()
        bn_kwargs = bn_kwargs or {}
        self.fused = bool(fused)
        self.has_skip = stride == 1 and in_chs == out_chs and not noskip
        self.has_pw_act = pw_act
        self.conv_dw = _conv(in_chs, in_chs, dw_kernel_size, stride, dilation, groups=in_chs)
        self.bn1 = BatchNormAct2d(in_chs, act=act, **bn_kwargs)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pw = _conv(in_chs, out_chs, 1)
        self.bn2 = BatchNormAct2d(out_chs, act=act if pw_act else None, **bn_kwargs)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = conv_bn_act(self.fused, x, self.conv_dw, self.bn1)
        return self._out(x, self.conv_pw, self.bn2, shortcut)


class InvertedResidual(_Block):
    """timm's ``InvertedResidual`` (MBConv without SE): 1x1 expansion -> bn1 (act) -> depthwise conv (stride) ->
    bn2 (act) -> 1x1 projection -> bn3 (no act), + shortcut when stride 1, in == out and not ``noskip``.
    Keys: ``conv_pw``, ``bn1``, ``conv_dw``, ``bn2``, ``conv_pwl``, ``bn3``."""

    def __init__(self, in_chs, out_chs, dw_kernel_size=3, stride=1, dilation=1, noskip=False, exp_ratio=6.0,
                 act="relu6", bn_kwargs=None, drop_path_rate=0.0, fused=True):
        super().__init__()
        bn_kwargs = bn_kwargs or {}
        self.fused = bool(fused)
        self.has_skip = in_chs == out_chs and stride == 1 and not noskip
        mid_chs = make_divisible(in_chs * exp_ratio)
        self.conv_pw = _conv(in_chs, mid_chs, 1)
        self.bn1 = BatchNormAct2d(mid_chs, act=act, **bn_kwargs)
        self.conv_dw = _conv(mid_chs, mid_chs, dw_kernel_size, stride, dilation, groups=mid_chs)
        self.bn2 = BatchNormAct2d(mid_chs, act=act, **bn_kwargs)
        self.aa = nn.Identity()
        self.se = nn.Identity()
        self.conv_pwl = _conv(mid_chs, out_chs, 1)
        self.bn3 = BatchNormAct2d(out_chs, act=None, **bn_kwargs)
        self.drop_path = DropPath(drop_path_rate) if drop_path_rate else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = conv_bn_act(self.fused, x, self.conv_pw, self.bn1)
        x = conv_bn_act(self.fused, x, self.conv_dw, self.bn2)
        return self._out(x, self.conv_pwl, self.bn3, shortcut)


# MobileNetV2's stages, as timm's generator defines them: (block type, repeats, kernel, stride, expansion,
# output channels before the width multiplier).
ARCH = (
    ("ds", 1, 3, 1, 1, 16),
    ("ir", 2, 3, 2, 6, 24),
    ("ir", 3, 3, 2, 6, 32),
    ("ir", 4, 3, 2, 6, 64),
    ("ir", 3, 3, 1, 6, 96),
    ("ir", 3, 3, 2, 6, 160),
    ("ir", 1, 3, 1, 6, 320),
)


class MobileNetV2(nn.Module):
    """MobileNetV2 as timm builds it (``EfficientNet`` class, default padding, BN, ReLU6).

    Args:
        channel_multiplier: width multiplier (channels rounded to multiples of 8, as timm).
        depth_multiplier: repeats of each stage scaled by it (rounded up), except the first and last stage
            when ``fix_stem_head``.  fix_stem_head: keep the stem at 32 and the head at 1280 channels.
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input channels.  drop_rate: dropout before the classifier.  drop_path_rate: stochastic
        depth, ``drop_path_rate * i / n`` for block i of n (as timm).  global_pool: ``"avg"`` only.
        act_layer: activation name (``"relu6"``; also relu, silu/swish, gelu, hardswish/hard_swish).
        bn_eps / bn_momentum: BatchNorm eps and momentum (timm's arguments of the same names).
        fused: conv -> BN -> act through fastops (True) or plain PyTorch (False).
    """

    def __init__(self, channel_multiplier=1.0, depth_multiplier=1.0, fix_stem_head=False, num_classes=1000,
                 in_chans=3, drop_rate=0.0, drop_path_rate=0.0, global_pool="avg", act_layer="relu6",
                 bn_eps=None, bn_momentum=None, fused=True):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"fastops.models MobileNetV2: global_pool must be 'avg', got {global_pool!r}")
        act = act_name(act_layer)
        bn_kwargs = {}
        if bn_eps is not None:
            bn_kwargs["eps"] = bn_eps
        if bn_momentum is not None:
            bn_kwargs["momentum"] = bn_momentum
        self.fused = bool(fused)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        def round_chs(c):
            return make_divisible(c * channel_multiplier) if channel_multiplier else c

        stem_size = 32 if fix_stem_head else round_chs(32)
        self.conv_stem = _conv(in_chans, stem_size, 3, stride=2)
        self.bn1 = BatchNormAct2d(stem_size, act=act, **bn_kwargs)

        last = len(ARCH) - 1
        repeats = [r if fix_stem_head and i in (0, last) else int(math.ceil(r * depth_multiplier))
                   for i, (_, r, *_rest) in enumerate(ARCH)]
        total, idx, in_chs = sum(repeats), 0, stem_size
        stages = []
        for (kind, _, k, stride, exp, out), n in zip(ARCH, repeats):
            out_chs = round_chs(out)
            blocks = []
            for i in range(n):
                common = dict(dw_kernel_size=k, stride=stride if i == 0 else 1, act=act, bn_kwargs=bn_kwargs,
                              drop_path_rate=drop_path_rate * idx / total, fused=fused)
                if kind == "ds":
                    blocks.append(DepthwiseSeparableConv(in_chs, out_chs, **common))
                else:
                    blocks.append(InvertedResidual(in_chs, out_chs, exp_ratio=exp, **common))
                in_chs = out_chs
                idx += 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)

        self.num_features = 1280 if fix_stem_head else max(1280, round_chs(1280))
        self.conv_head = _conv(in_chs, self.num_features, 1)
        self.bn2 = BatchNormAct2d(self.num_features, act=act, **bn_kwargs)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self):
        """timm's initialisation for these models (only matters when no checkpoint is loaded): convs
        N(0, 2 / fan_out) with fan_out per group, BN weight 1 bias 0, the classifier U(+-1/sqrt(out))."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                r = 1.0 / math.sqrt(m.weight.size(0))
                nn.init.uniform_(m.weight, -r, r)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            x = channels_last_input(x)
        x = conv_bn_act(self.fused, x, self.conv_stem, self.bn1)
        x = self.blocks(x)
        return conv_bn_act(self.fused, x, self.conv_head, self.bn2)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        if self.drop_rate > 0.0:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


_KWARGS = {"num_classes", "in_chans", "drop_rate", "drop_path_rate", "global_pool", "act_layer", "bn_eps",
           "bn_momentum"}


def _create(fused, channel_multiplier, depth_multiplier=1.0, fix_stem_head=False, pretrained=False,
            **kwargs) -> MobileNetV2:
    if pretrained:
        raise ValueError("fastops.models: pretrained=True is not supported; load a checkpoint (e.g. timm's "
                         "state_dict) with model.load_state_dict")
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise TypeError(f"fastops.models MobileNetV2: unsupported arguments {unknown}; supported: "
                        f"{sorted(_KWARGS)}")
    return MobileNetV2(channel_multiplier, depth_multiplier, fix_stem_head, fused=fused, **kwargs)


@register_model
def mobilenetv2_035(fused=True, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 0.35 (timm ``mobilenetv2_035``)."""
    return _create(fused, 0.35, **kwargs)


@register_model
def mobilenetv2_050(fused=True, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 0.5 (timm ``mobilenetv2_050``)."""
    return _create(fused, 0.5, **kwargs)


@register_model
def mobilenetv2_075(fused=True, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 0.75 (timm ``mobilenetv2_075``)."""
    return _create(fused, 0.75, **kwargs)


@register_model
def mobilenetv2_100(fused=True, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 1.0 (timm ``mobilenetv2_100``)."""
    return _create(fused, 1.0, **kwargs)


@register_model
def mobilenetv2_140(fused=True, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 1.4 (timm ``mobilenetv2_140``)."""
    return _create(fused, 1.4, **kwargs)


@register_model
def mobilenetv2_110d(fused=True, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 1.1, depth 1.2, stem and head fixed (timm ``mobilenetv2_110d``)."""
    return _create(fused, 1.1, depth_multiplier=1.2, fix_stem_head=True, **kwargs)


@register_model
def mobilenetv2_120d(fused=True, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 1.2, depth 1.4, stem and head fixed (timm ``mobilenetv2_120d``)."""
    return _create(fused, 1.2, depth_multiplier=1.4, fix_stem_head=True, **kwargs)
