"""Swin at the reference small-data configs (METHODS.md, shared backbone table), built on timm's SwinTransformer
so its state dict loads into plain timm (`timm.models.SwinTransformer(**model.timm_kwargs)`) when SPT, LSA and
`ape` are off.

Reference: B's Swin (EsViT/DINO code: conv patch embedding + LayerNorm, relative position bias, PatchMerging,
LayerNorm eps 1e-6, no absolute position embedding) = timm's SwinTransformer with embed 96, depths 2-6-4,
heads 3-6-12, window 4, mlp ratio 2: 7,048,612 parameters with 10 classes. Stage grids for 32 px / patch 2 and
64 px / patch 4 are 16 -> 8 -> 4; the last stage (4 x 4) fits one window, so it is not shifted.

B's init is timm's (trunc-normal(0.02) Linear weights and bias table, LayerNorm 1/0): init 'b' and 'timm' are one.

D's Swin (SPT_LSA_ViT) differs: an absolute position embedding (`ape=True`, +L*96 parameters: 7,073,188 with 10
classes) and, with `spt=True`, SPT as the stem and in place of every PatchMerging; with `lsa=True` every window
attention becomes engine.models.lsa.LSAWindowAttention.
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models.swin_transformer import PatchMerging, SwinTransformer
from torch import nn

from engine.models.registry import ModelOutput, register_model
from engine.models import options
from engine.models.any_size import attributes, embed_patches
from engine.models.lsa import LSAWindowAttention
from engine.models.pos_embed import PosEmbedResize, resize_pos_embed
from engine.models.spt import SPTMerging, SPTPatchEmbed


def _init_like_timm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _lsa_from(attn: nn.Module) -> LSAWindowAttention:
    """An LSA window attention with the same shapes, carrying over attn's weights (qkv, proj, bias table)."""
    head_dim = attn.qkv.out_features // 3 // attn.num_heads
    lsa = LSAWindowAttention(attn.dim, attn.num_heads, head_dim=head_dim, window_size=attn.window_size,
                             qkv_bias=attn.qkv.bias is not None, attn_drop=attn.attn_drop.p,
                             proj_drop=attn.proj_drop.p)
    lsa.load_state_dict(attn.state_dict(), strict=False)
    return lsa.to(attn.qkv.weight.device)


class SmallSwin(SwinTransformer):
    """timm's SwinTransformer plus SPT/LSA/ape options and `forward_with_tokens`.

    `embed_dim` is the width of the last stage (the tokens the auxiliary tasks see), `stem_dim` the first's.
    """

    def __init__(self, spt: bool = False, lsa: bool = False, ape: bool = False, **timm_kwargs):
        extra = {"embed_layer": SPTPatchEmbed} if spt else {}
        super().__init__(**timm_kwargs, **extra)
        self.timm_kwargs = dict(timm_kwargs)
        self.spt, self.lsa = spt, lsa
        self.stem_dim = self.embed_dim
        self.embed_dim = self.num_features
        stem_grid = self.patch_embed.grid_size
        self.grid_size = stem_grid[0] // 2 ** (self.num_layers - 1)
        if spt:
            for stage in self.layers:
                if isinstance(stage.downsample, PatchMerging):
                    stage.downsample = SPTMerging(stage.downsample.dim, stage.downsample.out_dim)
                    _init_like_timm(stage.downsample)
        if lsa:
            for stage in self.layers:
                for block in stage.blocks:
                    block.attn = _lsa_from(block.attn)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, stem_grid[0], stem_grid[1], self.stem_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None

    def _stages(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)                     # (B, H/p, W/p, C0)
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        return self.layers(x)                       # (B, k, k, C)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self._stages(x))

    def forward_with_tokens(self, x: torch.Tensor) -> ModelOutput:
        """x (B, 3, H, W) -> ModelOutput(logits, tokens (B, k*k, C) last stage pre-norm, num_prefix 0,
        features (B, k*k, C) the same tokens after the final norm)."""
        last = self._stages(x)
        normed = self.norm(last)
        logits = self.forward_head(normed)
        return ModelOutput(logits=logits, tokens=last.flatten(1, 2), num_prefix=0, grid=self.grid_size,
                           features=normed.flatten(1, 2))

    def pooled_features(self, x: torch.Tensor, pos_embed_resize: PosEmbedResize = "interpolate") -> torch.Tensor:
        """x (B, 3, H, W), H and W multiples of the patch -> (B, C) the mean of the final-normed last-stage tokens
        (timm's pre-logits; C the last stage's width). At the built size exactly forward_head(forward_features(x),
        pre_logits=True). At another size, as B's Swin (EsViT code): the built window sizes and shifts, a map
        smaller than a window zero-padded (pads unmasked in attention), the shift mask computed per input (timm's
        `dynamic_mask`, switched on for this call); an absolute position embedding is resized like ViT's."""
        if tuple(x.shape[-2:]) == tuple(self.patch_embed.img_size):
            return self.forward_head(self.forward_features(x), pre_logits=True)
        tokens = embed_patches(self.patch_embed, x)                        # (B, h, w, C0)
        if self.absolute_pos_embed is not None:                            # (1, H0, W0, C0), no prefix rows
            k, dim = self.absolute_pos_embed.shape[1], self.absolute_pos_embed.shape[-1]
            resized = resize_pos_embed(self.absolute_pos_embed.reshape(1, k * k, dim), tokens.shape[1:3], 0,
                                       pos_embed_resize)
            tokens = tokens + resized.reshape(1, tokens.shape[1], tokens.shape[2], dim)
        blocks = [block for stage in self.layers for block in stage.blocks]
        with attributes([(block, "dynamic_mask", True) for block in blocks]):
            tokens = self.layers(tokens)
        return self.forward_head(self.norm(tokens), pre_logits=True)


def _swin(img_size: int, patch: int, num_classes: int, drop_path: float, spt: bool, lsa: bool, ape: bool,
          qkv_bias: bool, norm_eps: float, drop_path_schedule: str, init: str, **overrides) -> SmallSwin:
    options.check_init(init, ("timm", "b"), "swin")
    kwargs = dict(img_size=img_size, patch_size=patch, embed_dim=96, depths=(2, 6, 4), num_heads=(3, 6, 12),
                  window_size=4, mlp_ratio=2.0, qkv_bias=qkv_bias, drop_path_rate=drop_path, num_classes=num_classes,
                  norm_layer=options.norm_layer(norm_eps))
    kwargs.update(overrides)
    model = SmallSwin(spt=spt, lsa=lsa, ape=ape, **kwargs)
    if drop_path_schedule != "linear":    # timm's rule runs over all blocks of all stages, so does this
        blocks = [block for stage in model.layers for block in stage.blocks]
        options.set_drop_path(blocks, options.drop_path_rates(drop_path, len(blocks), drop_path_schedule))
    return model


@register_model
def swin_cifar(num_classes: int = 10, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
               ape: bool = False, img_size: int = 32, qkv_bias: bool = True, norm_eps: float = 1e-6,
               drop_path_schedule: str = "linear", init: str = "b", **overrides) -> SmallSwin:
    """32 px, patch 2, embed 96, depths 2-6-4, heads 3-6-12, window 4, mlp 2: 7,048,612 parameters (10 classes)."""
    return _swin(img_size, 2, num_classes, drop_path, spt, lsa, ape, qkv_bias, norm_eps, drop_path_schedule, init,
                 **overrides)


@register_model
def swin_tiny_imagenet(num_classes: int = 200, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
                       ape: bool = False, img_size: int = 64, qkv_bias: bool = True, norm_eps: float = 1e-6,
                       drop_path_schedule: str = "linear", init: str = "b", **overrides) -> SmallSwin:
    """64 px, patch 4, otherwise as swin_cifar: 7,125,218 parameters with 200 classes."""
    return _swin(img_size, 4, num_classes, drop_path, spt, lsa, ape, qkv_bias, norm_eps, drop_path_schedule, init,
                 **overrides)
