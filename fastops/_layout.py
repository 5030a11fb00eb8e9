"""Tensor layout helpers shared by every op (the C++ twin is csrc/common.h)."""
import torch


def is_channels_last(t: torch.Tensor) -> bool:
    """True when a 4-D tensor is channels_last and not also plain contiguous (same rule as the kernels)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(t) else torch.contiguous_format
