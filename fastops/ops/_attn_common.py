"""Pieces shared by the channel-attention ops (squeeze_excite, cbam): activation names, the MLP weight
checks and input layout normalisation."""
import torch

from .._layout import memory_format_of
from . import _checks

ACTS = ("relu", "silu", "gelu")
GATES = ("sigmoid", "hard_sigmoid")
OUT_ACTS = ("none", "relu")


def acc_dtype(x: torch.Tensor) -> torch.dtype:
    """dtype of the kernels' saved statistics (pooled, spatial, stats): fp32, or fp64 for float64 inputs."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def choice(op, name, value, allowed):
    if value is None and "none" in allowed:
        return "none"
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"fastops.{op}: {name} must be one of {allowed}, got {value!r}")
    return value


def dense(x: torch.Tensor) -> torch.Tensor:
    """x itself if it is NCHW- or channels_last-contiguous (the layouts the kernels read), else an NCHW copy."""
    if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last):
        return x
    return x.contiguous()


def like_x(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=memory_format_of(x))


def mlp_weights(op, C, fc1_weight, fc1_bias, fc2_weight, fc2_bias, x, c_from="x.shape[1]"):
    """Check the channel MLP's parameters and return them flattened: (R, C), (R,)|None, (C, R), (C,)|None.

    The weights may be given as the 1x1 conv weights timm uses: (R, C, 1, 1) and (C, R, 1, 1). ``c_from``
    names where C comes from, for the error messages."""
    _checks.tensor(op, "fc1_weight", fc1_weight, None)
    _checks.tensor(op, "fc2_weight", fc2_weight, None)
    w1 = fc1_weight.flatten(1) if fc1_weight.dim() == 4 and fc1_weight.shape[2:] == (1, 1) else fc1_weight
    w2 = fc2_weight.flatten(1) if fc2_weight.dim() == 4 and fc2_weight.shape[2:] == (1, 1) else fc2_weight
    if w1.dim() != 2 or w1.shape[1] != C or w1.shape[0] < 1:
        raise ValueError(f"fastops.{op}: fc1_weight must have shape (R, C) or (R, C, 1, 1) with C = {C} "
                         f"({c_from}), got {tuple(fc1_weight.shape)}")
    R = w1.shape[0]
    if w2.dim() != 2 or tuple(w2.shape) != (C, R):
        raise ValueError(f"fastops.{op}: fc2_weight must have shape (C, R) = ({C}, {R}) or ({C}, {R}, 1, 1), "
                         f"got {tuple(fc2_weight.shape)}")
    for name, t, n in (("fc1_bias", fc1_bias, R), ("fc2_bias", fc2_bias, C)):
        if t is not None:
            _checks.tensor(op, name, t, 1, shape_doc=f"({n},)")
            if t.shape[0] != n:
                raise ValueError(f"fastops.{op}: {name} must have shape ({n},), got {tuple(t.shape)}")
            _checks.same_device_dtype(op, "x", x, name, t)
    _checks.same_device_dtype(op, "x", x, "fc1_weight", w1)
    _checks.same_device_dtype(op, "x", x, "fc2_weight", w2)
    return (w1.contiguous(), None if fc1_bias is None else fc1_bias.contiguous(), w2.contiguous(),
            None if fc2_bias is None else fc2_bias.contiguous())
