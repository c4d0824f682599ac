"""ViT at the reference small-data configs (METHODS.md, shared backbone table), built on timm's VisionTransformer
so its state dict loads into plain timm (`timm.models.VisionTransformer(**model.timm_kwargs)`) when neither SPT
nor LSA is on (those replace timm's patch embedding / attention with engine.models.spt / engine.models.lsa).

Reference (the defaults): B's VisionTransformer (timm's design: conv patch embedding, qkv bias, LayerNorm eps 1e-6,
CLS token, learned position embedding, linearly increasing drop-path; B's init: timm's but a trunc-normal(0.02)
cls_token) = 2,697,610 parameters for vit_cifar with 10 classes.

D's ViT (SPT_LSA_ViT models/vit.py) is the same network up to options (engine/models/options.py):
qkv_bias=False, norm_eps=1e-5, drop_path_schedule='constant', init='d' -- 2,692,426 parameters, 2,729,878 with
spt and lsa (10 classes). Its patch embedding, Rearrange + Linear(3 p^2, dim), is our conv with the weight laid out
(dim, 3, p, p) instead of (dim, (p p 3)); engine/models/reference_names.py translates D's state dict.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer

from engine.models.registry import ModelOutput, register_model
from engine.models import options
from engine.models.any_size import embed_patches
from engine.models.lsa import LSAAttention
from engine.models.pos_embed import PosEmbedResize, resize_pos_embed
from engine.models.spt import SPTPatchEmbed

INITS = {"timm": None, "b": options.init_b_vit, "d": options.init_d}


class SmallViT(VisionTransformer):
    """timm's VisionTransformer plus `forward_with_tokens`, which keeps the pre-norm last-block tokens."""

    def __init__(self, spt: bool = False, lsa: bool = False, **timm_kwargs):
        extra = {}
        if spt:
            extra["embed_layer"] = SPTPatchEmbed
        if lsa:
            extra["attn_layer"] = LSAAttention
        super().__init__(**timm_kwargs, **extra)
        self.timm_kwargs = dict(timm_kwargs)
        self.spt, self.lsa = spt, lsa
        self.grid_size = self.patch_embed.grid_size[0]

    def forward_with_tokens(self, x: torch.Tensor) -> ModelOutput:
        """x (B, 3, H, W) -> ModelOutput(logits (B, classes), tokens (B, 1 + k*k, C) pre-norm)."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        tokens = self.blocks(x)
        logits = self.forward_head(self.norm(tokens))
        return ModelOutput(logits=logits, tokens=tokens, num_prefix=self.num_prefix_tokens, grid=self.grid_size)

    def pooled_features(self, x: torch.Tensor, pos_embed_resize: PosEmbedResize = "interpolate") -> torch.Tensor:
        """x (B, 3, H, W), H and W multiples of the patch -> (B, 192) the CLS token after the final norm (timm's
        pre-logits). At the built size exactly forward_head(forward_features(x), pre_logits=True); at another
        size the same layers with the position embedding resized (`pos_embed_resize`, CLS row untouched)."""
        if tuple(x.shape[-2:]) == tuple(self.patch_embed.img_size):
            return self.forward_head(self.forward_features(x), pre_logits=True)
        if getattr(self, "reg_token", None) is not None or self.no_embed_class or self.dynamic_img_size:
            raise ValueError("pooled_features: ViT with register tokens / no_embed_class / dynamic_img_size "
                             "is not a registered smallvit model")
        p = self.patch_embed.patch_size[0]
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = embed_patches(self.patch_embed, x)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        tokens = self.pos_drop(tokens + resize_pos_embed(self.pos_embed, grid, self.num_prefix_tokens,
                                                         pos_embed_resize))
        tokens = self.norm_pre(self.patch_drop(tokens))
        tokens = self.norm(self.blocks(tokens))
        return self.forward_head(tokens, pre_logits=True)


def _vit(img_size: int, patch: int, num_classes: int, drop_path: float, spt: bool, lsa: bool, qkv_bias: bool,
         norm_eps: float, drop_path_schedule: str, init: str, **overrides) -> SmallViT:
    options.check_init(init, tuple(INITS), "vit")
    kwargs = dict(img_size=img_size, patch_size=patch, embed_dim=192, depth=9, num_heads=12, mlp_ratio=2.0,
                  qkv_bias=qkv_bias, drop_path_rate=drop_path, num_classes=num_classes,
                  norm_layer=options.norm_layer(norm_eps))
    kwargs.update(overrides)   # e.g. depth=2, embed_dim=64 for small test models
    model = SmallViT(spt=spt, lsa=lsa, **kwargs)
    if drop_path_schedule != "linear":
        options.set_drop_path(model.blocks, options.drop_path_rates(drop_path, len(model.blocks),
                                                                    drop_path_schedule))
    if INITS[init] is not None:
        INITS[init](model)
    return model


@register_model
def vit_cifar(num_classes: int = 10, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
              img_size: int = 32, qkv_bias: bool = True, norm_eps: float = 1e-6, drop_path_schedule: str = "linear",
              init: str = "b", **overrides) -> SmallViT:
    """32 px, patch 4, dim 192, depth 9, 12 heads, mlp ratio 2: 2,697,610 parameters with 10 classes."""
    return _vit(img_size, 4, num_classes, drop_path, spt, lsa, qkv_bias, norm_eps, drop_path_schedule, init,
                **overrides)


@register_model
def vit_tiny_imagenet(num_classes: int = 200, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
                      img_size: int = 64, qkv_bias: bool = True, norm_eps: float = 1e-6,
                      drop_path_schedule: str = "linear", init: str = "b", **overrides) -> SmallViT:
    """64 px, patch 8 (64 tokens + CLS), otherwise as vit_cifar: 2,761,928 parameters with 200 classes."""
    return _vit(img_size, 8, num_classes, drop_path, spt, lsa, qkv_bias, norm_eps, drop_path_schedule, init,
                **overrides)
