"""Plain-PyTorch references: the oracles for tests and the ``eager`` provider in benchmarks."""
from .cbam import cbam  # noqa: F401
from .depthwise_conv2d import depthwise_conv2d  # noqa: F401
from .squeeze_excite import conv1x1_squeeze_excite, squeeze_excite  # noqa: F401
from .window_attention import window_attention  # noqa: F401
from .spatial_reduction import spatial_reduction  # noqa: F401
from .sr_attention import sr_attention  # noqa: F401
from .bn_act import BN_ACTS, bn_act  # noqa: F401
from .conv_bias_act import conv_bias_act, conv_bn_act  # noqa: F401
