"""CaiT at the reference small-data configs (METHODS.md, shared backbone table), built on timm's Cait so its
state dict loads into plain timm (`timm.models.cait.Cait(**model.timm_kwargs)`) when SPT and LSA are off.

Reference: B's cait_models (a copy of timm's CaiT): embed 192, 24 talking-head blocks + 2 class-attention blocks,
4 heads, mlp ratio 2 (class-attention blocks keep ratio 4, the code's `mlp_ratio_clstk` default), qkv bias,
LayerScale init 1e-5, constant drop-path on the 24 blocks: 8,053,450 parameters with 10 classes. METHODS.md's
"≈7.7M" is the papers' quoted figure; B's code gives 8.05M, and 7,757,770 only with `cls_mlp_ratio=2.0`.
B's init (the default, init='b') is timm's except the patch embedding (a Linear in B: trunc-normal(0.02)).
D's CaiT is another network: engine/models/cait_d.py.
"""
from __future__ import annotations

import torch
from timm.models.cait import Cait

from engine.models.registry import ModelOutput, register_model
from engine.models import options
from engine.models.any_size import embed_patches
from engine.models.lsa import LSAClassAttn, LSATalkingHeadAttn, LSATalkingHeadAttnReference
from engine.models.pos_embed import PosEmbedResize, resize_pos_embed
from engine.models.spt import SPTPatchEmbed


class SmallCaiT(Cait):
    """timm's Cait plus SPT/LSA options and `forward_with_tokens`.

    lsa_reference_diagonal: reproduce D's CaiT LSA, whose diagonal "mask" writes -1e-9 (a no-op); default off.
    """

    def __init__(self, spt: bool = False, lsa: bool = False, lsa_reference_diagonal: bool = False, **timm_kwargs):
        extra = {}
        if spt:
            extra["patch_layer"] = SPTPatchEmbed
        if lsa:
            extra["attn_block"] = LSATalkingHeadAttnReference if lsa_reference_diagonal else LSATalkingHeadAttn
            extra["attn_block_token_only"] = LSAClassAttn
        super().__init__(**timm_kwargs, **extra)
        self.timm_kwargs = dict(timm_kwargs)
        self.spt, self.lsa = spt, lsa
        self.grid_size = self.patch_embed.grid_size[0]

    def forward_with_tokens(self, x: torch.Tensor) -> ModelOutput:
        """x (B, 3, H, W) -> ModelOutput(logits, tokens (B, 1 + k*k, C): the CLS token after the class-attention
        blocks and the patch tokens after the last patch block, both before the final norm)."""
        x = self.patch_embed(x) + self.pos_embed
        x = self.pos_drop(x)
        x = self.blocks(x)
        tokens = self.forward_cls(x)
        logits = self.forward_head(self.norm(tokens))
        return ModelOutput(logits=logits, tokens=tokens, num_prefix=1, grid=self.grid_size)

    def pooled_features(self, x: torch.Tensor, pos_embed_resize: PosEmbedResize = "interpolate") -> torch.Tensor:
        """x (B, 3, H, W), H and W multiples of the patch -> (B, 192) the CLS token after the class-attention
        blocks and the final norm (timm's pre-logits). At the built size exactly forward_head(forward_features(x),
        pre_logits=True); at another size the same layers with the position embedding (no prefix rows) resized:
        "interpolate" (DINO) or "truncate" (B's CaiT: the first g*g rows)."""
        if tuple(x.shape[-2:]) == tuple(self.patch_embed.img_size):
            return self.forward_head(self.forward_features(x), pre_logits=True)
        p = self.patch_embed.patch_size[0]
        grid = (x.shape[-2] // p, x.shape[-1] // p)
        tokens = embed_patches(self.patch_embed, x)
        tokens = self.pos_drop(tokens + resize_pos_embed(self.pos_embed, grid, 0, pos_embed_resize))
        tokens = self.norm(self.forward_cls(self.blocks(tokens)))
        return self.forward_head(tokens, pre_logits=True)


def _cait(img_size: int, patch: int, num_classes: int, drop_path: float, spt: bool, lsa: bool,
          cls_mlp_ratio: float, lsa_reference_diagonal: bool, qkv_bias: bool, norm_eps: float,
          drop_path_schedule: str, init: str, **overrides) -> SmallCaiT:
    options.check_init(init, ("timm", "b"), "cait (D's CaiT is cait_d_cifar / cait_d_tiny_imagenet)")
    kwargs = dict(img_size=img_size, patch_size=patch, embed_dim=192, depth=24, num_heads=4, mlp_ratio=2.0,
                  qkv_bias=qkv_bias, init_values=1e-5, depth_token_only=2, mlp_ratio_token_only=cls_mlp_ratio,
                  drop_path_rate=drop_path, num_classes=num_classes, norm_layer=options.norm_layer(norm_eps))
    kwargs.update(overrides)
    model = SmallCaiT(spt=spt, lsa=lsa, lsa_reference_diagonal=lsa_reference_diagonal, **kwargs)
    if drop_path_schedule != "constant":
        options.set_drop_path(model.blocks, options.drop_path_rates(drop_path, len(model.blocks),
                                                                    drop_path_schedule))
    if init == "b":
        options.init_b_cait(model)
    return model


@register_model
def cait_cifar(num_classes: int = 10, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
               img_size: int = 32, cls_mlp_ratio: float = 4.0, lsa_reference_diagonal: bool = False,
               qkv_bias: bool = True, norm_eps: float = 1e-6, drop_path_schedule: str = "constant", init: str = "b",
               **overrides) -> SmallCaiT:
    """32 px, patch 4, embed 192, depth 24 + 2, 4 heads, mlp 2, LayerScale 1e-5: 8,053,450 parameters (10 classes)."""
    return _cait(img_size, 4, num_classes, drop_path, spt, lsa, cls_mlp_ratio, lsa_reference_diagonal, qkv_bias,
                 norm_eps, drop_path_schedule, init, **overrides)


@register_model
def cait_tiny_imagenet(num_classes: int = 200, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
                       img_size: int = 64, cls_mlp_ratio: float = 4.0, lsa_reference_diagonal: bool = False,
                       qkv_bias: bool = True, norm_eps: float = 1e-6, drop_path_schedule: str = "constant",
                       init: str = "b", **overrides) -> SmallCaiT:
    """64 px, patch 8, otherwise as cait_cifar: 8,117,768 parameters with 200 classes."""
    return _cait(img_size, 8, num_classes, drop_path, spt, lsa, cls_mlp_ratio, lsa_reference_diagonal, qkv_bias,
                 norm_eps, drop_path_schedule, init, **overrides)
