"""fastops.optimize(model): swap supported modules for their fastops drop-ins, in place."""
import torch.nn as nn

from .nn import CbamModule, DepthwiseConv2d, MlpWithDepthwiseConv, SqueezeExcite, SRAttention, SwinTransformerBlock

# (predicate, converter) pairs; each op's issue adds its own module here.
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

    Today: every depthwise ``nn.Conv2d`` (groups == in == out channels, zero padding) becomes
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
    for pred, convert in _SWAPS:
        if pred(model):
            return convert(model)
    for name, child in list(model.named_children()):
        setattr(model, name, optimize(child))
    return model
