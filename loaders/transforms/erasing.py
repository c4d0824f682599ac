"""Random erasing after normalization, batched: the reference repos' version (Zhong et al., utils/random_erasing.py).

Per image, with probability p: up to `attempts` tries of target area U(sl, sh) * H*W and aspect U(r1, 1/r1);
h = round(sqrt(area * aspect)), w = round(sqrt(area / aspect)); the first try with h < H and w < W erases the
rectangle at top U{0..H-h}, left U{0..W-w} (inclusive). The reference tries 100 times; all tries are drawn at
once here and the first accepted one is taken (same distribution; we draw `attempts` = 100 too).

Fill modes (`fill`):
- 'reference': the per-channel dataset mean as fractions of 255 (e.g. 0.4914) written into the *normalized*
  image — what the reference does (`mean=data_info['stat'][0]`), a quirk kept as the faithful default;
- 'const': 0.0, i.e. the dataset mean after normalization (timm RandomErasing mode='const');
- 'pixel': per-pixel standard normal noise (timm mode='pixel').
Slots: 64 apply, 65.. tries (area, aspect, top, left per try), noise from the `view`-shifted keys.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from loaders.transforms.rng import hash32, uniform

SLOT_ERASE = 64


def erase_params(keys: torch.Tensor, height: int, width: int, p: float = 0.25, sl: float = 0.02, sh: float = 0.4,
                 r1: float = 0.3, attempts: int = 100) -> torch.Tensor:
    """(B, 4) int64 boxes (top, left, h, w); h = w = 0 where nothing is erased."""
    apply = uniform(keys, SLOT_ERASE, 1)[:, 0] <= p
    u = uniform(keys, SLOT_ERASE + 1, 4 * attempts).to(torch.float64).view(-1, attempts, 4)
    area = (sl + (sh - sl) * u[..., 0]) * (height * width)
    aspect = r1 + (1.0 / r1 - r1) * u[..., 1]
    h = torch.round(torch.sqrt(area * aspect)).to(torch.int64)
    w = torch.round(torch.sqrt(area / aspect)).to(torch.int64)
    ok = (w < width) & (h < height)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    found = ok.gather(1, first)[:, 0] & apply
    h = h.gather(1, first)[:, 0]
    w = w.gather(1, first)[:, 0]
    top = torch.minimum((u[..., 2].gather(1, first)[:, 0] * (height - h + 1)).to(torch.int64), height - h)
    left = torch.minimum((u[..., 3].gather(1, first)[:, 0] * (width - w + 1)).to(torch.int64), width - w)
    zero = torch.zeros_like(h)
    return torch.stack([torch.where(found, top, zero), torch.where(found, left, zero),
                        torch.where(found, h, zero), torch.where(found, w, zero)], dim=1)


def erase_mask(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, 4) boxes -> (B, 1, H, W) bool."""
    rows = torch.arange(height, device=boxes.device)
    cols = torch.arange(width, device=boxes.device)
    r = (rows[None, :] >= boxes[:, :1]) & (rows[None, :] < boxes[:, :1] + boxes[:, 2:3])
    c = (cols[None, :] >= boxes[:, 1:2]) & (cols[None, :] < boxes[:, 1:2] + boxes[:, 3:4])
    return (r[:, :, None] & c[:, None, :])[:, None]


def random_erase(images: torch.Tensor, keys: torch.Tensor, p: float = 0.25, fill: str = "reference",
                 mean: Sequence[float] | torch.Tensor | None = None, sl: float = 0.02, sh: float = 0.4,
                 r1: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """images (B, C, H, W) float normalized -> (erased images, boxes (B, 4) int64 (top, left, h, w))."""
    b, c, h, w = images.shape
    boxes = erase_params(keys, h, w, p, sl, sh, r1)
    mask = erase_mask(boxes, h, w)
    if fill == "reference":
        if mean is None:
            raise ValueError("random erasing fill 'reference' needs the dataset mean (fractions of 255)")
        value = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, c, 1, 1)
    elif fill == "const":
        value = torch.zeros((), dtype=images.dtype, device=images.device)
    elif fill == "pixel":
        pix = torch.arange(c * h * w, device=images.device, dtype=torch.int64)
        bits = hash32(hash32(keys[:, None] ^ 0x5EED) ^ pix[None, :])              # (B, C*H*W) 32-bit
        bits2 = hash32(bits ^ 0x9E3779B9)
        u1 = (bits >> 8).to(torch.float32) * (1.0 / (1 << 24)) + 2.0 ** -25
        u2 = (bits2 >> 8).to(torch.float32) * (1.0 / (1 << 24))
        value = (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).view(b, c, h, w).to(images.dtype)
    else:
        raise ValueError(f"data.erasing_fill: expected reference, const or pixel, got {fill!r}")
    return torch.where(mask, value, images), boxes


def random_erase_reference(image: torch.Tensor, box: Sequence[int], mean: Sequence[float]) -> torch.Tensor:
    """The reference's per-image fill on a given box (top, left, h, w): for tests."""
    out = image.clone()
    top, left, h, w = (int(v) for v in box)
    for ch in range(out.shape[0]):
        out[ch, top:top + h, left:left + w] = mean[ch]
    return out
