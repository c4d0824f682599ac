"""Absolute position embeddings: their initialisation and their resizing to another patch grid.

Init: the references' learned embedding starts as trunc-normal noise (std 0.02); `model.pos_embed_init: sincos`
starts it instead as a fixed 2-D sin-cos grid (still trained), which gives the model the patch layout from step 0
(a named deviation, used by the CPU demo, off in every reference recipe).
Resize: DINO's bicubic interpolation (local crops, fine-tuning at another size), or B's CaiT truncation.
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

PosEmbedResize = Literal["interpolate", "truncate"]
POS_EMBED_RESIZES = ("interpolate", "truncate")


def sincos_grid(k: int, dim: int) -> torch.Tensor:
    """(k*k, dim) 2-D sin-cos position codes, row-major grid order: rows in the first half of the channels,
    columns in the second; frequencies 10^(-i / (dim/4)) for i < dim/4 (dim/4 sin and dim/4 cos per axis)."""
    if dim % 4:
        raise ValueError(f"sin-cos position codes need a channel count divisible by 4, got {dim}")
    freqs = 1.0 / 10.0 ** (torch.arange(dim // 4).float() / (dim // 4))
    axis = torch.arange(k).float()[:, None] * freqs[None]
    code = torch.cat([torch.sin(axis), torch.cos(axis)], dim=1)                       # (k, dim/2)
    return torch.cat([code[:, None].expand(k, k, -1), code[None].expand(k, k, -1)], dim=-1).reshape(k * k, dim)


def init_pos_embed(model: nn.Module, kind: str) -> None:
    """'learned': leave the model's own init; 'sincos': write sincos_grid into the patch rows of model.pos_embed
    (1, prefix + k*k, C), leaving the prefix (CLS) rows as they are."""
    if kind == "learned":
        return
    pos = getattr(model, "pos_embed", None)
    if not isinstance(pos, torch.Tensor) or pos.dim() != 3:
        raise ValueError(f"model.pos_embed_init={kind}: {type(model).__name__} has no absolute position embedding")
    k = model.grid_size
    with torch.no_grad():
        pos[0, pos.shape[1] - k * k:] = sincos_grid(k, pos.shape[2]).to(pos.dtype)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int | tuple[int, int], num_prefix: int = 1) -> torch.Tensor:
    """Resize an absolute position embedding to another patch grid, the DINO way.

    pos_embed: (1, num_prefix + k*k, C), rows after the prefix in row-major (k, k) grid order.
    grid: g or (gh, gw), the new grid side(s) in patches. Returns (1, num_prefix + gh*gw, C): the prefix rows (CLS)
    unchanged, the grid bicubically resampled with scale factor (g + 0.1) / k per axis (DINO adds 0.1 so the output
    size floors to g; the factor, not g / k, sets the sampling positions), align_corners False, no antialias.
    Returned as is when the grid already matches.
    """
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    n = pos_embed.shape[1] - num_prefix
    k = math.isqrt(n)
    if k * k != n:
        raise ValueError(f"position embedding has {n} grid rows after {num_prefix} prefix rows: not a square grid")
    if (gh, gw) == (k, k):
        return pos_embed
    dim = pos_embed.shape[-1]
    prefix, patch = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    patch = F.interpolate(patch.reshape(1, k, k, dim).permute(0, 3, 1, 2),
                          scale_factor=((gh + 0.1) / k, (gw + 0.1) / k), mode="bicubic", align_corners=False)
    if patch.shape[-2:] != (gh, gw):   # pragma: no cover - the +0.1 guarantees the floor
        raise RuntimeError(f"position embedding resized to {tuple(patch.shape[-2:])}, wanted {(gh, gw)}")
    return torch.cat([prefix, patch.permute(0, 2, 3, 1).reshape(1, gh * gw, dim)], dim=1)


def truncate_pos_embed(pos_embed: torch.Tensor, grid: int | tuple[int, int], num_prefix: int = 0) -> torch.Tensor:
    """B's CaiT quirk: keep the prefix and the first gh*gw grid rows (`pos_embed[:, :n]`, for a half-size crop the
    top rows of the grid). (1, P + gh*gw, C)."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    return pos_embed[:, :num_prefix + gh * gw]


def resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int,
                     how: PosEmbedResize) -> torch.Tensor:
    """`interpolate_pos_embed` or `truncate_pos_embed` by name."""
    if how == "interpolate":
        return interpolate_pos_embed(pos_embed, grid, num_prefix)
    if how == "truncate":
        return truncate_pos_embed(pos_embed, grid, num_prefix)
    raise ValueError(f"pos_embed_resize: {how!r} is not 'interpolate' or 'truncate'")
