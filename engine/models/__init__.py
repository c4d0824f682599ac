"""Registry of small-data model configs, timm style: `create_model("vit_cifar", num_classes=10)`.

Every model returns a `ModelOutput` from `forward_with_tokens(x)`: the class logits and the last block's tokens
before the final norm, so auxiliary tasks never need a second forward pass for their features.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@dataclass
class ModelOutput:
    """logits: (B, num_classes). tokens: (B, num_prefix + k*k, C) last block, before the final norm.
    num_prefix: leading non-patch tokens (CLS) in `tokens`. grid: k, the patch grid side."""
    logits: torch.Tensor
    tokens: torch.Tensor
    num_prefix: int
    grid: int

    @property
    def patch_tokens(self) -> torch.Tensor:
        """(B, k*k, C) patch tokens in row-major grid order."""
        return self.tokens[:, self.num_prefix:]


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    _REGISTRY[fn.__name__] = fn
    return fn


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; raises KeyError naming the valid names."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown model '{name}' (registered: {', '.join(list_models())})")
    return _REGISTRY[name](**kwargs)


from engine.models import vit  # noqa: E402,F401  (registers)
