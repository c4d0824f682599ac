"""D's CaiT (SPT_LSA_ViT models/cait.py), the network behind its CaiT / SL-CaiT rows, on timm's Cait frame.

It is not B's (timm's) CaiT with LSA added:
  - attention heads of dim_head 64 (inner width 4 * 64 = 256, not 192 / 4 = 48), q and kv projections without bias,
    an output Linear(256, 192) with bias;
  - talking-heads mixing matrices (heads, heads) without bias, before and after the softmax, in the class-attention
    blocks too; D mixes with einsum('b h i j, h g -> b g i j'), i.e. logits_g = sum_h logits_h * mix[h, g];
  - LayerScale starting at 0.1 for blocks 1..18 and 1e-5 for 19..24 (D's depth rule), 0.1 in both class blocks;
  - class attention: the query from the normed CLS token, keys and values from the patch tokens as the last patch
    block left them (D passes them as `context`, past PreNorm, so they are not normed, and CLS is not among them);
  - the class blocks' MLP hidden 384 (ratio 2), one constant drop-path rate in every block, class blocks included;
  - LayerNorm eps 1e-5, D's init (engine/models/options.init_d), the mixing matrices N(0, 1);
  - with LSA, the temperature starts at 64^-0.5 = 0.125 and, in the patch blocks only, the diagonal is "masked":
    D writes -1e-9 there before the mixing (no mask at all, in effect). That quirk shaped D's SL-CaiT figures, so
    it is this model's default (`lsa_reference_diagonal=True`); False masks with -inf after the pre-softmax mixing,
    as METHODS.md D states LSA (and as cait_* does).
9,058,066 parameters for cait_d_cifar with SPT and LSA (10 classes), 9,020,618 without either.
State-dict names are timm's Cait's where a part exists there (patch_embed, pos_embed, cls_token, blocks.i.norm1,
attn.proj, gamma_1, mlp.fc1, blocks_token_only.j..., norm, head); D's own parts are attn.q, attn.kv, attn.mix_pre,
attn.mix_post (D's layout), attn.temperature. engine/models/reference_names.py maps D's state dict onto these.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from timm.layers import Mlp
from timm.models.cait import LayerScaleBlock
from torch import nn

from engine.models.registry import register_model
from engine.models import options
from engine.models.cait import SmallCaiT
from engine.models.lsa import REFERENCE_CAIT_DIAGONAL_FILL, diagonal
from engine.models.spt import SPTPatchEmbed

DIM_HEAD = 64
MLP_HIDDEN = 384


def layer_scale_init(depth_index: int) -> float:
    """D's LayerScale start for the block at 1-based position `depth_index` of its Transformer."""
    if depth_index <= 18:
        return 0.1
    return 1e-5 if depth_index <= 24 else 1e-6


class DTalkingHeadAttention(nn.Module):
    """D's CaiT attention. x (B, N, C) [, context (B, M, C), default x] -> (B, N, C).

    Parameters: q Linear(C, h*d), kv Linear(C, 2*h*d) (k then v), mix_pre / mix_post (h, h), proj Linear(h*d, C);
    with LSA a per-head `temperature` (h,) replacing the fixed scale d^-0.5. mask_diagonal: the patch blocks' LSA
    mask (queries and keys are the same tokens there)."""

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, dim_head: int = DIM_HEAD, lsa: bool = False, mask_diagonal: bool = False,
                 reference_diagonal: bool = False, device=None, dtype=None):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        inner = num_heads * dim_head
        self.num_heads, self.dim_head = num_heads, dim_head
        self.q = nn.Linear(dim, inner, bias=qkv_bias, **dd)
        self.kv = nn.Linear(dim, 2 * inner, bias=qkv_bias, **dd)
        self.mix_pre = nn.Parameter(torch.randn(num_heads, num_heads, **dd))
        self.mix_post = nn.Parameter(torch.randn(num_heads, num_heads, **dd))
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.lsa = lsa
        if lsa:
            self.temperature = nn.Parameter(torch.full((num_heads,), dim_head ** -0.5, **dd))
        self.scale = dim_head ** -0.5
        self.mask_diagonal = lsa and mask_diagonal
        self.reference_diagonal = reference_diagonal

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.num_heads, self.dim_head).transpose(1, 2)       # (B, h, n, d)

    def _mix(self, attn: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bhij,hg->bgij", attn, mix)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._heads(self.q(x))
        k, v = (self._heads(t) for t in self.kv(context).chunk(2, dim=-1))
        scale = self.temperature.view(1, -1, 1, 1) if self.lsa else self.scale
        logits = (q @ k.transpose(-2, -1)) * scale                                    # (B, h, N, M)
        diag = diagonal(logits.shape[-1], x.device) if self.mask_diagonal else None
        if diag is not None and self.reference_diagonal:
            logits = logits.masked_fill(diag, REFERENCE_CAIT_DIAGONAL_FILL)
        logits = self._mix(logits, self.mix_pre)
        if diag is not None and not self.reference_diagonal:
            logits = logits.masked_fill(diag, float("-inf"))
        attn = self.attn_drop(self._mix(logits.softmax(dim=-1), self.mix_post))
        out = (attn @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.proj_drop(self.proj(out))


class DClassAttentionBlock(LayerScaleBlock):
    """D's class-attention block: x_cls += gamma_1 * attn(norm1(x_cls), context=x) (x: the patch tokens, not
    normed), x_cls += gamma_2 * mlp(norm2(x_cls)), each branch through drop-path. -> (B, 1, C)."""

    def forward(self, x: torch.Tensor, x_cls: torch.Tensor) -> torch.Tensor:
        x_cls = x_cls + self.drop_path(self.gamma_1 * self.attn(self.norm1(x_cls), context=x))
        return x_cls + self.drop_path(self.gamma_2 * self.mlp(self.norm2(x_cls)))


class DCaiT(SmallCaiT):
    """D's CaiT as a SmallCaiT (forward_with_tokens, ModelOutput, the SSL backbone's CaiT path all apply)."""

    def __init__(self, spt: bool = False, lsa: bool = False, lsa_reference_diagonal: bool = False,
                 dim_head: int = DIM_HEAD, **timm_kwargs):
        attn = partial(DTalkingHeadAttention, dim_head=dim_head, lsa=lsa, reference_diagonal=lsa_reference_diagonal)
        extra = {"patch_layer": SPTPatchEmbed} if spt else {}
        super(SmallCaiT, self).__init__(block_layers=LayerScaleBlock, block_layers_token=DClassAttentionBlock,
                                        attn_block=partial(attn, mask_diagonal=True), attn_block_token_only=attn,
                                        **timm_kwargs, **extra)
        self.timm_kwargs = dict(timm_kwargs)
        self.spt, self.lsa = spt, lsa
        self.grid_size = self.patch_embed.grid_size[0]
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.gamma_1.fill_(layer_scale_init(i + 1))
                block.gamma_2.fill_(layer_scale_init(i + 1))
            for j, block in enumerate(self.blocks_token_only):
                block.gamma_1.fill_(layer_scale_init(j + 1))
                block.gamma_2.fill_(layer_scale_init(j + 1))


def _cait_d(img_size: int, patch: int, num_classes: int, drop_path: float, spt: bool, lsa: bool,
            lsa_reference_diagonal: bool, qkv_bias: bool, norm_eps: float, drop_path_schedule: str, init: str,
            **overrides) -> DCaiT:
    options.check_init(init, ("d",), "cait_d")
    mlp_ratio = MLP_HIDDEN / overrides.get("embed_dim", 192)
    kwargs = dict(img_size=img_size, patch_size=patch, embed_dim=192, depth=24, num_heads=4, mlp_ratio=mlp_ratio,
                  qkv_bias=qkv_bias, depth_token_only=2, mlp_ratio_token_only=mlp_ratio, drop_path_rate=drop_path,
                  num_classes=num_classes, norm_layer=options.norm_layer(norm_eps), mlp_block=Mlp,
                  mlp_block_token_only=Mlp)
    kwargs.update(overrides)
    model = DCaiT(spt=spt, lsa=lsa, lsa_reference_diagonal=lsa_reference_diagonal, **kwargs)
    blocks = [*model.blocks, *model.blocks_token_only]
    rates = options.drop_path_rates(drop_path, len(model.blocks), drop_path_schedule)
    options.set_drop_path(blocks, rates + [drop_path] * len(model.blocks_token_only))
    options.init_d(model)
    return model


@register_model
def cait_d_cifar(num_classes: int = 10, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
                 img_size: int = 32, lsa_reference_diagonal: bool = True, qkv_bias: bool = False,
                 norm_eps: float = 1e-5, drop_path_schedule: str = "constant", init: str = "d",
                 **overrides) -> DCaiT:
    """D's CaiT at 32 px, patch 4: embed 192, depth 24 + 2, 4 heads of 64, MLP 384: 9,058,066 parameters with
    SPT and LSA (10 classes)."""
    return _cait_d(img_size, 4, num_classes, drop_path, spt, lsa, lsa_reference_diagonal, qkv_bias, norm_eps,
                   drop_path_schedule, init, **overrides)


@register_model
def cait_d_tiny_imagenet(num_classes: int = 200, drop_path: float = 0.1, spt: bool = False, lsa: bool = False,
                         img_size: int = 64, lsa_reference_diagonal: bool = True, qkv_bias: bool = False,
                         norm_eps: float = 1e-5, drop_path_schedule: str = "constant", init: str = "d",
                         **overrides) -> DCaiT:
    """D's CaiT at 64 px, patch 8, otherwise as cait_d_cifar."""
    return _cait_d(img_size, 8, num_classes, drop_path, spt, lsa, lsa_reference_diagonal, qkv_bias, norm_eps,
                   drop_path_schedule, init, **overrides)
