"""The image embedding DINO trains (METHODS.md B), for every registered model and any crop size, and the multi-crop
wrapper that runs the backbone once per run of same-size crops.

    backbone = MultiCropBackbone(create_model("vit_cifar", num_classes=0))
    feats = backbone(batch.crops)            # [2 x (B,3,32,32), 8 x (B,3,16,16)] -> (10B, 192), 2 forwards

What `pooled_features(model, x)` returns, (B, D):
  - ViT:  the CLS token after the final norm (timm forward_features + forward_head(pre_logits=True));
  - CaiT: the CLS token after the class-attention blocks and the final norm (same timm calls);
  - Swin: the mean over the final-normed last-stage tokens (timm pre-logits; Swin has no CLS), D = last width.
At the size the model was built for this IS the model's own forward_features/forward_head, so full-size features
are exactly the classifier's pre-logits. At any other size (DINO's local crops: 16 px for the 32 px models, 32 px
for the 64 px ones) the same layers run with:
  - the absolute position embedding resized by `interpolate_pos_embed` (DINO's interpolate_pos_encoding: bicubic
    on the (k, k) grid with scale factor (g + 0.1) / k, no antialias, prefix/CLS rows untouched). B's CaiT instead
    takes the first g*g rows (`pos_embed[:, :n]`, which for a half-size crop are the top rows of the grid), a
    reference quirk available as `pos_embed_resize="truncate"`;
  - Swin: B's Swin (EsViT code) keeps the window sizes and shifts it was built with and zero-pads a feature map
    smaller than a window; padded tokens take part in the attention unmasked, and the shifted-window mask is
    computed for the actual size. timm 1.0.31's SwinTransformer does exactly that when its blocks compute their
    masks per input (`dynamic_mask`, what `strict_img_size=False` builds) and the patch embedding skips its size
    check, so for a smaller input we switch those two on for the duration of the call and use timm's own layers.
    For swin_cifar at 16 px the stage grids are 8 -> 4 -> 2: stage 1 windows 4 shifted 2, stage 2 one 4x4 window
    shifted 2 (masked), stage 3 one 4x4 window holding the 2x2 map and 12 zero pads. The alternative (clamp the
    window to the map, timm's set_input_size) would change the stage-2 shift and need a 3x3 slice of the stage-3
    relative-position table; we follow the reference. SPT stems/mergings tokenize any even size; an absolute
    position embedding (`ape`) is resized like ViT's, without prefix rows.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.spt import SPTPatchEmbed

PosEmbedResize = Literal["interpolate", "truncate"]


# ------------------------------------------------------------------------------------------------ position embedding
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
    """B's CaiT quirk: keep the prefix and the first gh*gw grid rows (`pos_embed[:, :n]`). (1, P + gh*gw, C)."""
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    return pos_embed[:, :num_prefix + gh * gw]


def _resize_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix: int,
                      how: PosEmbedResize) -> torch.Tensor:
    if how == "interpolate":
        return interpolate_pos_embed(pos_embed, grid, num_prefix)
    if how == "truncate":
        return truncate_pos_embed(pos_embed, grid, num_prefix)
    raise ValueError(f"pos_embed_resize: {how!r} is not 'interpolate' or 'truncate'")


# ------------------------------------------------------------------------------------------------ patch embedding
def _embed_patches(patch_embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding at any size divisible by the patch: (B, 3, H, W) -> (B, N, C), or (B, H/p, W/p, C) for an
    NHWC (Swin) embedding. The same layers as patch_embed.forward, without its built-size check."""
    p = patch_embed.patch_size[0]
    b, _, h, w = x.shape
    if h % p or w % p:
        raise ValueError(f"crop of {h}x{w} px is not divisible by the patch size {p}")
    if isinstance(patch_embed, SPTPatchEmbed):
        tokens = patch_embed.spt(x)
        return tokens.reshape(b, h // p, w // p, -1) if patch_embed.output_nhwc else tokens
    with _attributes([(patch_embed, "strict_img_size", False)]):
        return patch_embed(x)


@contextlib.contextmanager
def _attributes(settings: Sequence[tuple[object, str, object]]) -> Iterator[None]:
    """Set (object, attribute, value) triples for the duration of a with-block, then restore them."""
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in settings]
    try:
        for obj, name, value in settings:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


# ------------------------------------------------------------------------------------------------ per family
def _built_size(model: nn.Module) -> tuple[int, int]:
    return tuple(model.patch_embed.img_size)


def _vit_features(model: nn.Module, x: torch.Tensor, how: PosEmbedResize) -> torch.Tensor:
    if getattr(model, "reg_token", None) is not None or model.no_embed_class or model.dynamic_img_size:
        raise ValueError("pooled_features: ViT with register tokens / no_embed_class / dynamic_img_size "
                         "is not a registered smallvit model")
    p = model.patch_embed.patch_size[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    tokens = _embed_patches(model.patch_embed, x)
    if model.cls_token is not None:
        tokens = torch.cat([model.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
    tokens = model.pos_drop(tokens + _resize_pos_embed(model.pos_embed, grid, model.num_prefix_tokens, how))
    tokens = model.norm_pre(model.patch_drop(tokens))
    tokens = model.norm(model.blocks(tokens))
    return model.forward_head(tokens, pre_logits=True)


def _cait_features(model: nn.Module, x: torch.Tensor, how: PosEmbedResize) -> torch.Tensor:
    p = model.patch_embed.patch_size[0]
    grid = (x.shape[-2] // p, x.shape[-1] // p)
    tokens = _embed_patches(model.patch_embed, x)
    tokens = model.pos_drop(tokens + _resize_pos_embed(model.pos_embed, grid, 0, how))
    tokens = model.norm(model.forward_cls(model.blocks(tokens)))
    return model.forward_head(tokens, pre_logits=True)


def _swin_features(model: nn.Module, x: torch.Tensor, how: PosEmbedResize) -> torch.Tensor:
    tokens = _embed_patches(model.patch_embed, x)                      # (B, h, w, C0)
    ape = getattr(model, "absolute_pos_embed", None)
    if ape is not None:                                                # (1, H0, W0, C0), no prefix rows
        k, dim = ape.shape[1], ape.shape[-1]
        resized = _resize_pos_embed(ape.reshape(1, k * k, dim), tokens.shape[1:3], 0, how)
        tokens = tokens + resized.reshape(1, tokens.shape[1], tokens.shape[2], dim)
    blocks = [block for stage in model.layers for block in stage.blocks]
    with _attributes([(block, "dynamic_mask", True) for block in blocks]):
        tokens = model.layers(tokens)
    return model.forward_head(model.norm(tokens), pre_logits=True)


def _family(model: nn.Module) -> str:
    from timm.models.cait import Cait
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer

    for family, cls in (("vit", VisionTransformer), ("cait", Cait), ("swin", SwinTransformer)):
        if isinstance(model, cls):
            return family
    raise TypeError(f"pooled_features: {type(model).__name__} is not a ViT, CaiT or Swin model")


def pooled_features(model: nn.Module, x: torch.Tensor, pos_embed_resize: PosEmbedResize = "interpolate"
                    ) -> torch.Tensor:
    """x (B, 3, H, W) normalized images, H and W multiples of the patch -> (B, D) the embedding DINO trains
    (see the module docstring). At the model's built size: exactly model.forward_head(model.forward_features(x),
    pre_logits=True). `pos_embed_resize` applies to other sizes only."""
    family = _family(model)
    if tuple(x.shape[-2:]) == _built_size(model):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    if family == "vit":
        return _vit_features(model, x, pos_embed_resize)
    if family == "cait":
        return _cait_features(model, x, pos_embed_resize)
    return _swin_features(model, x, pos_embed_resize)


# ------------------------------------------------------------------------------------------------ multi-crop
def resolution_runs(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[(start, end)] index ranges of consecutive crops with the same (H, W), in order."""
    runs, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs


class MultiCropBackbone(nn.Module):
    """DINO's MultiCropWrapper minus the head: `forward(crops)` with crops [(B_i, 3, H_i, W_i)] -> (sum B_i, D),
    the rows in input order (crop 0's batch first). Each run of consecutive same-size crops is concatenated and
    goes through the backbone in ONE forward (2 forwards for 2 global + 8 local crops).

    The model (built with num_classes=0 for pretraining, though a classifier model works too: only its pre-logits
    are used) is held as `backbone`, so this module's state dict carries DINO's `backbone.` prefix, which
    engine.models.pretrained strips. `embed_dim` is D: 192 for ViT/CaiT, the last stage width (384) for Swin.
    """

    def __init__(self, backbone: nn.Module, pos_embed_resize: PosEmbedResize = "interpolate"):
        super().__init__()
        _family(backbone)
        if pos_embed_resize not in ("interpolate", "truncate"):
            raise ValueError(f"pos_embed_resize: {pos_embed_resize!r} is not 'interpolate' or 'truncate'")
        self.backbone = backbone
        self.embed_dim = backbone.num_features
        self.pos_embed_resize = pos_embed_resize

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not crops:
            raise ValueError("MultiCropBackbone: no crops given")
        outputs = [pooled_features(self.backbone, torch.cat(list(crops[start:end])), self.pos_embed_resize)
                   for start, end in resolution_runs(crops)]
        return torch.cat(outputs)
