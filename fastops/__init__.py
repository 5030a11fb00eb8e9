"""fastops: fused Triton / CUDA C++ / CPU C++ kernels for vision models, registered as torch custom ops.

Public ops (drop-in functions):
    depthwise_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1)
    squeeze_excite(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act)
    conv1x1_squeeze_excite(x, weight, bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, act, gate, residual, out_act)
    cbam(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, conv_weight, bn_weight, bn_bias, ...)
    window_attention(qkv, num_heads, window_size, shift_size=0, rel_pos_bias=None, scale=None, pad_qkv=None)
    sr_attention(q, kv, num_heads, scale=None)
    spatial_reduction(x, feat_size, sr_weight, sr_bias, norm_weight, norm_bias, sr_ratio, linear=False, eps=1e-5)
    conv_bn_act(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, stride, padding, dilation,
                groups, act="relu", residual=None, training=False, momentum=0.1)
    conv_bias_act(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, act="none", residual=None)
    bn_act(x, weight, bias, running_mean, running_var, eps=1e-5, act="relu", residual=None, training=False)

Modules: fastops.nn.DepthwiseConv2d. Model conversion: fastops.optimize(model).
Backends and why each can or cannot run: ``python -m fastops info``.
"""
__version__ = "0.1.0"

from . import _ext  # noqa: F401  (loads fastops._C if it can)
from . import backends  # noqa: F401
from .backends import BackendUnavailable, use_backend  # noqa: F401
from .ops import (bn_act, cbam, conv1x1_squeeze_excite, conv_bias_act, conv_bn_act, depthwise_conv2d,  # noqa: F401
                  spatial_reduction, squeeze_excite, sr_attention, window_attention)
from . import nn  # noqa: F401
from .optimize import optimize  # noqa: F401
from .info import info  # noqa: F401
