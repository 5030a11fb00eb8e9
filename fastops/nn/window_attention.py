"""Drop-in Swin modules for timm's ``WindowAttention`` and ``SwinTransformerBlock``, calling the fused
:func:`fastops.window_attention` op.

Parameters live in plain ``nn.Linear`` / ``nn.LayerNorm`` submodules laid out like timm's, so state_dict keys
are timm's and checkpoints load unchanged. Unlike timm's ``WindowAttention`` (which takes already
partitioned windows), :class:`WindowAttention` here takes the whole normalised (B, H, W, C) map and the
block's shift: roll, padding, window partition, the SW-MSA mask and their reverses all happen inside the op.
timm is never imported unless an object defined by timm is inspected (``is_convertible``).
"""
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .. import reference as _ref
from ..ops import _checks
from ..ops.window_attention import window_attention
from .attention import _share, _timm_type
from .layers import DropPath, acts_as_identity, linear_act, linear_drop_add

__all__ = ["WindowAttention", "SwinTransformerBlock", "relative_position_index"]

IntOrPair = Union[int, Sequence[int]]


def relative_position_index(wh: int, ww: int, device=None) -> torch.Tensor:
    """(N, N) int64 index into the ``(2wh-1)(2ww-1)`` bias table for tokens i, j of a window (row-major),
    as timm's ``get_relative_position_index``: ``(dy + wh - 1) * (2ww - 1) + (dx + ww - 1)``, d = pos_i - pos_j."""
    ys = torch.arange(wh, device=device).repeat_interleave(ww)
    xs = torch.arange(ww, device=device).repeat(wh)
    dy = ys[:, None] - ys[None, :] + (wh - 1)
    dx = xs[:, None] - xs[None, :] + (ww - 1)
    return dy * (2 * ww - 1) + dx


class WindowAttention(nn.Module):
    r"""Swin W-MSA / SW-MSA with relative position bias, drop-in for timm's ``WindowAttention`` (same
    constructor and state_dict keys) but applied to the whole map:

    .. math::
        y = \mathrm{proj}(\mathrm{window\_attention}(\mathrm{qkv}(x), \mathrm{heads}, \mathrm{window},
        \mathrm{shift}, B_{\mathrm{rel}}, \mathrm{scale}, \mathrm{pad\_qkv} = \mathrm{qkv.bias}))

    ``forward(x, shift_size)`` takes the normalised (B, H, W, dim) map (not partitioned windows) and returns
    (B, H, W, dim) at the original positions: exactly timm's ``SwinTransformerBlock._attn``. Padding tokens
    (H or W not a window multiple) are zeros before ``qkv`` in timm, so their q, k, v are ``qkv.bias``.
    The bias ``B_rel = relative_position_bias_table[relative_position_index]`` (heads, N, N) is gathered on
    every call, so the table is trained like timm's.

    Keys: ``qkv.weight`` (3A, dim), ``qkv.bias`` (3A,) when ``qkv_bias``, ``proj.weight`` (dim, A),
    ``proj.bias``, ``relative_position_bias_table`` ((2wh-1)(2ww-1), heads); ``relative_position_index``
    is a non-persistent buffer. A = heads * head_dim (head_dim defaults to ``dim // num_heads``).

    Args:
        fused: True calls :func:`fastops.window_attention`; False the plain-PyTorch
            :func:`fastops.reference.window_attention` (same math, timm's step by step).
        attn_drop: must be 0 (the fused op has no dropout on the attention probabilities).
    """

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, window_size: IntOrPair = 7,
                 qkv_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0, fused: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"fastops.nn.WindowAttention: dim must be a positive int, got {dim!r}")
        if not isinstance(num_heads, int) or isinstance(num_heads, bool) or num_heads < 1:
            raise ValueError(f"fastops.nn.WindowAttention: num_heads must be a positive int, got {num_heads!r}")
        head_dim = head_dim or dim // num_heads
        if head_dim < 1:
            raise ValueError(f"fastops.nn.WindowAttention: head_dim must be >= 1 (dim={dim}, "
                             f"num_heads={num_heads}), got {head_dim}")
        if attn_drop:
            raise ValueError(f"fastops.nn.WindowAttention: attn_drop must be 0 (the fused op has no attention "
                             f"dropout), got {attn_drop!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.window_size = _checks.pair("nn.WindowAttention", "window_size", window_size, 1)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.scale = head_dim ** -0.5
        self.shift_size = (0, 0)
        self.fused = bool(fused)
        dd = dict(device=device, dtype=dtype)
        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.empty((2 * wh - 1) * (2 * ww - 1), num_heads, **dd))
        # Built on a real device even when the parameters are on meta: a non-persistent buffer is never
        # loaded from a state_dict, so a meta copy would stay unusable.
        index_device = device if device is not None and torch.device(device).type != "meta" else "cpu"
        self.register_buffer("relative_position_index", relative_position_index(wh, ww, device=index_device),
                             persistent=False)
        attn_dim = head_dim * num_heads
        self.qkv = nn.Linear(dim, 3 * attn_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(attn_dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        if self.relative_position_bias_table.device.type != "meta":
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)

    def rel_pos_bias(self) -> torch.Tensor:
        """(heads, N, N): the bias table gathered for every token pair of a window (differentiable)."""
        table = self.relative_position_bias_table
        index = self.relative_position_index
        if index.device != table.device:
            index = (relative_position_index(*self.window_size) if index.is_meta else index).to(table.device)
            self.relative_position_index = index
        n = self.window_area
        return table[index.reshape(-1)].view(n, n, self.num_heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, shift_size: Optional[IntOrPair] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, H, W, dim) normalised map -> (B, H, W, dim). ``shift_size`` (int or pair, each below the
        window) defaults to the ``shift_size`` attribute, which :class:`SwinTransformerBlock` sets.
        ``residual`` (B, H, W, dim), if given, is added to the output (after ``proj_drop``); fused, outside
        training, in the ``proj`` GEMM's epilogue."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"fastops.nn.WindowAttention: x must be (B, H, W, dim={self.dim}), got {shape}")
        shift = self.shift_size if shift_size is None else shift_size
        shift = _checks.pair("nn.WindowAttention", "shift_size", shift, 0)
        qkv = linear_act(x, self.qkv) if self.fused else self.qkv(x)
        bias = self.rel_pos_bias()
        pad = self.qkv.bias
        if self.fused:
            out = window_attention(qkv, self.num_heads, self.window_size, shift, bias, self.scale, pad)
            return linear_drop_add(out, self.proj, self.proj_drop, residual)
        if shift[0] >= self.window_size[0] or shift[1] >= self.window_size[1]:
            raise ValueError(f"fastops.nn.WindowAttention: shift_size must be smaller than window_size "
                             f"{self.window_size} in each dimension, got {shift}")
        out = _ref.window_attention(qkv.contiguous(), self.num_heads, self.window_size, shift, bias, self.scale,
                                    pad)
        return linear_drop_add(out, self.proj, self.proj_drop, residual, fused=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}, fused={self.fused}")

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """True for a timm ``WindowAttention`` (exact type) with plain Linear qkv / proj and no attention
        dropout. False without timm."""
        if not _timm_type(m, "timm.models.swin_transformer", "WindowAttention"):
            return False
        drop = getattr(m, "attn_drop", None)
        ws = tuple(getattr(m, "window_size", ()))
        return (type(getattr(m, "qkv", None)) is nn.Linear and type(getattr(m, "proj", None)) is nn.Linear
                and isinstance(getattr(m, "relative_position_bias_table", None), nn.Parameter)
                and len(ws) == 2 and m.relative_position_bias_table.shape == ((2 * ws[0] - 1) * (2 * ws[1] - 1),
                                                                             m.num_heads)
                and m.qkv.out_features == 3 * m.proj.in_features and m.proj.in_features % m.num_heads == 0
                and (drop is None or not getattr(drop, "p", 0.0)))

    @classmethod
    def from_timm(cls, m: nn.Module, fused: bool = True) -> "WindowAttention":
        """A WindowAttention sharing ``m``'s parameters and index buffer (no copy); ``m`` is a convertible
        timm WindowAttention. Its shift comes from the caller (timm keeps it on the block)."""
        if not cls.is_convertible(m):
            raise ValueError(f"fastops.nn.WindowAttention.from_timm: not a supported timm WindowAttention: {m}")
        new = cls(m.qkv.in_features, m.num_heads, head_dim=m.proj.in_features // m.num_heads,
                  window_size=tuple(m.window_size), qkv_bias=m.qkv.bias is not None,
                  proj_drop=getattr(m.proj_drop, "p", 0.0), fused=fused, device="meta")
        new.scale = float(m.scale)
        _share(new, m)
        new.qkv = m.qkv
        new.proj = m.proj
        new.proj_drop = m.proj_drop
        new.train(m.training)
        return new


class _Mlp(nn.Module):
    """timm's ``Mlp`` layout (keys ``fc1``, ``fc2``): fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, dim, hidden, act_layer, drop, dd):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class SwinTransformerBlock(nn.Module):
    r"""Swin block, drop-in for timm's ``SwinTransformerBlock`` (same constructor, keys and forward):

    .. math::
        x \leftarrow x + \mathrm{dp}(\mathrm{attn}(\mathrm{norm1}(x))), \qquad
        x \leftarrow x + \mathrm{dp}(\mathrm{mlp}(\mathrm{norm2}(x)))

    on (B, H, W, dim) maps, with ``attn`` a :class:`WindowAttention` run with this block's shift.

    Window and shift follow timm's ``_calc_window_shift``: unless ``always_partition``, per dimension the
    window is clamped to ``input_resolution`` and the shift is 0 where the resolution is not larger than the
    window. The SW-MSA mask is always built for the actual H, W of the input (timm's ``dynamic_mask``
    behaviour; for an input of ``input_resolution`` it equals timm's static mask), so any H, W work;
    ``dynamic_mask`` is accepted for compatibility and changes nothing.

    Keys: ``norm1``, ``attn.{qkv, proj, relative_position_bias_table}``, ``norm2``, ``mlp.fc1``, ``mlp.fc2``.
    ``drop_path`` > 0 applies per-sample stochastic depth in training (timm's ``DropPath``). ``attn_drop``
    must be 0.

    Args:
        fused: :func:`fastops.window_attention` (True) or :func:`fastops.reference.window_attention` (False).
    """

    def __init__(self, dim: int, input_resolution: IntOrPair, num_heads: int = 4, head_dim: Optional[int] = None,
                 window_size: IntOrPair = 7, shift_size: IntOrPair = 0, always_partition: bool = False,
                 dynamic_mask: bool = False, mlp_ratio: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 fused: bool = True, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.dim = dim
        self.input_resolution = _checks.pair("nn.SwinTransformerBlock", "input_resolution", input_resolution, 1)
        self.target_shift_size = _checks.pair("nn.SwinTransformerBlock", "shift_size", shift_size, 0)
        self.always_partition = bool(always_partition)
        self.dynamic_mask = bool(dynamic_mask)
        self.window_size, self.shift_size = self._calc_window_shift(window_size, self.target_shift_size)
        self.window_area = self.window_size[0] * self.window_size[1]
        self.mlp_ratio = mlp_ratio
        self.norm1 = norm_layer(dim, **dd)
        self.attn = WindowAttention(dim, num_heads, head_dim=head_dim, window_size=self.window_size,
                                    qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop, fused=fused, **dd)
        self.attn.shift_size = self.shift_size
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop, dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def fused(self) -> bool:
        return self.attn.fused

    def _calc_window_shift(self, window_size, shift_size) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        window = _checks.pair("nn.SwinTransformerBlock", "window_size", window_size, 1)
        shift = _checks.pair("nn.SwinTransformerBlock", "shift_size", shift_size, 0)
        if not self.always_partition:
            window = tuple(min(r, w) for r, w in zip(self.input_resolution, window))
            shift = tuple(0 if r <= w else s for r, w, s in zip(self.input_resolution, window, shift))
        if shift[0] >= window[0] or shift[1] >= window[1]:
            raise ValueError(f"fastops.nn.SwinTransformerBlock: shift_size {shift} must be smaller than the "
                             f"window {window} in each dimension")
        return tuple(window), tuple(shift)

    def set_input_size(self, feat_size: IntOrPair, window_size: IntOrPair,
                       always_partition: Optional[bool] = None) -> None:
        """New input resolution (and window), as timm's: the shift becomes ``window // 2`` if the block
        shifts at all, then window and shift are clamped again. Changing the attention window would need
        the bias table resampled, which is not supported (ValueError); timm's model can be resized first
        and converted afterwards."""
        resolution = _checks.pair("nn.SwinTransformerBlock", "feat_size", feat_size, 1)
        window = _checks.pair("nn.SwinTransformerBlock", "window_size", window_size, 1)
        target_shift = self.target_shift_size
        if any(target_shift):
            target_shift = (window[0] // 2, window[1] // 2)
        old = (self.input_resolution, self.always_partition)
        self.input_resolution = resolution
        if always_partition is not None:
            self.always_partition = bool(always_partition)
        new_window, new_shift = self._calc_window_shift(window, target_shift)
        if new_window != self.attn.window_size:
            self.input_resolution, self.always_partition = old
            raise ValueError(f"fastops.nn.SwinTransformerBlock.set_input_size: the attention window would change "
                             f"from {self.attn.window_size} to {new_window}; resampling the relative position "
                             f"bias table is not supported")
        self.window_size, self.shift_size = new_window, new_shift
        self.attn.shift_size = new_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H, W, dim)."""
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"fastops.nn.SwinTransformerBlock: x must be (B, H, W, dim={self.dim}), got {shape}")
        # Fused, with the drop path an identity (eval), the shortcut is added in the epilogue of proj / fc2.
        if self.fused and acts_as_identity(self.drop_path1):
            x = self.attn(self.norm1(x), self.shift_size, residual=x)
        else:
            x = x + self.drop_path1(self.attn(self.norm1(x), self.shift_size))
        if self.fused and acts_as_identity(self.drop_path2):
            return self._mlp(self.norm2(x), residual=x)
        return x + self.drop_path2(self._mlp(self.norm2(x)))

    def _mlp(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """self.mlp(x) (+ residual); with the fused attention, a timm-layout GELU MLP (fc1 -> GELU -> drop ->
        [Identity norm] -> fc2 -> drop) runs fc1 + GELU and fc2 (+ residual, when drop2 is an identity) through
        :func:`fastops.nn.layers.linear_act`."""
        m = self.mlp
        if not (self.fused and type(getattr(m, "fc1", None)) is nn.Linear and type(getattr(m, "fc2", None)) is nn.Linear
                and type(getattr(m, "act", None)) is nn.GELU and m.act.approximate == "none"
                and isinstance(getattr(m, "norm", nn.Identity()), nn.Identity)
                and all(isinstance(getattr(m, d, None), nn.Dropout) for d in ("drop1", "drop2"))):
            y = m(x)
            return y if residual is None else residual + y
        return linear_drop_add(m.drop1(linear_act(x, m.fc1, "gelu")), m.fc2, m.drop2, residual)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, input_resolution={self.input_resolution}, window_size={self.window_size}, "
                f"shift_size={self.shift_size}")

    @staticmethod
    def is_convertible(m: nn.Module) -> bool:
        """True for a timm ``SwinTransformerBlock`` (exact type) whose ``attn`` is a convertible timm
        ``WindowAttention`` of the block's window, with ``norm1`` / ``norm2`` / ``mlp`` /
        ``drop_path1`` / ``drop_path2`` present (they are reused as they are). False without timm."""
        if not _timm_type(m, "timm.models.swin_transformer", "SwinTransformerBlock"):
            return False
        ws, ss = tuple(getattr(m, "window_size", ())), tuple(getattr(m, "shift_size", ()))
        return (all(isinstance(getattr(m, n, None), nn.Module)
                    for n in ("norm1", "norm2", "mlp", "drop_path1", "drop_path2"))
                and WindowAttention.is_convertible(getattr(m, "attn", None))
                and len(ws) == 2 and len(ss) == 2 and tuple(m.attn.window_size) == ws
                and 0 <= ss[0] < ws[0] and 0 <= ss[1] < ws[1])

    @classmethod
    def from_timm(cls, m: nn.Module, fused: bool = True) -> "SwinTransformerBlock":
        """A block sharing ``m``'s parameters (no copy): ``attn`` becomes a :class:`WindowAttention` on
        ``m.attn``'s tensors; ``norm1``, ``norm2``, ``mlp`` and the drop paths are ``m``'s own modules.
        Window and shift are taken over as ``m`` has them (already clamped)."""
        if not cls.is_convertible(m):
            raise ValueError(f"fastops.nn.SwinTransformerBlock.from_timm: not a supported timm "
                             f"SwinTransformerBlock: {m}")
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.dim = m.dim
        new.input_resolution = tuple(m.input_resolution) if not isinstance(m.input_resolution, int) \
            else (m.input_resolution, m.input_resolution)
        new.target_shift_size = tuple(getattr(m, "target_shift_size", m.shift_size))
        new.always_partition = bool(getattr(m, "always_partition", False))
        new.dynamic_mask = bool(getattr(m, "dynamic_mask", False))
        new.window_size, new.shift_size = tuple(m.window_size), tuple(m.shift_size)
        new.window_area = new.window_size[0] * new.window_size[1]
        new.mlp_ratio = getattr(m, "mlp_ratio", 4.0)
        new.norm1 = m.norm1
        new.attn = WindowAttention.from_timm(m.attn, fused=fused)
        new.attn.shift_size = new.shift_size
        new.drop_path1 = m.drop_path1
        new.norm2 = m.norm2
        new.mlp = m.mlp
        new.drop_path2 = m.drop_path2
        new.train(m.training)
        return new
