"""The model registry and the output every registered model's `forward_with_tokens` returns; engine.models
re-exports both (the family modules import them from here, so they do not import their own package back)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


@dataclass
class ModelOutput:
    """logits: (B, num_classes). tokens: (B, num_prefix + k*k, C) last block, before the final norm.
    num_prefix: leading non-patch tokens (CLS) in `tokens`. grid: k, the patch grid side.
    features: (B, N, C) the tokens a task that pools the last block averages, when they differ from `tokens`
    (Swin: the final-normed last stage, METHODS.md A); None means `tokens` (ViT, CaiT: all tokens incl. CLS,
    before the final norm)."""
    logits: torch.Tensor
    tokens: torch.Tensor
    num_prefix: int
    grid: int
    features: Optional[torch.Tensor] = None

    @property
    def patch_tokens(self) -> torch.Tensor:
        """(B, k*k, C) patch tokens in row-major grid order."""
        return self.tokens[:, self.num_prefix:]

    @property
    def perception_tokens(self) -> torch.Tensor:
        """(B, N, C) what a task pooling the last block averages over N (`features`, else `tokens`)."""
        return self.tokens if self.features is None else self.features

    def split(self, n: int) -> list["ModelOutput"]:
        """Split a forward over n stacked views of one batch (along B) into n outputs, every field included."""
        if n == 1:
            return [self]
        logits, tokens = self.logits.chunk(n), self.tokens.chunk(n)
        features = self.features.chunk(n) if self.features is not None else [None] * n
        return [ModelOutput(logits=lg, tokens=tk, num_prefix=self.num_prefix, grid=self.grid, features=ft)
                for lg, tk, ft in zip(logits, tokens, features)]


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
