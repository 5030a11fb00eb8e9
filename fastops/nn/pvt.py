"""Drop-in PVTv2 modules for timm's ``pvt_v2.Attention`` and ``pvt_v2.MlpWithDepthwiseConv``, calling the fused
:func:`fastops.spatial_reduction`, :func:`fastops.sr_attention` and :func:`fastops.depthwise_conv2d` ops.

Parameters live in plain ``nn.Linear`` / ``nn.Conv2d`` / ``nn.LayerNorm`` submodules named and ordered as in
timm, so state_dict keys are timm's and checkpoints load unchanged. Both modules take timm's
``forward(x, feat_size)``: ``x`` the (B, N, C) tokens of an (H, W) map, token ``n = h * W + w``.
timm is never imported unless an object defined by timm is inspected (``is_convertible``).
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import reference as _ref
from ..ops.conv_bn_act import conv_bias_act
from ..ops.depthwise_conv2d import MAX_KERNEL, depthwise_conv2d
from ..ops.spatial_reduction import spatial_reduction
from ..ops.sr_attention import sr_attention
from .attention import _timm_type
from .conv_bn import act_name_of
from .depthwise import DepthwiseConv2d
from .layers import linear_act, linear_drop_add

__all__ = ["SRAttention", "MlpWithDepthwiseConv"]

POOL_SIZE = 7


def _feat_hw(where: str, x, feat_size: Sequence[int], channels: int):
    """(B, N, C) tokens and their (H, W): checked here so that fused and reference paths fail alike."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"fastops.nn.{where}: x must be (B, N, C={channels}) tokens, got {shape}")
    if not isinstance(feat_size, Sequence) or len(feat_size) != 2:
        raise TypeError(f"fastops.nn.{where}: feat_size must be (H, W), got {feat_size!r}")
    H, W = feat_size
    if H < 1 or W < 1 or H * W != x.shape[1]:
        raise ValueError(f"fastops.nn.{where}: feat_size {tuple(feat_size)} must be positive with H * W = N "
                         f"= {x.shape[1]} (x of shape {tuple(x.shape)})")
    return H, W


def _is_layer_norm(m, dim) -> bool:
    """An nn.LayerNorm (timm's subclass included: it computes the same) over the last dim, with weight and bias."""
    return (isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,)
            and isinstance(m.weight, nn.Parameter) and isinstance(m.bias, nn.Parameter))


def _is_linear(m, in_features, out_features) -> bool:
    return type(m) is nn.Linear and m.in_features == in_features and m.out_features == out_features


class SRAttention(nn.Module):
    r"""PVT spatial-reduction attention, drop-in for timm's ``pvt_v2.Attention`` (same constructor, forward
    and state_dict keys):

    .. math::
        y = \mathrm{proj}\big(\mathrm{sr\_attention}(q(x),\; \mathrm{kv}(\mathrm{reduce}(x)),\; \mathrm{heads},
        \mathrm{scale})\big)

    with ``reduce`` the :func:`fastops.spatial_reduction` of the (H, W) token map: a ``sr_ratio`` strided
    conv + LayerNorm when ``sr_ratio > 1``, AdaptiveAvgPool2d(7) + 1x1 conv + LayerNorm + GELU when
    ``linear_attn``, the identity otherwise (as timm). ``scale = head_dim ** -0.5``.

    Keys, in timm's order: ``q`` (dim -> dim), ``kv`` (dim -> 2 dim: k of every head, then v),
    ``proj``; ``sr`` (Conv2d) and ``norm`` (LayerNorm) when reducing; ``pool`` / ``act`` hold no parameters.

    Args:
        fused: True computes the reduction and the attention with :func:`fastops.spatial_reduction` and
            :func:`fastops.sr_attention`; False with :func:`fastops.reference.spatial_reduction` and
            :func:`fastops.reference.sr_attention` (timm's step-by-step computation).
        attn_drop: must be 0 (the fused op has no dropout on the attention probabilities; a ValueError
            says so rather than training without the dropout asked for).
    """

    def __init__(self, dim: int, num_heads: int = 8, sr_ratio: int = 1, linear_attn: bool = False,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"fastops.nn.SRAttention: dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"fastops.nn.SRAttention: num_heads must be a positive int dividing dim={dim}, "
                             f"got {num_heads!r}")
        if not isinstance(sr_ratio, int) or isinstance(sr_ratio, bool) or sr_ratio < 1:
            raise ValueError(f"fastops.nn.SRAttention: sr_ratio must be a positive int, got {sr_ratio!r}")
        if attn_drop:
            raise ValueError(f"fastops.nn.SRAttention: attn_drop must be 0 (the fused op has no attention "
                             f"dropout), got {attn_drop!r}")
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.sr_ratio = sr_ratio
        self.linear = bool(linear_attn)
        self.fused = bool(fused)
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if self.linear:
            self.pool = nn.AdaptiveAvgPool2d(POOL_SIZE)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1, **dd)
            self.norm = nn.LayerNorm(dim, **dd)
            self.act = nn.GELU()
        else:
            self.pool = None
            self.act = None
            if sr_ratio > 1:
                self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio, **dd)
                self.norm = nn.LayerNorm(dim, **dd)
            else:
                self.sr = None
                self.norm = None

    def forward(self, x: torch.Tensor, feat_size: Sequence[int],
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, dim) tokens of the (H, W) = ``feat_size`` map -> (B, N, dim); ``residual`` (B, N, dim), if
        given, is added to the output (after ``proj_drop``), fused in eval into the ``proj`` GEMM's epilogue."""
        H, W = _feat_hw("SRAttention", x, feat_size, self.dim)
        reduce = self.sr is not None
        k = 1 if self.linear else self.sr_ratio
        if reduce and not self.linear and (H < k or W < k):
            raise ValueError(f"fastops.nn.SRAttention: feat_size {(H, W)} is smaller than sr_ratio={k}: the "
                             f"strided reduction would leave no key/value tokens")
        q = linear_act(x, self.q) if self.fused else self.q(x)
        src = x
        if reduce:
            sr, norm = self.sr, self.norm
            fn = spatial_reduction if self.fused else _ref.spatial_reduction
            src = fn(x, (H, W), sr.weight, sr.bias, norm.weight, norm.bias, k, self.linear, norm.eps)
        if self.fused:
            out = sr_attention(q, linear_act(src, self.kv), self.num_heads, self.scale)
        else:
            out = _ref.sr_attention(q, self.kv(src), self.num_heads, self.scale)
        return linear_drop_add(out, self.proj, self.proj_drop, residual, self.fused)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, sr_ratio={self.sr_ratio}, linear={self.linear}, "
                f"fused={self.fused}")

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """True for a timm ``pvt_v2.Attention`` (exact type) with plain Linear q / kv / proj, no attention
        dropout, and timm's reduction: a (sr x sr, stride sr) Conv2d + LayerNorm, or in linear mode
        AdaptiveAvgPool2d(7) + 1x1 Conv2d + LayerNorm + exact GELU. False without timm."""
        if not _timm_type(m, "timm.models.pvt_v2", "Attention"):
            return False
        dim, heads = getattr(m, "dim", None), getattr(m, "num_heads", None)
        if not isinstance(dim, int) or not isinstance(heads, int) or heads < 1 or dim % heads:
            return False
        drop = getattr(m, "attn_drop", None)
        if (not _is_linear(getattr(m, "q", None), dim, dim) or not _is_linear(getattr(m, "kv", None), dim, 2 * dim)
                or type(getattr(m, "proj", None)) is not nn.Linear or m.proj.in_features != dim
                or (m.q.bias is None) != (m.kv.bias is None)
                or (drop is not None and getattr(drop, "p", 0.0))
                or float(getattr(m, "scale", dim // heads)) != (dim // heads) ** -0.5):
            return False
        pool, sr, norm, act = (getattr(m, n, None) for n in ("pool", "sr", "norm", "act"))
        if sr is None:
            return pool is None and norm is None
        if type(sr) is not nn.Conv2d or not _is_layer_norm(norm, dim):
            return False
        k = sr.kernel_size[0]
        if not (sr.in_channels == dim and sr.out_channels == dim and sr.kernel_size == (k, k)
                and sr.stride == (k, k) and sr.padding == (0, 0) and sr.dilation == (1, 1) and sr.groups == 1):
            return False
        if pool is None:
            return k > 1 and act is None
        size = pool.output_size if type(pool) is nn.AdaptiveAvgPool2d else None
        return (k == 1 and size in (POOL_SIZE, (POOL_SIZE, POOL_SIZE)) and type(act) is nn.GELU
                and act.approximate == "none")

    @classmethod
    def from_timm(cls, m: nn.Module, fused: bool = True) -> "SRAttention":
        """An SRAttention sharing ``m``'s submodules and parameters (no copy); ``m`` is a convertible timm
        ``pvt_v2.Attention``."""
        if not cls.is_convertible(m):
            raise ValueError(f"fastops.nn.SRAttention.from_timm: not a supported timm pvt_v2.Attention: {m}")
        linear = m.pool is not None
        sr_ratio = 1 if linear or m.sr is None else m.sr.kernel_size[0]
        new = cls(m.dim, m.num_heads, sr_ratio=sr_ratio, linear_attn=linear, qkv_bias=m.q.bias is not None,
                  fused=fused, device="meta")
        for name in ("q", "kv", "proj", "proj_drop", "pool", "sr", "norm", "act"):
            setattr(new, name, getattr(m, name))
        new.train(m.training)
        return new


class MlpWithDepthwiseConv(nn.Module):
    r"""PVTv2's MLP, drop-in for timm's ``pvt_v2.MlpWithDepthwiseConv`` (same constructor, forward and keys):

    .. math::
        y = \mathrm{fc2}(\mathrm{drop}(\mathrm{act}(\mathrm{dwconv}_{3\times3}(\mathrm{relu}?(\mathrm{fc1}(x))))))

    The depthwise conv runs on the fc1 output as it lies: ``x.transpose(1, 2).view(B, C, H, W)`` is a
    channels_last-strided view of the (B, N, C) tokens, :func:`fastops.depthwise_conv2d` reads it in place
    and returns channels_last, whose ``flatten(2).transpose(1, 2)`` is again contiguous (B, N, C) tokens:
    no layout copy either way. When ``act`` has a fused form (GELU exact, ReLU, ReLU6, SiLU, Hardswish) the
    conv is :func:`fastops.conv_bias_act` with the activation in its epilogue (one pass over the hidden map
    instead of two); other activations run after :func:`fastops.depthwise_conv2d`.

    Keys: ``fc1``, ``dwconv`` (C, 1, 3, 3) + bias, ``fc2``. ``extra_relu`` (timm's linear-mode blocks)
    applies ReLU after fc1.

    Args:
        fused: the fastops conv (True) or ``F.conv2d`` + ``act`` as timm (False).
    """

    def __init__(self, in_features: int, hidden_features=None, out_features=None, act_layer=nn.GELU,
                 drop: float = 0.0, extra_relu: bool = False, fused: bool = True, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fused = bool(fused)
        self.fc1 = nn.Linear(in_features, hidden_features, **dd)
        self.relu = nn.ReLU() if extra_relu else nn.Identity()
        self.dwconv = nn.Conv2d(hidden_features, hidden_features, 3, 1, 1, bias=True, groups=hidden_features, **dd)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features, **dd)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, feat_size: Sequence[int],
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, in_features) tokens of the (H, W) = ``feat_size`` map -> (B, N, out_features);
        ``residual`` (B, N, out_features), if given, is added to the output (after the last dropout), fused in
        eval into the ``fc2`` GEMM's epilogue."""
        H, W = _feat_hw("MlpWithDepthwiseConv", x, feat_size, self.fc1.in_features)
        # ReLU is elementwise: applied to the tokens it equals timm's ReLU on the map.
        x = self.relu(linear_act(x, self.fc1) if self.fused else self.fc1(x))
        B, N, C = x.shape
        m = x.transpose(1, 2).view(B, C, H, W)
        conv = self.dwconv
        act = act_name_of(self.act) if self.fused else None
        if act is not None:
            # The activation is elementwise: in the conv's epilogue it equals timm's act on the tokens.
            m = conv_bias_act(m, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups, act)
        elif self.fused:
            m = self.act(depthwise_conv2d(m, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation))
        else:
            m = self.act(F.conv2d(m, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups))
        x = self.drop(m.flatten(2).transpose(1, 2))
        return linear_drop_add(x, self.fc2, self.drop, residual, self.fused)

    def extra_repr(self) -> str:
        return f"fused={self.fused}"

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """True for a timm ``pvt_v2.MlpWithDepthwiseConv`` (exact type) with plain Linear fc1 / fc2 and a
        depthwise, zero-padded ``dwconv`` (an nn.Conv2d or a :class:`fastops.nn.DepthwiseConv2d`) keeping
        fc1's width. ``act``, ``relu`` and ``drop`` are reused as they are. False without timm."""
        if not _timm_type(m, "timm.models.pvt_v2", "MlpWithDepthwiseConv"):
            return False
        fc1, fc2, conv = (getattr(m, n, None) for n in ("fc1", "fc2", "dwconv"))
        if type(fc1) is not nn.Linear or type(fc2) is not nn.Linear or fc2.in_features != fc1.out_features:
            return False
        return (type(conv) in (nn.Conv2d, DepthwiseConv2d) and conv.padding_mode == "zeros"
                and conv.groups == conv.in_channels == conv.out_channels == fc1.out_features
                and max(conv.kernel_size) <= MAX_KERNEL
                and all(isinstance(getattr(m, n, None), nn.Module) for n in ("relu", "act", "drop")))

    @classmethod
    def from_timm(cls, m: nn.Module, fused: bool = True) -> "MlpWithDepthwiseConv":
        """A MlpWithDepthwiseConv sharing ``m``'s submodules and parameters (no copy); ``m`` is a convertible
        timm ``pvt_v2.MlpWithDepthwiseConv``."""
        if not cls.is_convertible(m):
            raise ValueError(f"fastops.nn.MlpWithDepthwiseConv.from_timm: not a supported timm "
                             f"pvt_v2.MlpWithDepthwiseConv: {m}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.fused = bool(fused)
        for name in ("fc1", "relu", "dwconv", "act", "fc2", "drop"):
            setattr(new, name, getattr(m, name))
        new.train(m.training)
        return new
