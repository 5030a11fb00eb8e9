"""fastops.optimize(model): swap supported modules for their fastops drop-ins, in place."""
import torch.nn as nn

from .nn import (BNAct, CbamModule, ConvBNAct, DepthwiseConv2d, MlpWithDepthwiseConv, SqueezeExcite, SRAttention,
                 SwinTransformerBlock)
from .nn.conv_bn import fuse_conv_bn

# (predicate, converter) pairs; each op's issue adds its own module here.
# Swapped before conv -> bn chains are fused (so that a ConvNormAct stays one module).
_PRE_SWAPS = [
    (ConvBNAct.is_convertible, ConvBNAct.from_timm),
    (BNAct.is_convertible, BNAct.from_timm),
]
_SWAPS = [
    (DepthwiseConv2d.is_convertible, DepthwiseConv2d.from_conv),
    (SqueezeExcite.is_convertible, SqueezeExcite.from_timm),
    (CbamModule.is_convertible, CbamModule.from_timm),
    (SwinTransformerBlock.is_convertible, SwinTransformerBlock.from_timm),
    (SRAttention.is_convertible, SRAttention.from_timm),
    (MlpWithDepthwiseConv.is_convertible, MlpWithDepthwiseConv.from_timm),
]


def optimize(model: nn.Module) -> nn.Module:
    """Replace every supported submodule of ``model`` with its fastops module, sharing parameters.

    First timm's ``ConvNormAct`` becomes :class:`fastops.nn.ConvBNAct` and ``BatchNormAct2d``
    :class:`fastops.nn.BNAct`. Then every remaining conv -> BatchNorm2d (-> activation module) chain becomes one
    :func:`fastops.conv_bn_act` call (:func:`fastops.nn.conv_bn.fuse_conv_bn`: found by torch.fx tracing; the conv becomes a
    :class:`fastops.nn.conv_bn.FusedConv2d`, the BN keeps its place and keys as a pass-through, the activation
    module becomes ``nn.Identity``; residual adds are not fused here, the fastops models do that). Then every
    depthwise ``nn.Conv2d`` (groups == in == out channels, zero padding) becomes
    :class:`fastops.nn.DepthwiseConv2d`; every supported ``timm.layers.SEModule`` becomes
    :class:`fastops.nn.SqueezeExcite` and every supported ``timm.layers.CbamModule``
    :class:`fastops.nn.CbamModule`; every supported timm ``SwinTransformerBlock`` becomes
    :class:`fastops.nn.SwinTransformerBlock`, its window attention one :func:`fastops.window_attention` call;
    every supported timm PVTv2 ``Attention`` becomes :class:`fastops.nn.SRAttention` (one
    :func:`fastops.spatial_reduction` and one :func:`fastops.sr_attention` call) and every
    ``MlpWithDepthwiseConv`` :class:`fastops.nn.MlpWithDepthwiseConv` (its depthwise conv one
    :func:`fastops.depthwise_conv2d` call on the tokens in place)
    (see their ``is_convertible``; this never imports timm itself).
    Outputs are unchanged up to floating-point rounding. The model is modified in place and returned;
    ``model`` itself is converted too if it is such a module.
    """
    model = _swap(model, _PRE_SWAPS, keep=_swapped_later)
    fuse_conv_bn(model, keep=_swapped_later)
    return _swap(model, _SWAPS)


def _swapped_later(m: nn.Module) -> bool:
    """Whether the last pass swaps `m` as a whole (e.g. timm's CbamModule, whose spatial conv + BN its fastops
    module takes over): the earlier passes leave such modules as they are."""
    return not isinstance(m, nn.Conv2d) and any(pred(m) for pred, _ in _SWAPS)


def _swap(model: nn.Module, swaps, keep=None) -> nn.Module:
    if keep is not None and keep(model):
        return model
    for pred, convert in swaps:
        if pred(model):
            return convert(model)
    for name, child in list(model.named_children()):
        setattr(model, name, _swap(child, swaps, keep))
    return model
