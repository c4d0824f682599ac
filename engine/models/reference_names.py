"""Name maps from the reference repositories' state dicts to ours, so `model.finetune_from` loads their checkpoints.

Keys are first stripped of `module.` / `backbone.` (engine/models/pretrained.py), then renamed by the first rule
whose pattern matches; a key no rule matches keeps its name (our own checkpoints, DINO teachers and B's / A's ViT
use timm's names already). No pattern matches one of our own names, so the maps apply to every checkpoint.

D (SPT_LSA_ViT, models/vit.py and models/cait.py; `to_*`, `transformer`, `mlp_head` names):
    to_patch_embedding.merging.{1,2}.*          -> patch_embed.spt.{norm,proj}.*       ViT with SPT
    to_patch_embedding.0.merging.{1,2}.*        -> patch_embed.spt.{norm,proj}.*       CaiT with SPT
    to_patch_embedding.1.weight (dim, p*p*3)    -> patch_embed.proj.weight (dim, 3, p, p), re-laid out
    pos_embedding, cls_token                    -> pos_embed, cls_token
    transformer.layers.i.0.norm / .0.fn.to_qkv / .0.fn.to_out.0 / .0.fn.scale
                                                -> blocks.i.norm1 / attn.qkv / attn.proj / attn.temperature
    transformer.layers.i.1.norm / .1.fn.net.0 / .1.fn.net.3  -> blocks.i.norm2 / mlp.fc1 / mlp.fc2
    patch_transformer.layers.i.{0,1}.scale (1, 1, dim)       -> blocks.i.gamma_{1,2} (dim,)
    patch_transformer.layers.i.0.fn.norm / .0.fn.fn.{to_q,to_kv,to_out.0,scale,mix_heads_pre_attn,
        mix_heads_post_attn}                    -> blocks.i.norm1 / attn.{q,kv,proj,temperature,mix_pre,mix_post}
    patch_transformer.layers.i.1.fn.norm / .1.fn.fn.net.{0,3}  -> blocks.i.norm2 / mlp.{fc1,fc2}
    cls_transformer.layers.j.*                  -> blocks_token_only.j.* (as patch_transformer)
    mlp_head.0 / mlp_head.1                     -> norm / head
B (vits-for-small-scale-datasets): its CaiT's patch embedding, Rearrange + Linear:
    patch_embed.1.weight (dim, p*p*3)           -> patch_embed.proj.weight (dim, 3, p, p), re-laid out
An auxiliary task's head keys are renamed by the rules its task class lists (AuxTask.reference_rules: C's and A's
task heads), passed in with the heads: `translate_key(key, extra_rules)`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

Transform = Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]]


def linear_to_patch_conv(value: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """A patch Linear (dim, p*p*c) over (p1 p2 c)-flattened patches as the conv weight (dim, c, p, p) it equals;
    None when the shapes do not fit."""
    if value.dim() != 2 or target.dim() != 4 or value.shape != (target.shape[0], target[0].numel()):
        return None
    dim, c, p1, p2 = target.shape
    return value.reshape(dim, p1, p2, c).permute(0, 3, 1, 2).contiguous()


def layer_scale_to_gamma(value: torch.Tensor, target: torch.Tensor) -> Optional[torch.Tensor]:
    """D's LayerScale (1, 1, dim) as timm's gamma (dim,)."""
    return value.reshape(target.shape) if value.numel() == target.numel() else None


@dataclass(frozen=True)
class Rule:
    reference: str                     # which repository's names: 'A', 'B', 'C' or 'D'
    pattern: str                       # a regular expression over the whole key
    replacement: str                   # re.sub replacement (\\1, \\2: the pattern's groups)
    transform: Optional[Transform] = None

    def rename(self, key: str) -> Optional[str]:
        if re.fullmatch(self.pattern, key) is None:
            return None
        return re.sub(self.pattern, self.replacement, key)


_D_VIT_BLOCK = {"0.norm": "norm1", "0.fn.to_qkv": "attn.qkv", "0.fn.to_out.0": "attn.proj",
                "0.fn.scale": "attn.temperature", "1.norm": "norm2", "1.fn.net.0": "mlp.fc1", "1.fn.net.3": "mlp.fc2"}
_D_ATTN = {"to_q": "q", "to_kv": "kv", "to_out.0": "proj", "scale": "temperature", "mix_heads_pre_attn": "mix_pre",
           "mix_heads_post_attn": "mix_post"}


def _d_cait_rules(ours: str, theirs: str) -> list[Rule]:
    lay = rf"{theirs}\.layers\.(\d+)"
    rules = [Rule("D", rf"{lay}\.0\.scale", rf"{ours}.\1.gamma_1", layer_scale_to_gamma),
             Rule("D", rf"{lay}\.1\.scale", rf"{ours}.\1.gamma_2", layer_scale_to_gamma),
             Rule("D", rf"{lay}\.0\.fn\.norm\.(weight|bias)", rf"{ours}.\1.norm1.\2"),
             Rule("D", rf"{lay}\.1\.fn\.norm\.(weight|bias)", rf"{ours}.\1.norm2.\2"),
             Rule("D", rf"{lay}\.1\.fn\.fn\.net\.0\.(weight|bias)", rf"{ours}.\1.mlp.fc1.\2"),
             Rule("D", rf"{lay}\.1\.fn\.fn\.net\.3\.(weight|bias)", rf"{ours}.\1.mlp.fc2.\2")]
    for theirs_name, our_name in _D_ATTN.items():
        rules.append(Rule("D", rf"{lay}\.0\.fn\.fn\.{re.escape(theirs_name)}(\.weight|\.bias|)",
                          rf"{ours}.\1.attn.{our_name}\2"))
    return rules


RULES: tuple[Rule, ...] = (
    # D's ViT and CaiT
    Rule("D", r"to_patch_embedding\.(?:0\.)?merging\.1\.(weight|bias)", r"patch_embed.spt.norm.\1"),
    Rule("D", r"to_patch_embedding\.(?:0\.)?merging\.2\.(weight|bias)", r"patch_embed.spt.proj.\1"),
    Rule("D", r"to_patch_embedding\.1\.weight", "patch_embed.proj.weight", linear_to_patch_conv),
    Rule("D", r"to_patch_embedding\.1\.bias", "patch_embed.proj.bias"),
    Rule("D", r"pos_embedding", "pos_embed"),
    *[Rule("D", rf"transformer\.layers\.(\d+)\.{re.escape(theirs)}(\.weight|\.bias|)", rf"blocks.\1.{ours}\2")
      for theirs, ours in _D_VIT_BLOCK.items()],
    *_d_cait_rules("blocks", "patch_transformer"),
    *_d_cait_rules("blocks_token_only", "cls_transformer"),
    Rule("D", r"mlp_head\.0\.(weight|bias)", r"norm.\1"),
    Rule("D", r"mlp_head\.1\.(weight|bias)", r"head.\1"),
    # B's CaiT patch embedding
    Rule("B", r"patch_embed\.1\.weight", "patch_embed.proj.weight", linear_to_patch_conv),
    Rule("B", r"patch_embed\.1\.bias", "patch_embed.proj.bias"),
)


def translate_key(key: str, extra_rules: Sequence[Rule] = ()) -> tuple[str, Optional[Rule]]:
    """(our name for `key`, the rule that renamed it or None when it keeps its name); `extra_rules` (the auxiliary
    tasks' AuxTask.reference_rules) are tried after the models' RULES."""
    for rule in (*RULES, *extra_rules):
        renamed = rule.rename(key)
        if renamed is not None:
            return renamed, rule
    return key, None
