"""Batched affine warps that reproduce torchvision.transforms.functional.affine on tensors bit for bit.

torchvision's tensor path (torchvision 0.29, transforms/functional.py `affine`, _functional_tensor.py
`_gen_affine_grid` / `_apply_grid_transform`) works like this, and so do we:

1. The inverse matrix is computed in Python doubles by `_get_inverse_affine_matrix(center, angle, translate,
   scale, shear)`, with `center` measured from the image centre (tensor path: (0, 0) unless a center is given,
   then center - size/2), so a pixel column j sits at x = j + 0.5 - W/2 (pixel centres, origin at the image
   centre); `inverse_affine_matrix` below is the same arithmetic, in the same order.
2. The six numbers become a float32 theta (1, 2, 3); the output grid is the float32 product
   [x, y, 1] @ (theta^T / [W/2, H/2]) with x = linspace(-W/2 + 0.5, W/2 - 0.5, W) (same for y),
   i.e. source coordinates normalized to [-1, 1] for grid_sample(align_corners=False).
3. grid_sample(mode='nearest', padding_mode='zeros'); a fill value is applied through an extra all-ones channel
   sampled alongside the image: where it comes back < 0.5 the pixel takes `fill`.
4. Integer images are cast to float32 first and rounded back (exact for nearest sampling).

We batch step 2 as one (B, H*W, 3) @ (B, 3, 2) bmm with per-image thetas; every float32 operation is the same
as torchvision's, so results are identical (tests/test_transforms_affine.py checks it on odd sizes too).
Matrices come from small tables of the discrete parameter values (Python doubles, like torchvision), so no
per-image Python runs.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def inverse_affine_matrix(center: Sequence[float], angle: float, translate: Sequence[float], scale: float,
                          shear: Sequence[float]) -> list[float]:
    """The 6 numbers of the inverse affine map (output pixel -> source pixel), torchvision's convention.

    center, translate in pixels (center relative to the image centre); angle and shear in degrees.
    """
    rot = math.radians(angle)
    sx = math.radians(shear[0])
    sy = math.radians(shear[1])
    cx, cy = center
    tx, ty = translate
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    matrix = [d, -b, 0.0, -c, a, 0.0]
    matrix = [x / scale for x in matrix]
    matrix[2] += matrix[0] * (-cx - tx) + matrix[1] * (-cy - ty)
    matrix[5] += matrix[3] * (-cx - tx) + matrix[4] * (-cy - ty)
    matrix[2] += cx
    matrix[5] += cy
    return matrix


@lru_cache(maxsize=64)
def _half_size(height: int, width: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """(2,) [W/2, H/2] on the device, made once (a tensor from Python numbers per call is a host copy)."""
    return torch.tensor([0.5 * width, 0.5 * height], dtype=dtype).to(device)


def affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """theta (B, 2, 3) float32 inverse matrices -> grid (B, H, W, 2) for grid_sample(align_corners=False)."""
    b = theta.shape[0]
    dev, dtype = theta.device, theta.dtype
    base = torch.empty(1, height, width, 3, dtype=dtype, device=dev)
    base[..., 0].copy_(torch.linspace(-width * 0.5 + 0.5, width * 0.5 + 0.5 - 1, steps=width, device=dev))
    base[..., 1].copy_(torch.linspace(-height * 0.5 + 0.5, height * 0.5 + 0.5 - 1, steps=height,
                                      device=dev).unsqueeze_(-1))
    base[..., 2].fill_(1)
    rescaled = theta.transpose(1, 2) / _half_size(height, width, dtype, str(dev))
    grid = base.view(1, height * width, 3).expand(b, height * width, 3).bmm(rescaled)
    return grid.view(b, height, width, 2)


def warp_nearest(images: torch.Tensor, theta: torch.Tensor, fill: Optional[float] = None) -> torch.Tensor:
    """Warp each image (B, C, H, W) by its own inverse matrix theta (B, 2, 3), nearest sampling.

    fill=None leaves outside pixels 0 (torchvision's fill=None); a number fills them with that value (in the
    images' own units). uint8 in, uint8 out; float in, float out (computed in float32 unless float64).
    """
    b, c, h, w = images.shape
    if b == 0:
        return images
    work = images.dtype if images.dtype in (torch.float32, torch.float64) else torch.float32
    x = images.to(work)
    grid = affine_grid(theta.to(work), h, w)
    if fill is not None:
        x = torch.cat((x, torch.ones((b, 1, h, w), dtype=work, device=x.device)), dim=1)
    out = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    if fill is not None:
        out, inside = out[:, :-1], out[:, -1:]
        out = torch.where(inside < 0.5, float(fill), out)
    if not images.dtype.is_floating_point:
        out = torch.round(out)
    return out.to(images.dtype)


def theta_table(matrices: Sequence[Sequence[float]], device: torch.device | str) -> torch.Tensor:
    """A list of 6-number matrices (Python doubles) -> (K, 2, 3) float32, rounded exactly as torchvision does."""
    return torch.tensor(matrices, dtype=torch.float64).to(torch.float32).view(-1, 2, 3).to(device)
