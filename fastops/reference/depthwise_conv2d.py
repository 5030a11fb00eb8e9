import torch
import torch.nn.functional as F

from .._layout import memory_format_of


def depthwise_conv2d(x, weight, bias, stride, padding, dilation):
    """F.conv2d(groups=C) with explicit padding = (top, left, bottom, right); output in x's layout."""
    top, left, bottom, right = padding
    if top == bottom and left == right:
        y = F.conv2d(x, weight, bias, tuple(stride), (top, left), tuple(dilation), groups=x.shape[1])
    else:
        y = F.conv2d(F.pad(x, (left, right, top, bottom)), weight, bias, tuple(stride), 0, tuple(dilation),
                     groups=x.shape[1])
    return y.contiguous(memory_format=memory_format_of(x))
