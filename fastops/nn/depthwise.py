import torch.nn as nn

from ..ops.depthwise_conv2d import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(C, C, kernel_size, groups=C)`` whose forward is :func:`fastops.depthwise_conv2d`.

    Same parameters and state_dict keys (``weight`` (C, 1, kh, kw), ``bias`` (C,)) as the nn.Conv2d it
    replaces, so checkpoints load unchanged. Only ``padding_mode="zeros"`` is supported.
    """

    def __init__(self, channels, kernel_size, stride=1, padding=0, dilation=1, bias=True, device=None, dtype=None):
        super().__init__(channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=channels, bias=bias, device=device, dtype=dtype)

    @staticmethod
    def is_convertible(conv: nn.Module) -> bool:
        """A plain nn.Conv2d (not a subclass with its own forward) that is depthwise with zero padding."""
        return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
                and conv.padding_mode == "zeros")

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> "DepthwiseConv2d":
        """A DepthwiseConv2d sharing ``conv``'s parameters (no copy)."""
        if not cls.is_convertible(conv):
            raise ValueError(f"fastops.nn.DepthwiseConv2d.from_conv: conv must be a depthwise nn.Conv2d "
                             f"(groups == in_channels == out_channels, padding_mode='zeros'), got {conv}")
        new = cls(conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  bias=conv.bias is not None, device="meta")
        new.weight = conv.weight
        new.bias = conv.bias
        new.train(conv.training)
        return new

    def forward(self, x):
        return depthwise_conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)
