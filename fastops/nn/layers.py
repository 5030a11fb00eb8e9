"""Small building blocks the fastops modules and models share."""
import torch
import torch.nn as nn


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath`` with ``scale_by_keep=True``); identity in eval.
    Draws one Bernoulli value per sample, in the same order and shape as timm, so a seeded run drops the
    same samples."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        return x * mask

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"
