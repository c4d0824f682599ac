"""Position-embedding initialisation: the references' learned embedding starts as trunc-normal noise (std 0.02);
`model.pos_embed_init: sincos` starts it instead as a fixed 2-D sin-cos grid (still trained), which gives the
model the patch layout from step 0 — a named deviation, used by the CPU demo, off in every reference recipe."""
from __future__ import annotations

import torch
from torch import nn


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
