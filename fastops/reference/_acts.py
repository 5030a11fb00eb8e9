"""The activations the SE / CBAM ops take by name, as plain PyTorch (the oracle's definitions)."""
import torch
import torch.nn.functional as F

ACTS = {
    "relu": F.relu,
    "silu": F.silu,
    "gelu": F.gelu,  # exact (erf) GELU, as nn.GELU()
}
GATES = {
    "sigmoid": torch.sigmoid,
    "hard_sigmoid": lambda z: F.relu6(z + 3.0) / 6.0,  # timm's hard_sigmoid
}
OUT_ACTS = {
    "none": lambda y: y,
    "relu": F.relu,
}
