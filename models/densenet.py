"""DenseNet (BC) with timm's model names and state_dict keys, on fastops' fused BatchNorm / conv ops.

The layout follows ``timm.models.densenet``: ``features`` (``conv0``, ``norm0``, ``pool0``, then
``denseblock{i}.denselayer{j}.{norm1,conv1,norm2,conv2}`` and ``transition{i}.{norm,conv,pool}`` between
blocks, ``norm5``), global average pool, dropout, ``classifier``. Every norm is a BN + ReLU module owning its
parameters (:class:`~models.mobilenetv2.BatchNormAct2d`, timm's ``BatchNormAct2d``), so
``model.load_state_dict(timm.create_model(name).state_dict())`` works with ``strict=True``.

* ``fused=True``: the pre-activations ``relu(norm(x))`` (each layer's norm1, the transitions' norm, norm5) are
  :func:`fastops.nn.bn_act_module` calls; a layer's ``relu(norm2(conv1(x)))`` and the stem's
  ``relu(norm0(conv0(x)))`` are :func:`fastops.nn.conv_bn_act_modules` calls. A transition pools before its
  1x1 conv (a 1x1 conv without bias and a 2x2 average pool commute), which does a quarter of the conv's work.
* ``fused=False``: the same modules computed by their own forwards (plain PyTorch, timm's order); no fastops
  kernel is called.

timm is not imported here.
"""
from collections import OrderedDict
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

import fastops.nn as fnn

from . import channels_last_input, register_model
from .mobilenetv2 import BatchNormAct2d, act_name

__all__ = ["DenseNet", "DenseLayer", "DenseBlock", "DenseTransition"]


class DenseLayer(nn.Module):
    """``conv2(norm2(conv1(norm1(cat(features)))))`` (norms with ReLU), then dropout (``drop_rate``).
    Keys: ``norm1``, ``conv1`` (1x1 to ``bn_size * growth_rate``), ``norm2``, ``conv2`` (3x3 to
    ``growth_rate``)."""

    def __init__(self, num_input_features, growth_rate, bn_size, act="relu", drop_rate=0.0, fused=True):
        super().__init__()
        self.fused = bool(fused)
        self.norm1 = BatchNormAct2d(num_input_features, act=act)
        self.conv1 = nn.Conv2d(num_input_features, bn_size * growth_rate, 1, bias=False)
        self.norm2 = BatchNormAct2d(bn_size * growth_rate, act=act)
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        if self.fused:
            x = fnn.bn_act_module(x, self.norm1, act=self.norm1.act_name)
            x = fnn.conv_bn_act_modules(x, self.conv1, self.norm2, act=self.norm2.act_name,
                                        fold_cache=self.norm2.fold_cache)
        else:
            x = self.norm2(self.conv1(self.norm1(x)))
        x = self.conv2(x)
        if self.drop_rate > 0:
            x = F.dropout(x, p=self.drop_rate, training=self.training)
        return x


class DenseBlock(nn.ModuleDict):
    """``denselayer1..n``; layer j sees the block input and every earlier layer's output, concatenated; the
    block returns all of them concatenated."""

    def __init__(self, num_layers, num_input_features, bn_size, growth_rate, act="relu", drop_rate=0.0,
                 fused=True):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(num_input_features + i * growth_rate, growth_rate,
                                                             bn_size, act=act, drop_rate=drop_rate, fused=fused))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class DenseTransition(nn.Sequential):
    """``pool(conv(norm(x)))``: BN + ReLU, 1x1 conv halving the channels, 2x2 average pool.
    Keys: ``norm``, ``conv``, ``pool`` (no parameters)."""

    def __init__(self, num_input_features, num_output_features, act="relu", fused=True):
        super().__init__()
        self.fused = bool(fused)
        self.add_module("norm", BatchNormAct2d(num_input_features, act=act))
        self.add_module("conv", nn.Conv2d(num_input_features, num_output_features, 1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.pool(self.conv(self.norm(x)))
        # Pooling first: the 1x1 conv (no bias) is linear per pixel and the pool averages pixels, so the order
        # does not change the result (up to rounding), and the conv then runs on a quarter of the pixels.
        return self.conv(self.pool(fnn.bn_act_module(x, self.norm, act=self.norm.act_name)))


class DenseNet(nn.Module):
    """DenseNet-BC as timm builds it (no anti-aliasing).

    Args:
        growth_rate: channels each dense layer adds.  block_config: layers per dense block.
        bn_size: bottleneck width, ``bn_size * growth_rate``.
        stem_type: ``""`` (7x7/2 conv0, norm0, 3x3/2 max pool0) or ``"deep"`` (three 3x3 convs
            conv0/norm0, conv1/norm1, conv2/norm2, then pool0).
        num_classes: classifier outputs (0: no classifier, ``forward`` returns pooled features).
        in_chans: input channels.  global_pool: ``"avg"`` only.  act_layer: activation of every norm
        (``"relu"``; or another name the fused op takes).  drop_rate: dropout before the classifier.
        proj_drop_rate: dropout after each dense layer.
        fused: BN -> act and conv -> BN -> act through fastops (True) or plain PyTorch (False).
    """

    def __init__(self, growth_rate=32, block_config=(6, 12, 24, 16), num_classes=1000, in_chans=3,
                 global_pool="avg", bn_size=4, stem_type="", act_layer="relu", drop_rate=0.0, proj_drop_rate=0.0,
                 fused=True):
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"fastops.models DenseNet: global_pool must be 'avg', got {global_pool!r}")
        if stem_type not in ("", "deep"):
            raise ValueError(f"fastops.models DenseNet: stem_type must be '' or 'deep', got {stem_type!r}")
        act = act_name(act_layer)
        self.fused = bool(fused)
        self.num_classes = num_classes
        self.in_chans = in_chans

        num_init_features = growth_rate * 2
        if stem_type == "deep":
            stem = [("conv0", nn.Conv2d(in_chans, growth_rate, 3, stride=2, padding=1, bias=False)),
                    ("norm0", BatchNormAct2d(growth_rate, act=act)),
                    ("conv1", nn.Conv2d(growth_rate, growth_rate, 3, padding=1, bias=False)),
                    ("norm1", BatchNormAct2d(growth_rate, act=act)),
                    ("conv2", nn.Conv2d(growth_rate, num_init_features, 3, padding=1, bias=False)),
                    ("norm2", BatchNormAct2d(num_init_features, act=act))]
        else:
            stem = [("conv0", nn.Conv2d(in_chans, num_init_features, 7, stride=2, padding=3, bias=False)),
                    ("norm0", BatchNormAct2d(num_init_features, act=act))]
        self.features = nn.Sequential(OrderedDict(stem + [("pool0", nn.MaxPool2d(3, stride=2, padding=1))]))
        self._stem_pairs = tuple((f"conv{i}", f"norm{i}") for i in range(len(stem) // 2))

        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            self.features.add_module(f"denseblock{i + 1}", DenseBlock(
                num_layers, num_features, bn_size, growth_rate, act=act, drop_rate=proj_drop_rate, fused=fused))
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(f"transition{i + 1}",
                                         DenseTransition(num_features, num_features // 2, act=act, fused=fused))
                num_features //= 2
        self.features.add_module("norm5", BatchNormAct2d(num_features, act=act))

        self.num_features = num_features
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(num_features, num_classes) if num_classes > 0 else nn.Identity()

        # torchvision's / timm's initialisation (only matters when no checkpoint is loaded).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return self.features(x)
        f = self.features
        x = channels_last_input(x)
        for conv, norm in self._stem_pairs:
            norm = getattr(f, norm)
            x = fnn.conv_bn_act_modules(x, getattr(f, conv), norm, act=norm.act_name, fold_cache=norm.fold_cache)
        for name, m in f.named_children():
            if name == "pool0" or name.startswith(("denseblock", "transition")):
                x = m(x)
        return fnn.bn_act_module(x, f.norm5, act=f.norm5.act_name)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean((2, 3)))
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, num_classes) logits."""
        return self.forward_head(self.forward_features(x))


_KWARGS = {"num_classes", "in_chans", "global_pool", "bn_size", "act_layer", "drop_rate", "proj_drop_rate"}


def _create(fused, growth_rate, block_config, stem_type="", pretrained=False, **kwargs) -> DenseNet:
    if pretrained:
        raise ValueError("fastops.models: pretrained=True is not supported; load a checkpoint (e.g. timm's "
                         "state_dict) with model.load_state_dict")
    unknown = sorted(set(kwargs) - _KWARGS)
    if unknown:
        raise TypeError(f"fastops.models DenseNet: unsupported arguments {unknown}; supported: {sorted(_KWARGS)}")
    return DenseNet(growth_rate, block_config, stem_type=stem_type, fused=fused, **kwargs)


@register_model
def densenet121(fused=True, **kwargs) -> DenseNet:
    """DenseNet-121 (timm ``densenet121``)."""
    return _create(fused, 32, (6, 12, 24, 16), **kwargs)


@register_model
def densenet169(fused=True, **kwargs) -> DenseNet:
    """DenseNet-169 (timm ``densenet169``)."""
    return _create(fused, 32, (6, 12, 32, 32), **kwargs)


@register_model
def densenet201(fused=True, **kwargs) -> DenseNet:
    """DenseNet-201 (timm ``densenet201``)."""
    return _create(fused, 32, (6, 12, 48, 32), **kwargs)


@register_model
def densenet161(fused=True, **kwargs) -> DenseNet:
    """DenseNet-161 (timm ``densenet161``)."""
    return _create(fused, 48, (6, 12, 36, 24), **kwargs)


@register_model
def densenet264d(fused=True, **kwargs) -> DenseNet:
    """DenseNet-264 with the deep 3x3 stem (timm ``densenet264d``)."""
    return _create(fused, 48, (6, 12, 64, 48), stem_type="deep", **kwargs)
