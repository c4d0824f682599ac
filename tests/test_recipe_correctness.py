"""The recipe around the networks, as the references' code has it: weight-decay groups, the statistics evaluation
normalises with, and evaluation/training on several ranks (issue 25 items 1, 2, 7, 8)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# ------------------------------------------------------------------------------------------ weight decay groups
# The references' definitions, read in their repositories (commit):
#   B hananshafi/vits-for-small-scale-datasets (43a7493d) finetune.py:250
#       optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
#   D aanna0701/SPT_LSA_ViT (54bd796a) main.py:230, the same call
#   A cmcamdy/Train_ViT_Translation_Perceptibility (795732f0) vits-for-small-scale-datasets/finetune_affine.py:412 and
#       SPT_LSA_ViT/main_affine.py:352, the same call
#   B utils/utils_ssl.py:616 get_params_groups (DINO's), used by train_ssl.py:307:
#       if name.endswith(".bias") or len(param.shape) == 1: not_regularized
#   C yhlleo/VTs-Drloc (6ac2c44) optimizer.py set_weight_decay:
#       len(param.shape) == 1 or name.endswith(".bias") or name in model.no_weight_decay() or a keyword of
#       model.no_weight_decay_keywords() -> no decay; C's models/vit.py defines neither, its Swin
#       {'absolute_pos_embed'} and {'relative_position_bias_table'}
#   timm 1.0 param_groups_weight_decay(model, wd, no_weight_decay_list=model.no_weight_decay()):
#       param.ndim <= 1 or name.endswith(".bias") or name in the list -> no decay

VIT_ALL = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "blocks.0.norm1.weight",
           "blocks.0.norm1.bias", "blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight",
           "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias", "blocks.0.mlp.fc1.weight",
           "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.weight", "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias",
           "head.weight", "head.bias"]
VIT_DECAY = {
    "none": VIT_ALL,
    "dino": ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight",
             "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"],
    "timm": ["patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
             "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"],
}


def _decayed(module, convention, wd=0.05):
    from engine.weight_decay import param_groups

    names = {id(p): n for n, p in module.named_parameters() if p.requires_grad}
    groups = param_groups(module, wd, convention)
    assert groups[0]["weight_decay"] == wd and all(g["weight_decay"] == 0.0 for g in groups[1:])
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(names)   # every trainable one once
    return [names[id(p)] for p in groups[0]["params"]]


@pytest.mark.parametrize("convention", ["none", "dino", "timm"])
def test_weight_decay_convention_lists_exactly_the_decayed_vit_parameters(convention):
    from engine.models import create_model

    model = create_model("vit_cifar", num_classes=4, depth=1, embed_dim=32, num_heads=2)
    assert [n for n, _ in model.named_parameters()] == VIT_ALL
    assert _decayed(model, convention) == VIT_DECAY[convention]


def test_weight_decay_swin_relative_position_tables_per_convention():
    """Swin's relative-position bias table (2-D): decayed by `none` and by DINO's rule (only 1-D and biases are
    exempt), exempt under timm's (Swin's no_weight_decay() names it), as C's Swin code exempts it by keyword."""
    from engine.models import create_model

    model = create_model("swin_cifar", num_classes=4)
    tables = [n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")]
    assert len(tables) == 12
    decayed = {c: set(_decayed(model, c)) for c in ("none", "dino", "timm")}
    assert set(tables) <= decayed["none"] and set(tables) <= decayed["dino"]
    assert not set(tables) & decayed["timm"]
    matrices = {n for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")}
    assert decayed["dino"] == matrices and decayed["timm"] == matrices - set(tables)


def test_weight_decay_names_inside_the_training_module_and_the_dino_network():
    """The exemptions follow the model into the modules the loops wrap it in (model.*, backbone.backbone.*)."""
    from engine.config import config_from_dict
    from engine.pretrain import build_network
    from engine.train import TrainModule
    from engine.models import create_model

    model = create_model("vit_cifar", num_classes=4, depth=1, embed_dim=32, num_heads=2)
    module = TrainModule(model, torch.nn.ModuleList(), 0.1)
    assert _decayed(module, "timm") == [f"model.{n}" for n in VIT_DECAY["timm"]]
    cfg = config_from_dict({}, ["model.depth=1", "model.embed_dim=32", "model.num_heads=2", "ssl.out_dim=16",
                                "ssl.hidden_dim=16", "ssl.bottleneck_dim=8"])
    decayed = _decayed(build_network(cfg, 0.0), "dino")
    assert "backbone.backbone.pos_embed" in decayed and "backbone.backbone.cls_token" in decayed
    assert not [n for n in decayed if n.endswith(".bias")]


def _recipe_convention(name: str) -> str:
    """The reference each recipe follows: DINO's pretraining (ssl_*), C's optimizer on a ViT (drloc from scratch),
    the AdamW(model.parameters()) of B's finetune.py, D's main.py and A's finetune_affine.py (everything else)."""
    if name.startswith("ssl_"):
        return "dino"
    if name.endswith("_drloc") and "_finetune" not in name:
        return "dino"
    return "none"


def test_every_recipe_sets_its_references_decay_convention_and_says_so():
    from engine.config import load_config

    recipes = sorted(CONFIGS.glob("*.yaml"))
    assert len(recipes) > 60
    for path in recipes:
        expected = _recipe_convention(path.stem)
        assert load_config(path).optim.no_decay == expected, path.name
        header = " ".join(line[2:] for line in path.read_text().split("\ndata:")[0].splitlines())
        assert re.search(rf"Weight decay: optim\.no_decay={expected} \(", header), path.name


def test_no_decay_default_is_timm_and_bad_value_names_the_key():
    from engine.config import ConfigError, config_from_dict

    assert config_from_dict({}).optim.no_decay == "timm"
    with pytest.raises(ConfigError, match=r"optim\.no_decay"):
        config_from_dict({}, ["optim.no_decay=all"])
