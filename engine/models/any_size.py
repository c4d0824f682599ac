"""Running a model's layers on images of another size than the one it was built for (DINO's local crops): the
patch embedding without its built-size check, and attributes switched for the duration of one call."""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn


def embed_patches(patch_embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, C), or (B, H/p, W/p, C) for an NHWC (Swin) embedding, at any H, W divisible by the
    patch: the same layers as patch_embed.forward with its `strict_img_size` check off."""
    p = patch_embed.patch_size[0]
    h, w = x.shape[-2:]
    if h % p or w % p:
        raise ValueError(f"crop of {h}x{w} px is not divisible by the patch size {p}")
    with attributes([(patch_embed, "strict_img_size", False)]):
        return patch_embed(x)


@contextlib.contextmanager
def attributes(settings: Sequence[tuple[object, str, object]]) -> Iterator[None]:
    """Set (object, attribute, value) triples for the duration of a with-block, then restore them."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    try:
        for obj, name, value in settings:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)
