"""Batched pad-crop, flip and normalization: batch in, batch out, no per-image Python.

Images are (B, C, H, W) tensors; crop/flip work on uint8 or float, normalize turns uint8 into float.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loaders.transforms.rng import randint, uniform


def random_crop(images: torch.Tensor, keys: torch.Tensor, padding: int, slot: int = 0,
                fill: float = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad by `padding` pixels on each side, then crop back to (H, W) at a random offset per image.

    Returns the cropped images (B, C, H, W) and the offsets (B, 2) int64 (top, left) in the padded image,
    each uniform in 0..2*padding (torchvision's RandomCrop(size, padding) draws the same way).
    """
    if padding == 0:
        return images, torch.full((images.shape[0], 2), 0, dtype=torch.int64, device=images.device)
    b, c, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding), value=fill)
    offsets = randint(keys, slot, 2 * padding + 1, n=2)                           # (B, 2): top, left
    rows = (offsets[:, 0, None] + torch.arange(h, device=images.device))        # (B, H)
    cols = (offsets[:, 1, None] + torch.arange(w, device=images.device))        # (B, W)
    wp = w + 2 * padding
    flat = padded.reshape(b, c, -1)
    gather = (rows[:, :, None] * wp + cols[:, None, :]).reshape(b, 1, h * w).expand(b, c, h * w)
    return torch.gather(flat, 2, gather).reshape(b, c, h, w), offsets


def random_flip(images: torch.Tensor, keys: torch.Tensor, slot: int = 2, p: float = 0.5
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror each image left-right with probability p. Returns images and the (B,) bool mask of flipped ones."""
    flip = uniform(keys, slot)[:, 0] < p
    return torch.where(flip[:, None, None, None], images.flip(3), images), flip


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, C, H, W) in 0..255 -> float (x/255 - mean) / std; mean and std are (C,) fractions of 255."""
    x = images.to(torch.float32) * (1.0 / 255.0)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.to(dtype)
