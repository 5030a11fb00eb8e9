"""Drop-in channel-attention modules for timm's ``SEModule`` and ``CbamModule``, calling the fused ops.

Parameters live in plain ``nn.Conv2d`` / ``nn.BatchNorm2d`` submodules laid out like timm's, so the
state_dict keys are timm's and checkpoints load unchanged. timm is never imported unless an object
defined by timm is inspected (``is_convertible``); fastops does not depend on it.
"""
from typing import Optional

import torch
import torch.nn as nn

from ..ops.cbam import MAX_SPATIAL_KERNEL, cbam
from ..ops.squeeze_excite import squeeze_excite

__all__ = ["SqueezeExcite", "CbamModule"]

_ACT_STRINGS = {"relu": "relu", "silu": "silu", "swish": "silu", "gelu": "gelu"}
_GATE_STRINGS = {"sigmoid": "sigmoid", "hard_sigmoid": "hard_sigmoid", "hardsigmoid": "hard_sigmoid"}


def _make_divisible(v, divisor=8, min_value=None, round_limit=0.9):
    """timm.layers.make_divisible."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _timm_acts():
    """timm's own activation classes that compute what our names mean: {class: name} ({} without timm)."""
    try:
        from timm.layers import activations as ta
    except Exception:  # timm missing or broken
        return {}
    return {ta.GELU: "gelu", ta.Sigmoid: "sigmoid", ta.HardSigmoid: "hard_sigmoid"}


def _act_class_name(cls) -> Optional[str]:
    names = {nn.ReLU: "relu", nn.SiLU: "silu", nn.GELU: "gelu", nn.Sigmoid: "sigmoid", nn.Hardsigmoid: "hard_sigmoid"}
    if cls in names:
        return names[cls]
    if isinstance(cls, type) and cls.__module__.startswith("timm."):
        return _timm_acts().get(cls)
    return None


def _layer_name(owner, what, layer, strings, allowed) -> str:
    """The op's name for a timm-style ``act_layer`` / ``gate_layer`` argument (string or class)."""
    if isinstance(layer, str):
        name = strings.get(layer.lower())
    else:
        name = _act_class_name(layer)
    if name not in allowed:
        raise ValueError(f"fastops.nn.{owner}: {what}={layer!r} is not supported; use one of "
                         f"{sorted(strings)} or the matching nn classes ({', '.join(allowed)})")
    return name


def _module_name(mod: nn.Module, allowed) -> Optional[str]:
    """The op's name for an instantiated activation module, or None when the op cannot compute it."""
    if type(mod) is nn.GELU and mod.approximate != "none":
        return None
    name = _act_class_name(type(mod))
    return name if name in allowed else None


def _is_plain_conv(conv, in_ch, out_ch, k, bias) -> bool:
    return (type(conv) is nn.Conv2d and conv.in_channels == in_ch and conv.out_channels == out_ch
            and conv.kernel_size == (k, k) and conv.stride == (1, 1) and conv.padding == (k // 2, k // 2)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and (conv.bias is not None) == bias)


def _timm_type(m, module, name) -> bool:
    """type(m) is timm's ``module.name`` (timm imported only when m comes from timm)."""
    if not type(m).__module__.startswith("timm."):
        return False
    try:
        import importlib
        cls = getattr(importlib.import_module(module), name)
    except Exception:
        return False
    return type(m) is cls


def _share(dst: nn.Module, src: nn.Module) -> None:
    """Make dst's parameters and buffers the very tensors of src (same names), no copies."""
    for name, p in src.named_parameters(recurse=False):
        setattr(dst, name, p)
    for name, b in src.named_buffers(recurse=False):
        setattr(dst, name, b)


class SqueezeExcite(nn.Module):
    r"""Squeeze-and-excitation, drop-in for ``timm.layers.SEModule``; forward is :func:`fastops.squeeze_excite`.

    Computes, per sample n and channel c (``fc1`` / ``fc2`` are 1x1 convs, i.e. linear layers):

    .. math::
        g = \mathrm{gate}(\mathrm{fc2}(\mathrm{act}(\mathrm{fc1}(\mathrm{mean}_{hw}\,x)))), \qquad
        y = \mathrm{out\_act}(x \cdot g + \mathrm{residual})

    With ``residual=None, out_act=None`` this is exactly timm's ``SEModule.forward``; SE-ResNet passes the
    block's shortcut and ``out_act="relu"`` to fuse ``relu(se(x) + shortcut)`` into the same op.

    Same constructor as timm's (``add_maxpool`` must be False, ``norm_layer`` None), same parameters and
    state_dict keys: ``fc1.weight`` (R, C, 1, 1), ``fc1.bias`` (R,), ``fc2.weight`` (C, R, 1, 1),
    ``fc2.bias`` (C,), R = ``rd_channels`` or ``make_divisible(C * rd_ratio, rd_divisor)``.
    ``act_layer``: ReLU / SiLU (``"swish"``) / exact GELU (class or timm name); ``gate_layer``:
    ``"sigmoid"`` or ``"hard_sigmoid"`` (or ``nn.Sigmoid`` / ``nn.Hardsigmoid``).
    """

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 8, add_maxpool: bool = False, bias: bool = True, act_layer=nn.ReLU,
                 norm_layer=None, gate_layer="sigmoid", device=None, dtype=None):
        super().__init__()
        if add_maxpool:
            raise ValueError("fastops.nn.SqueezeExcite: add_maxpool=True is not supported (mean pooling only)")
        if norm_layer is not None:
            raise ValueError("fastops.nn.SqueezeExcite: norm_layer must be None (no norm between fc1 and act)")
        self.act_name = _layer_name("SqueezeExcite", "act_layer", act_layer, _ACT_STRINGS, ("relu", "silu", "gelu"))
        self.gate_name = _layer_name("SqueezeExcite", "gate_layer", gate_layer, _GATE_STRINGS,
                                     ("sigmoid", "hard_sigmoid"))
        if not rd_channels:
            rd_channels = _make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        dd = dict(device=device, dtype=dtype)
        self.fc1 = nn.Conv2d(channels, rd_channels, kernel_size=1, bias=bias, **dd)
        self.fc2 = nn.Conv2d(rd_channels, channels, kernel_size=1, bias=bias, **dd)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                out_act: Optional[str] = None) -> torch.Tensor:
        """``out_act(x * gate(fc2(act(fc1(mean_hw x)))) + residual)``; residual None adds nothing."""
        return squeeze_excite(x, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias,
                              self.act_name, self.gate_name, residual, out_act)

    def extra_repr(self) -> str:
        return f"act={self.act_name}, gate={self.gate_name}"

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """True for a ``timm.layers.SEModule`` (exact type) this module computes: mean pooling only, no
        norm, ReLU / SiLU / exact-GELU act, sigmoid / hard-sigmoid gate, plain 1x1 convs. False without timm."""
        if not _timm_type(m, "timm.layers.squeeze_excite", "SEModule"):
            return False
        C, R, bias = m.fc1.in_channels, m.fc1.out_channels, m.fc1.bias is not None
        return (not getattr(m, "add_maxpool", False) and type(getattr(m, "bn", nn.Identity())) is nn.Identity
                and _is_plain_conv(m.fc1, C, R, 1, bias) and _is_plain_conv(m.fc2, R, C, 1, bias)
                and _module_name(m.act, ("relu", "silu", "gelu")) is not None
                and _module_name(m.gate, ("sigmoid", "hard_sigmoid")) is not None)

    @classmethod
    def from_timm(cls, m: nn.Module) -> "SqueezeExcite":
        """A SqueezeExcite sharing ``m``'s parameters (no copy); ``m`` is a convertible timm SEModule."""
        if not cls.is_convertible(m):
            raise ValueError(f"fastops.nn.SqueezeExcite.from_timm: not a supported timm SEModule: {m}")
        new = cls(m.fc1.in_channels, rd_channels=m.fc1.out_channels, bias=m.fc1.bias is not None,
                  act_layer=_module_name(m.act, ("relu", "silu", "gelu")),
                  gate_layer=_module_name(m.gate, ("sigmoid", "hard_sigmoid")), device="meta")
        _share(new.fc1, m.fc1)
        _share(new.fc2, m.fc2)
        new.train(m.training)
        return new


class _ChannelAttn(nn.Module):
    """Holds CBAM's channel MLP (timm ``ChannelAttn``'s parameters: ``fc1``, ``fc2``)."""

    def __init__(self, channels, rd_channels, bias, dd):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias, **dd)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias, **dd)


class _ConvBn(nn.Module):
    """Holds the spatial conv + BN (timm ``ConvNormAct``'s parameters: ``conv``, ``bn``)."""

    def __init__(self, kernel_size, dd):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(1, **dd)


class _SpatialAttn(nn.Module):
    """Holds CBAM's spatial branch (timm ``SpatialAttn``: ``conv.conv``, ``conv.bn``)."""

    def __init__(self, kernel_size, dd):
        super().__init__()
        self.conv = _ConvBn(kernel_size, dd)


class CbamModule(nn.Module):
    r"""CBAM, drop-in for ``timm.layers.CbamModule``; forward is :func:`fastops.cbam`.

    Computes timm's ``ChannelAttn`` then ``SpatialAttn``:

    .. math::
        x_1 = x \cdot \mathrm{gate}(\mathrm{mlp}(\mathrm{mean}_{hw}x) + \mathrm{mlp}(\max_{hw}x)), \qquad
        y = x_1 \cdot \mathrm{gate}(\mathrm{BN}(\mathrm{conv}_{k\times k}([\mathrm{mean}_c x_1, \max_c x_1])))

    with ``mlp(p) = fc2(act(fc1(p)))``. The BN behaves as ``nn.BatchNorm2d``: in training (``bn.training``)
    it normalises with the batch statistics, updates ``running_mean`` / ``running_var`` with ``bn.momentum``
    (cumulative average when it is None) and increments ``num_batches_tracked``; in eval it uses the
    running statistics.

    Same constructor as timm's, same state_dict keys: ``channel.fc1.weight`` (R, C, 1, 1),
    ``channel.fc2.weight`` (C, R, 1, 1) (+ ``.bias`` when ``mlp_bias``), ``spatial.conv.conv.weight``
    (1, 2, k, k), ``spatial.conv.bn.{weight, bias, running_mean, running_var, num_batches_tracked}``.
    ``spatial_kernel_size`` odd, at most 15; ``act_layer`` ReLU / SiLU / exact GELU; ``gate_layer``
    sigmoid / hard-sigmoid (used by both branches, as in timm).
    """

    def __init__(self, channels: int, rd_ratio: float = 1. / 16, rd_channels: Optional[int] = None,
                 rd_divisor: int = 1, spatial_kernel_size: int = 7, act_layer=nn.ReLU, gate_layer="sigmoid",
                 mlp_bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.act_name = _layer_name("CbamModule", "act_layer", act_layer, _ACT_STRINGS, ("relu", "silu", "gelu"))
        self.gate_name = _layer_name("CbamModule", "gate_layer", gate_layer, _GATE_STRINGS,
                                     ("sigmoid", "hard_sigmoid"))
        k = spatial_kernel_size
        if not isinstance(k, int) or k < 1 or k % 2 == 0 or k > MAX_SPATIAL_KERNEL:
            raise ValueError(f"fastops.nn.CbamModule: spatial_kernel_size must be an odd int <= "
                             f"{MAX_SPATIAL_KERNEL}, got {k!r}")
        if not rd_channels:
            rd_channels = _make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.)
        dd = dict(device=device, dtype=dtype)
        self.channel = _ChannelAttn(channels, rd_channels, mlp_bias, dd)
        self.spatial = _SpatialAttn(k, dd)

    def _bn_momentum(self) -> float:
        """As nn.BatchNorm2d.forward: in training count the batch and return the running-stat factor."""
        bn = self.spatial.conv.bn
        if not bn.training:
            return 0.0
        bn.num_batches_tracked.add_(1)
        return (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's ``spatial(channel(x))`` in one fused op (BN mode from ``spatial.conv.bn.training``)."""
        ch, conv, bn = self.channel, self.spatial.conv.conv, self.spatial.conv.bn
        momentum = self._bn_momentum()
        return cbam(x, ch.fc1.weight, ch.fc1.bias, ch.fc2.weight, ch.fc2.bias, conv.weight, bn.weight, bn.bias,
                    bn.running_mean, bn.running_var, bn.eps, training=bn.training, momentum=momentum,
                    act=self.act_name, gate=self.gate_name)

    def extra_repr(self) -> str:
        return f"act={self.act_name}, gate={self.gate_name}"

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """True for a ``timm.layers.CbamModule`` (exact type, with timm's exact ``ChannelAttn`` /
        ``SpatialAttn``) this module computes: plain 1x1 MLP convs, ReLU / SiLU / exact-GELU act, one
        sigmoid or hard-sigmoid gate for both branches, an odd k <= 15 stride-1 conv without bias and an
        affine BN that tracks running stats, without act / drop / anti-aliasing. False without timm."""
        if not _timm_type(m, "timm.layers.cbam", "CbamModule"):
            return False
        ch, sp = m.channel, m.spatial
        if not (_timm_type(ch, "timm.layers.cbam", "ChannelAttn") and _timm_type(sp, "timm.layers.cbam", "SpatialAttn")
                and _timm_type(sp.conv, "timm.layers.conv_bn_act", "ConvNormAct")):
            return False
        C, R, bias = ch.fc1.in_channels, ch.fc1.out_channels, ch.fc1.bias is not None
        conv, bn = sp.conv.conv, sp.conv.bn
        k = conv.kernel_size[0] if isinstance(conv, nn.Conv2d) else 0
        gate = _module_name(ch.gate, ("sigmoid", "hard_sigmoid"))
        return (_is_plain_conv(ch.fc1, C, R, 1, bias) and _is_plain_conv(ch.fc2, R, C, 1, bias)
                and _module_name(ch.act, ("relu", "silu", "gelu")) is not None
                and gate is not None and _module_name(sp.gate, ("sigmoid", "hard_sigmoid")) == gate
                and k % 2 == 1 and k <= MAX_SPATIAL_KERNEL and _is_plain_conv(conv, 2, 1, k, False)
                and _timm_type(bn, "timm.layers.norm_act", "BatchNormAct2d") and bn.num_features == 1
                and bn.affine and bn.track_running_stats and bn.running_mean is not None
                and type(getattr(bn, "act", nn.Identity())) is nn.Identity
                and type(getattr(bn, "drop", nn.Identity())) is nn.Identity
                and (getattr(sp.conv, "aa", None) is None or type(sp.conv.aa) is nn.Identity))

    @classmethod
    def from_timm(cls, m: nn.Module) -> "CbamModule":
        """A CbamModule sharing ``m``'s parameters and BN buffers (no copy); ``m`` is a convertible timm
        CbamModule. BN eps / momentum are taken over."""
        if not cls.is_convertible(m):
            raise ValueError(f"fastops.nn.CbamModule.from_timm: not a supported timm CbamModule: {m}")
        ch, sp = m.channel, m.spatial
        new = cls(ch.fc1.in_channels, rd_channels=ch.fc1.out_channels, spatial_kernel_size=sp.conv.conv.kernel_size[0],
                  act_layer=_module_name(ch.act, ("relu", "silu", "gelu")),
                  gate_layer=_module_name(ch.gate, ("sigmoid", "hard_sigmoid")), mlp_bias=ch.fc1.bias is not None,
                  device="meta")
        _share(new.channel.fc1, ch.fc1)
        _share(new.channel.fc2, ch.fc2)
        _share(new.spatial.conv.conv, sp.conv.conv)
        _share(new.spatial.conv.bn, sp.conv.bn)
        new.spatial.conv.bn.eps = sp.conv.bn.eps
        new.spatial.conv.bn.momentum = sp.conv.bn.momentum
        new.train(m.training)
        new.spatial.conv.bn.train(sp.conv.bn.training)
        return new
