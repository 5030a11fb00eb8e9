"""Plain-PyTorch references: the oracles for tests and the ``eager`` provider in benchmarks."""
from .depthwise_conv2d import depthwise_conv2d  # noqa: F401
