"""Drop-in modules whose forward calls fastops ops; state_dicts match the torch / timm modules they replace."""
from .depthwise import DepthwiseConv2d  # noqa: F401
from .attention import CbamModule, SqueezeExcite  # noqa: F401
from .window_attention import SwinTransformerBlock, WindowAttention  # noqa: F401
from .pvt import MlpWithDepthwiseConv, SRAttention  # noqa: F401
from .conv_bn import (BNAct, BNFoldCache, ConvBNAct, bn_act_module, conv_bn_act_modules,  # noqa: F401
                      conv_bn_se_fusable, conv_bn_se_modules)
