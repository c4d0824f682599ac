"""Shifted Patch Tokenization (METHODS.md D; Lee et al. 2021), as layers any model can use.

    shift s = patch // 2; zero-pad the (B, C, H, W) map by s; concatenate the map with its 4 diagonal shifts on
    channels (C -> 5C, order: [x, left-up, right-up, left-bottom, right-bottom]); cut p x p patches, each
    flattened in (row, col, channel) order; LayerNorm(5C*p*p); Linear(5C*p*p -> dim).

With C = 3 the image becomes 15 channels. Shift semantics at output pixel (i, j), zero outside the map:
    left-up      x[i - s, j - s]        right-up     x[i - s, j + s]
    left-bottom  x[i + s, j - s]        right-bottom x[i + s, j + s]

`SPTPatchEmbed` drops into timm's `embed_layer=` / `patch_layer=` slot (ViT, CaiT, Swin stem);
`SPTMerging` replaces Swin's PatchMerging between stages (NHWC in and out, p = 2, 5C*4 -> out_dim).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def shift_diagonal(x: torch.Tensor, shift: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, 5C, H, W): [x, left-up, right-up, left-bottom, right-bottom], zero filled."""
    s = shift
    pad = F.pad(x, (s, s, s, s))
    left_up = pad[:, :, :-2 * s, :-2 * s]
    right_up = pad[:, :, :-2 * s, 2 * s:]
    left_bottom = pad[:, :, 2 * s:, :-2 * s]
    right_bottom = pad[:, :, 2 * s:, 2 * s:]
    return torch.cat([x, left_up, right_up, left_bottom, right_bottom], dim=1)


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/p)*(W/p), p*p*C), patches in row-major grid order, each flattened (row, col, c)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)  # B, gh, gw, p1, p2, C
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class ShiftedPatchTokenization(nn.Module):
    """(B, C, H, W) -> (B, (H/p)*(W/p), dim). Parameters: `norm` LayerNorm(5C p^2), `proj` Linear(5C p^2, dim)."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, eps: float = 1e-5):
        super().__init__()
        self.patch_size = patch_size
        self.shift = patch_size // 2
        patch_dim = 5 * in_chans * patch_size * patch_size
        self.norm = nn.LayerNorm(patch_dim, eps=eps)
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(patchify(shift_diagonal(x, self.shift), self.patch_size)))


class SPTPatchEmbed(nn.Module):
    """timm-compatible patch embedding (same constructor keywords and attributes as timm's PatchEmbed) that
    tokenizes with SPT. Output (B, N, dim), or (B, gh, gw, dim) with output_fmt='NHWC' (Swin)."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, output_fmt=None, norm_layer=None,
                 strict_img_size=True, bias=True, dynamic_img_pad=False, flatten=True, **_ignored):
        super().__init__()
        size = img_size if isinstance(img_size, int) else img_size[0]
        p = patch_size if isinstance(patch_size, int) else patch_size[0]
        self.img_size = (size, size)
        self.patch_size = (p, p)
        self.grid_size = (size // p, size // p)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.output_nhwc = output_fmt == "NHWC" or str(output_fmt).endswith("NHWC")
        self.strict_img_size = strict_img_size   # as timm's: False tokenizes any size divisible by the patch
        self.spt = ShiftedPatchTokenization(in_chans, embed_dim, p)

    def feat_ratio(self, as_scalar=True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.strict_img_size and (h, w) != self.img_size:
            raise ValueError(f"SPT patch embedding built for {self.img_size} images, got {(h, w)}")
        tokens = self.spt(x)
        if self.output_nhwc:
            return tokens.reshape(b, h // self.patch_size[0], w // self.patch_size[1], -1)
        return tokens


class SPTMerging(nn.Module):
    """Swin downsampling by SPT (D's Swin uses it in place of PatchMerging): (B, H, W, C) -> (B, H/2, W/2, out)."""

    def __init__(self, dim: int, out_dim: int | None = None):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim or 2 * dim
        self.spt = ShiftedPatchTokenization(dim, self.out_dim, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        tokens = self.spt(x.permute(0, 3, 1, 2))
        return tokens.reshape(b, h // 2, w // 2, self.out_dim)
