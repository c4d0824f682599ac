"""The DINO projection head (METHODS.md B): an MLP to a bottleneck, L2-normalised, then a weight-normed linear layer
to the prototype logits.

    Linear(D, 512) GELU Linear(512, 512) GELU Linear(512, 256) -> L2-normalise -> WN-Linear(256, 1024, no bias)

The weight norm is written out (`weight = weight_g * weight_v / ||weight_v||` per output row) rather than through
torch.nn.utils.weight_norm, whose parametrisation renames the parameters; the names here are DINO's
(`last_layer.weight_g`, `last_layer.weight_v`). With `norm_last_layer` (DINO's default) weight_g is fixed at 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class WeightNormLinear(nn.Module):
    """Linear without bias whose rows are v / ||v|| scaled by g: (B, in) -> (B, out)."""

    def __init__(self, in_dim: int, out_dim: int, fix_norm: bool = True):
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight_v, std=0.02)
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1), requires_grad=not fix_norm)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """(B, in_dim) backbone features -> (B, out_dim) prototype logits (before any temperature)."""

    def __init__(self, in_dim: int, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 256,
                 norm_last_layer: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim),
                                 nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fix_norm=norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """What DINO freezes in the first epoch(s) (only the trainable ones)."""
        return [p for p in self.last_layer.parameters() if p.requires_grad]
