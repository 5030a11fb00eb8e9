"""Public ops: argument checks, backend choice, and the fake / autograd registrations."""
from .cbam import cbam  # noqa: F401
from .depthwise_conv2d import depthwise_conv2d  # noqa: F401
from .squeeze_excite import conv1x1_squeeze_excite, squeeze_excite  # noqa: F401
from .window_attention import window_attention  # noqa: F401
from .spatial_reduction import spatial_reduction  # noqa: F401
from .sr_attention import sr_attention  # noqa: F401
from .bn_act import bn_act  # noqa: F401
from .conv_bn_act import conv_bias_act, conv_bn_act  # noqa: F401
