"""Public ops: argument checks, backend choice, and the fake / autograd registrations."""
from .depthwise_conv2d import depthwise_conv2d  # noqa: F401
