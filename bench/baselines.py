"""Eager baselines that are timm modules' own forward code, with the parameters passed as arguments.

The harness times every provider as a function of the case's tensors, parameters included, so that a
``fwd+bwd`` case computes the same gradients in each. These functions run the ops of timm's forward
methods one for one (``nn.Conv2d`` is ``F.conv2d`` on its weight, ``nn.ReLU(inplace=True)`` is
``F.relu(..., inplace=True)``, timm's sigmoid gate is ``torch.sigmoid``, ``BatchNormAct2d`` without an act is
``F.batch_norm``). fastops.reference holds the same math for the correctness tests, written for clarity
(its channel MLPs are ``F.linear`` calls, faster on a CPU than timm's 1x1 convs of a 1x1 map), so it is
not what a timm user runs. tests/test_bench_baselines.py checks these against the timm modules.
"""
import torch
import torch.nn.functional as F


def timm_se(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
    """``timm.layers.SEModule.forward`` (norm_layer None, ReLU, sigmoid gate); fc weights (R, C, 1, 1), (C, R, 1, 1)."""
    x_se = x.mean((2, 3), keepdim=True)
    x_se = F.conv2d(x_se, fc1_weight, fc1_bias)
    x_se = F.relu(x_se, inplace=True)
    x_se = F.conv2d(x_se, fc2_weight, fc2_bias)
    return x * torch.sigmoid(x_se)


def timm_se_bottleneck_tail(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias, shortcut):
    """The end of timm's ``Bottleneck.forward`` in seresnet50: ``x = self.se(x); x += shortcut; x = self.act3(x)``."""
    x = timm_se(x, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    x += shortcut
    return F.relu(x, inplace=True)


def timm_cbam(x, fc1_weight, fc2_weight, conv_weight, bn_weight, bn_bias, bn_mean, bn_var, training, momentum,
              eps):
    """``timm.layers.CbamModule.forward``: ``ChannelAttn`` (fc1 / fc2 1x1 convs without bias, ReLU, sigmoid
    gate) then ``SpatialAttn`` (``ConvNormAct(2, 1, k, apply_act=False)``: a k x k conv without bias, then
    BatchNorm2d(1), then the sigmoid gate). In training the BN updates bn_mean / bn_var in place."""
    def mlp(p):
        return F.conv2d(F.relu(F.conv2d(p, fc1_weight), inplace=True), fc2_weight)

    x = x * torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    x_attn = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
    x_attn = F.conv2d(x_attn, conv_weight, None, 1, conv_weight.shape[-1] // 2)
    x_attn = F.batch_norm(x_attn, bn_mean, bn_var, bn_weight, bn_bias, training, momentum, eps)
    return x * torch.sigmoid(x_attn)
