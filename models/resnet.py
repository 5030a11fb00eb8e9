"""ResNet / SE-ResNet / CBAM-ResNet with timm's model names and state_dict keys, on fastops ops.

The layout follows ``timm.models.resnet`` (torchvision-style "b" ResNet: 7x7 stem, 1x1 downsample
conv), so ``model.load_state_dict(timm.create_model(name).state_dict())`` works with ``strict=True``.

* ``fused=True``: every conv -> BN (-> ReLU) pair is one :func:`fastops.nn.conv_bn_act_modules` call (the stem,
  each block's convs, the downsample with act ``"none"``). Without attention a block's last
  ``relu(bn3(conv3(x)) + shortcut)`` is one call with ``residual=shortcut``. With attention the last conv -> BN
  is a call with act ``"none"`` and the attention modules are :class:`fastops.nn.SqueezeExcite` /
  :class:`fastops.nn.CbamModule`; an SE block's ``relu(se(x) + shortcut)`` is one :func:`fastops.squeeze_excite`
  call (``residual=shortcut, out_act="relu"``), and in eval on CPU tensors ``relu(se(bn3(conv3(x))) + shortcut)``
  is one :func:`fastops.conv1x1_squeeze_excite` call (:func:`fastops.nn.conv_bn_se_modules`). BN keeps
  ``nn.BatchNorm2d``'s semantics (train / eval, running statistics, ``num_batches_tracked``).
* ``fused=False``: the same modules (same keys) computed in plain PyTorch (the modules' own forwards,
  :mod:`fastops.reference` for the attention); no fastops kernel is called. This is the baseline the fused
  model is checked against.

timm is not imported here.
"""
import math
from typing import Any, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastops.nn as fnn
from fastops import reference as _ref
from fastops.nn import CbamModule, SqueezeExcite
from fastops.nn.conv_bn import BNFoldCache
from fastops.nn.layers import DropPath

from . import channels_last_input, register_model

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "PlainSqueezeExcite", "PlainCbamModule"]


# Attention modules -----------------------------------------------------------------------------------

class PlainSqueezeExcite(SqueezeExcite):
    """:class:`fastops.nn.SqueezeExcite` (same parameters / keys) computed in plain PyTorch
    (:func:`fastops.reference.squeeze_excite`): ``out_act(x * gate(fc2(act(fc1(mean x)))) + residual)``."""

    def forward(self, x, residual=None, out_act=None):
        return _ref.squeeze_excite(x, self.fc1.weight.flatten(1), self.fc1.bias, self.fc2.weight.flatten(1),
                                   self.fc2.bias, self.act_name, self.gate_name, residual, out_act or "none")


class PlainCbamModule(CbamModule):
    """:class:`fastops.nn.CbamModule` (same parameters / keys, same BN running-stat updates) computed in
    plain PyTorch (:func:`fastops.reference.cbam`)."""

    def forward(self, x):
        ch, conv, bn = self.channel, self.spatial.conv.conv, self.spatial.conv.bn
        momentum = self._bn_momentum()
        return _ref.cbam(x, ch.fc1.weight.flatten(1), ch.fc1.bias, ch.fc2.weight.flatten(1), ch.fc2.bias,
                         conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, bn.training,
                         momentum, self.act_name, self.gate_name)


_ATTN = {
    True: {"se": SqueezeExcite, "cbam": CbamModule},
    False: {"se": PlainSqueezeExcite, "cbam": PlainCbamModule},
}


def _bn(channels: int) -> nn.BatchNorm2d:
    """A BatchNorm2d that carries the cache of its eval-mode fold into the preceding conv, so that the fused
    path folds once per weight change instead of once per call."""
    bn = nn.BatchNorm2d(channels)
    bn.fold_cache = BNFoldCache()
    return bn


def _cba(x, conv, bn, act, residual=None):
    """``act(bn(conv(x)) + residual)`` as one :func:`fastops.nn.conv_bn_act_modules` call."""
    return fnn.conv_bn_act_modules(x, conv, bn, act=act, residual=residual, fold_cache=bn.fold_cache)


def _drop_path_active(drop_path) -> bool:
    return drop_path is not None and drop_path.training and drop_path.drop_prob > 0.0


def _downsample(block, x):
    """The shortcut: ``x``, or the downsample's conv -> BN (one fused call when the block is fused)."""
    ds = block.downsample
    if ds is None:
        return x
    if block.fused:
        return _cba(x, ds[0], ds[1], "none")
    return ds(x)


def _fused_last(block, x, conv, bn, shortcut):
    """``relu(attn(bn(conv(x))) + shortcut)`` of a fused block. Without attention and without an active drop
    path (which must scale the branch before the add) conv, BN, the residual add and the ReLU are one call."""
    if block.se is None and not _drop_path_active(block.drop_path):
        return _cba(x, conv, bn, "relu", residual=shortcut)
    if (isinstance(block.se, SqueezeExcite) and not _drop_path_active(block.drop_path)
            and fnn.conv_bn_se_fusable(x, conv, bn)):
        # One fastops.conv1x1_squeeze_excite call: the SE's gate is applied in the conv's epilogue.
        return fnn.conv_bn_se_modules(x, conv, bn, block.se, shortcut, "relu", bn.fold_cache)
    return _attn_out(block, _cba(x, conv, bn, "none"), shortcut)


def _attn_out(block, x, shortcut):
    """``act(drop_path(attn(x)) + shortcut)``; one fused SE call when there is no active drop path."""
    drop_path = block.drop_path
    if isinstance(block.se, SqueezeExcite) and not _drop_path_active(drop_path):
        return block.se(x, residual=shortcut, out_act="relu")
    if block.se is not None:
        x = block.se(x)
    if drop_path is not None:
        x = drop_path(x)
    return F.relu(x + shortcut)


# Blocks ------------------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """timm's ``BasicBlock`` (ResNet-18/34): conv3x3-bn-relu, conv3x3-bn, [attention], + shortcut, relu.

    Keys: conv1, bn1, conv2, bn2, se (when attention), downsample.0 / .1 (when it changes shape).
    ``fused``: each conv -> BN (-> ReLU) through :func:`fastops.nn.conv_bn_act_modules`."""
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None, drop_path=None, fused=True):
        super().__init__()
        self.fused = bool(fused)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = _bn(planes)
        self.drop_block = nn.Identity()
        self.act1 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = _bn(planes)
        self.se = attn_layer(planes) if attn_layer is not None else None
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self):
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x):
        shortcut = _downsample(self, x)
        if self.fused:
            x = _cba(x, self.conv1, self.bn1, "relu")
            return _fused_last(self, x, self.conv2, self.bn2, shortcut)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return _attn_out(self, x, shortcut)


class Bottleneck(nn.Module):
    """timm's ``Bottleneck`` (ResNet-50+): conv1x1-bn-relu, conv3x3(stride)-bn-relu, conv1x1-bn,
    [attention on bn3's output], + shortcut, relu. With ``fused=True`` each conv -> BN (-> ReLU) is one
    :func:`fastops.nn.conv_bn_act_modules` call; without attention conv3 -> bn3 -> + shortcut -> relu is one call,
    with SE conv3 -> bn3 -> SE -> + shortcut -> relu is one :func:`fastops.conv1x1_squeeze_excite` call in eval on the
    CPU (elsewhere conv3 -> bn3 one call and the rest one :func:`fastops.squeeze_excite` call).

    Keys: conv1, bn1, conv2, bn2, conv3, bn3, se (when attention), downsample.0 / .1."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, attn_layer=None, drop_path=None, fused=True):
        super().__init__()
        self.fused = bool(fused)
        width = planes
        outplanes = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = _bn(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = _bn(width)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3 = nn.Conv2d(width, outplanes, 1, bias=False)
        self.bn3 = _bn(outplanes)
        self.se = attn_layer(outplanes) if attn_layer is not None else None
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.drop_path = drop_path

    def zero_init_last(self):
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x):
        shortcut = _downsample(self, x)
        if self.fused:
            x = _cba(x, self.conv1, self.bn1, "relu")
            x = _cba(x, self.conv2, self.bn2, "relu")
            return _fused_last(self, x, self.conv3, self.bn3, shortcut)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.bn3(self.conv3(x))
        return _attn_out(self, x, shortcut)


class GlobalAvgPool(nn.Module):
    """Mean over H, W, flattened to (N, C) (timm's ``SelectAdaptivePool2d('avg', flatten=True)``)."""

    def forward(self, x):
        return x.mean((2, 3))


# Network -----------------------------------------------------------------------------------------------

class ResNet(nn.Module):
    """timm's ``ResNet`` for the default "b" variant: 7x7/2 stem conv1-bn1-act1, 3x3/2 maxpool, four stages
    ``layer1..4`` (strides 1, 2, 2, 2, 1x1 conv + BN downsample when the shape changes), global average
    pool, dropout (``drop_rate``), ``fc``. Same state_dict keys as timm's model of the same name.

    Args:
        block: BasicBlock or Bottleneck.  layers: blocks per stage.
        num_classes: classifier outputs (0: no fc, ``forward`` returns pooled features).
        in_chans: input channels.  drop_rate: dropout before fc.  drop_path_rate: stochastic depth
        (linear over blocks, as timm).  global_pool: ``"avg"`` only.  zero_init_last: zero the last BN
        weight of every block at init (timm's default).
        block_args: ``dict(attn_layer=None | "se" | "cbam")``.
        fused: conv -> BN -> act and attention via the fastops ops (True) or plain PyTorch (False).
    """

    def __init__(self, block, layers, num_classes=1000, in_chans=3, drop_rate=0.0, drop_path_rate=0.0,
                 global_pool="avg", zero_init_last=True, block_args: Optional[Dict[str, Any]] = None,
                 fused=True):
        super().__init__()
        block_args = dict(block_args or {})
        attn = block_args.pop("attn_layer", None)
        if block_args:
            raise TypeError(f"fastops.models ResNet: unsupported block_args {sorted(block_args)} "
                            f"(only attn_layer=None|'se'|'cbam')")
        if attn is not None and attn not in _ATTN[True]:
            raise ValueError(f"fastops.models ResNet: attn_layer must be None, 'se' or 'cbam', got {attn!r}")
        if global_pool != "avg":
            raise ValueError(f"fastops.models ResNet: global_pool must be 'avg', got {global_pool!r}")
        attn_layer = _ATTN[bool(fused)][attn] if attn is not None else None
        self.fused = bool(fused)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate

        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = _bn(64)
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = 64
        total, idx = sum(layers), 0
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if stage == 0 else 2
            downsample = None
            if stride != 1 or inplanes != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                    _bn(planes * block.expansion))
            blocks = []
            for i in range(n):
                dpr = drop_path_rate * idx / (total - 1)
                blocks.append(block(inplanes, planes, stride if i == 0 else 1, downsample if i == 0 else None,
                                    attn_layer=attn_layer, drop_path=DropPath(dpr) if dpr > 0 else None,
                                    fused=fused))
                inplanes = planes * block.expansion
                idx += 1
            self.add_module(f"layer{stage + 1}", nn.Sequential(*blocks))

        self.num_features = 512 * block.expansion
        self.global_pool = GlobalAvgPool()
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_last:
            for m in self.modules():
                if hasattr(m, "zero_init_last"):
                    m.zero_init_last()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            x = self.maxpool(_cba(channels_last_input(x), self.conv1, self.bn1, "relu"))
        else:
            x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x)
        if self.drop_rate:
            x = F.dropout(x, p=float(self.drop_rate), training=self.training)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


_KWARGS = {"num_classes", "in_chans", "drop_rate", "drop_path_rate", "global_pool", "zero_init_last", "block_args"}


def _create(block, layers, fused, pretrained=False, **kwargs) -> ResNet:
    if pretrained:
        raise ValueError("fastops.models: pretrained=True is not supported; load a checkpoint (e.g. timm's "
                         "state_dict) with model.load_state_dict")
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise TypeError(f"fastops.models ResNet: unsupported arguments {unknown}; supported: {sorted(_KWARGS)}")
    return ResNet(block, layers, fused=fused, **kwargs)


def _with_attn(kwargs, attn):
    block_args = dict(kwargs.pop("block_args", None) or {})
    block_args.setdefault("attn_layer", attn)
    return dict(kwargs, block_args=block_args)


@register_model
def resnet18(fused=True, **kwargs) -> ResNet:
    """ResNet-18 (timm ``resnet18``)."""
    return _create(BasicBlock, (2, 2, 2, 2), fused, **kwargs)


@register_model
def resnet34(fused=True, **kwargs) -> ResNet:
    """ResNet-34 (timm ``resnet34``)."""
    return _create(BasicBlock, (3, 4, 6, 3), fused, **kwargs)


@register_model
def resnet50(fused=True, **kwargs) -> ResNet:
    """ResNet-50 (timm ``resnet50``); ``block_args=dict(attn_layer="se" | "cbam")`` adds attention."""
    return _create(Bottleneck, (3, 4, 6, 3), fused, **kwargs)


@register_model
def resnet101(fused=True, **kwargs) -> ResNet:
    """ResNet-101 (timm ``resnet101``)."""
    return _create(Bottleneck, (3, 4, 23, 3), fused, **kwargs)


@register_model
def resnet152(fused=True, **kwargs) -> ResNet:
    """ResNet-152 (timm ``resnet152``)."""
    return _create(Bottleneck, (3, 8, 36, 3), fused, **kwargs)


@register_model
def seresnet18(fused=True, **kwargs) -> ResNet:
    """SE-ResNet-18 (timm ``seresnet18``)."""
    return _create(BasicBlock, (2, 2, 2, 2), fused, **_with_attn(kwargs, "se"))


@register_model
def seresnet34(fused=True, **kwargs) -> ResNet:
    """SE-ResNet-34 (timm ``seresnet34``)."""
    return _create(BasicBlock, (3, 4, 6, 3), fused, **_with_attn(kwargs, "se"))


@register_model
def seresnet50(fused=True, **kwargs) -> ResNet:
    """SE-ResNet-50 (timm ``seresnet50``): SE (reduction 16) after every bottleneck's bn3, fused with the
    residual add and final ReLU."""
    return _create(Bottleneck, (3, 4, 6, 3), fused, **_with_attn(kwargs, "se"))


@register_model
def seresnet101(fused=True, **kwargs) -> ResNet:
    """SE-ResNet-101 (timm ``seresnet101``)."""
    return _create(Bottleneck, (3, 4, 23, 3), fused, **_with_attn(kwargs, "se"))


@register_model
def seresnet152(fused=True, **kwargs) -> ResNet:
    """SE-ResNet-152 (timm ``seresnet152``)."""
    return _create(Bottleneck, (3, 8, 36, 3), fused, **_with_attn(kwargs, "se"))


@register_model
def cbam_resnet50(fused=True, **kwargs) -> ResNet:
    """CBAM-ResNet-50: timm ``resnet50`` with ``block_args=dict(attn_layer="cbam")`` (same keys)."""
    return _create(Bottleneck, (3, 4, 6, 3), fused, **_with_attn(kwargs, "cbam"))
