"""Argument checks shared by the public ops. Every error names the argument and what was expected."""
import math
from typing import Optional, Sequence, Tuple

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tensor(op: str, name: str, t, ndim: int = None, dtypes=FLOAT_DTYPES, shape_doc: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastops.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"fastops.{op}: {name} must be {ndim}-D {shape_doc}, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"fastops.{op}: {name} must have a floating dtype ({names}), got {t.dtype}")


def positive_dim(op: str, name: str, t: torch.Tensor, dim: int, label: str) -> None:
    """``t.shape[dim] >= 1``: the kernels (and F.conv2d / F.batch_norm on some paths) reject or mishandle an
    empty channel dimension, so it is refused here the same way on every backend."""
    if t.shape[dim] < 1:
        raise ValueError(f"fastops.{op}: {name} must have {label} >= 1, got shape {tuple(t.shape)}")


def kernel_size(op: str, name: str, weight: torch.Tensor, maximum: Optional[int] = None) -> Tuple[int, int]:
    """(kh, kw) of a conv weight (its last two dims), each in 1..maximum (or >= 1)."""
    kh, kw = weight.shape[-2], weight.shape[-1]
    if min(kh, kw) < 1 or (maximum is not None and max(kh, kw) > maximum):
        bound = ">= 1" if maximum is None else f"within 1..{maximum}"
        raise ValueError(f"fastops.{op}: {name} kernel size must be {bound}, got {kh}x{kw} "
                         f"(shape {tuple(weight.shape)})")
    return kh, kw


def positive_finite(op: str, name: str, v) -> float:
    # bool is an int to isinstance, and inf / nan pass a plain `> 0` test; both would give garbage silently.
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
        raise ValueError(f"fastops.{op}: {name} must be a positive finite float, got {v!r}")
    return float(v)


def flag(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"fastops.{op}: {name} must be a bool, got {v!r}")
    return v


def batch_norm_options(op: str, eps, training, momentum, eps_name: str = "eps") -> None:
    """BatchNorm's scalars as every op with a BN takes them: eps positive and finite, training a bool, and
    (training only, as F.batch_norm uses it only then) momentum in [0, 1]."""
    positive_finite(op, eps_name, eps)
    flag(op, "training", training)
    if training and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                     or not 0.0 <= momentum <= 1.0):
        raise ValueError(f"fastops.{op}: momentum must be a float in [0, 1], got {momentum!r}")


def same_device_dtype(op: str, ref_name: str, ref: torch.Tensor, name: str, t: torch.Tensor) -> None:
    if t.device != ref.device:
        raise ValueError(f"fastops.{op}: {name} is on {t.device} but {ref_name} is on {ref.device}; "
                         f"expected both on one device")
    if t.dtype != ref.dtype:
        raise TypeError(f"fastops.{op}: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; expected the same")


# Upper bound of a convolution's stride, padding and dilation: the kernels' int64 offsets and buffer sizes
# (a padded plane, its phases) stay far from overflowing, where 2**61 overflowed them.
MAX_CONV_ARG = 1 << 20


def pair(op: str, name: str, v, minimum: int, maximum: Optional[int] = None) -> Tuple[int, int]:
    # Fast path for the usual int / tuple / list of ints (the generic check below, with typing.Sequence, cost
    # a few microseconds a call, comparable to a small layer's kernel).
    t = type(v)
    if t is int:
        if v >= minimum and (maximum is None or v <= maximum):
            return v, v
    elif (t is tuple or t is list) and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        if min(v) >= minimum and (maximum is None or max(v) <= maximum):
            return v[0], v[1]
    if isinstance(v, int) and not isinstance(v, bool):
        v = (v, v)
    if (not isinstance(v, Sequence) or len(v) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)):
        raise TypeError(f"fastops.{op}: {name} must be an int or a pair of ints, got {v!r}")
    if min(v) < minimum:
        raise ValueError(f"fastops.{op}: {name} must be >= {minimum}, got {tuple(v)}")
    if maximum is not None and max(v) > maximum:
        raise ValueError(f"fastops.{op}: {name} must be <= {maximum}, got {tuple(v)}")
    return int(v[0]), int(v[1])


def _autocasting(device_type: str) -> bool:
    return device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type)


def _cast(tensors, dt):
    # autocast never casts float64 (torch's own ops keep it)
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def autocast_inputs(device_type: str, *tensors):
    """Under torch.autocast, run in the autocast dtype like conv2d does (parameters are usually fp32)."""
    if _autocasting(device_type):
        return _cast(tensors, torch.get_autocast_dtype(device_type))
    return tensors


def autocast_to_x(device_type: str, x: torch.Tensor, *tensors):
    """Under torch.autocast, for the ops autocast leaves in their input's dtype (batch_norm; SE and CBAM,
    whose timm modules end in ``x * gate``, so their output has x's dtype): x is left as it is and the other
    tensors (fp32 parameters next to a half activation, a shortcut of another dtype) are cast to x's dtype."""
    if _autocasting(device_type) and x.dtype != torch.float64:
        return _cast(tensors, x.dtype)
    return tensors


def conv_padding(op: str, padding, kh: int, kw: int, stride, dilation):
    """int / pair / "same" / "valid" -> [top, left, bottom, right] (PyTorch's "same": extra pad at the end)."""
    if isinstance(padding, str):
        if padding == "valid":
            return [0, 0, 0, 0]
        if padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError(f"fastops.{op}: padding='same' needs stride 1 (as in F.conv2d), got stride={stride}")
            th, tw = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
            return [th // 2, tw // 2, th - th // 2, tw - tw // 2]
        raise ValueError(f"fastops.{op}: padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(op, "padding", padding, 0, MAX_CONV_ARG)
    return [ph, pw, ph, pw]


def conv_output_hw(h, w, kh, kw, stride, padding, dilation):
    """Output height and width of a convolution with padding [top, left, bottom, right]."""
    top, left, bottom, right = padding
    oh = (h + top + bottom - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + left + right - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def dilated_kernel_fits(op: str, x: torch.Tensor, kh: int, kw: int, pad, dilation) -> None:
    eff_h, eff_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    if x.shape[2] + pad[0] + pad[2] < eff_h or x.shape[3] + pad[1] + pad[3] < eff_w:
        raise ValueError(f"fastops.{op}: the dilated kernel ({eff_h}x{eff_w}) is larger than the padded input "
                         f"x ({x.shape[2] + pad[0] + pad[2]}x{x.shape[3] + pad[1] + pad[3]})")
