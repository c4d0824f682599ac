"""Fine-tune loading by name (METHODS.md B): teacher weights matched by name, prefixes stripped, position embeddings
of another grid interpolated, every key not loaded reported with its reason."""
from __future__ import annotations

import pytest
import torch

from engine.config import ConfigError
from engine.models import create_model
from engine.models.pretrained import (LoadReport, classifier_keys, load_backbone_weights, read_state_dict,
                                      strip_prefixes)
from engine.ssl.backbone import interpolate_pos_embed


def small_vit(classes, **kw):
    return create_model("vit_cifar", num_classes=classes, depth=2, embed_dim=32, num_heads=4, **kw)


def test_loads_by_name_from_a_dino_checkpoint(tmp_path):
    torch.manual_seed(0)
    teacher = small_vit(0)                                # DINO backbones have no class head
    state = {f"backbone.{k}": v for k, v in teacher.state_dict().items()}
    state["head.mlp.0.weight"] = torch.randn(64, 32)      # the DINO projection head: not part of the model
    # a reordered dict: position-based pairing (the reference) would misload, by-name must not
    state = dict(reversed(list(state.items())))
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"module.{k}": v for k, v in state.items()}, "student": {}}, path)

    torch.manual_seed(1)
    model = small_vit(10)
    report = load_backbone_weights(model, read_state_dict(path, "teacher"))
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value)
    assert report.missing == ["head.bias", "head.weight"]          # the new class head keeps its init
    assert report.classifier == ["head.bias", "head.weight"] and report.backbone_missing == []
    assert report.mismatched == [] and "head.mlp.0.weight" in report.unexpected
    assert len(report.loaded) == len(teacher.state_dict())
    assert "missing 2" in report.summary()


def test_report_on_shuffled_renamed_missing_and_reshaped_keys():
    """Every key that did not load appears once, with its reason; every key that did holds the checkpoint value."""
    torch.manual_seed(0)
    source = small_vit(0)
    state = dict(source.state_dict())
    keys = list(state)
    order = torch.randperm(len(keys), generator=torch.Generator().manual_seed(3)).tolist()
    state = {keys[i]: state[keys[i]] for i in order}                          # shuffled
    state["blocks.0.attn.qkv_renamed.weight"] = state.pop("blocks.0.attn.qkv.weight")   # renamed
    del state["blocks.1.mlp.fc2.bias"]                                        # missing
    state["blocks.1.norm1.weight"] = torch.ones(16)                           # reshaped (32 -> 16)
    torch.manual_seed(1)
    model = small_vit(10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_backbone_weights(model, state)

    assert report.unexpected == ["blocks.0.attn.qkv_renamed.weight"]
    assert report.mismatched == ["blocks.1.norm1.weight: (16,) -> (32,)"]
    assert report.missing == ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias", "head.bias", "head.weight"]
    assert report.backbone_missing == ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc2.bias"]
    assert report.backbone_mismatched == ["blocks.1.norm1.weight: (16,) -> (32,)"]
    reasons = {row["key"]: row["reason"] for row in report.not_loaded()}
    assert reasons == {"blocks.0.attn.qkv.weight": "missing", "blocks.1.mlp.fc2.bias": "missing",
                       "head.bias": "missing (classifier: expected)", "head.weight": "missing (classifier: expected)",
                       "blocks.0.attn.qkv_renamed.weight": "unexpected",
                       "blocks.1.norm1.weight": "shape (16,) -> (32,)"}
    own = model.state_dict()
    assert set(report.loaded) == set(own) - set(report.missing) - {"blocks.1.norm1.weight"}
    for key in report.loaded:
        torch.testing.assert_close(own[key], source.state_dict()[key])
    for key in report.missing + ["blocks.1.norm1.weight"]:
        torch.testing.assert_close(own[key], before[key])               # left as initialised


def test_shape_mismatch_is_reported_not_loaded():
    model = small_vit(10)
    before = model.head.weight.clone()
    report = load_backbone_weights(model, {"head.weight": torch.zeros(5, 32), "cls_token": torch.ones(1, 1, 32)})
    assert report.mismatched == ["head.weight: (5, 32) -> (10, 32)"]
    assert report.backbone_mismatched == []                          # a classifier of another class count
    assert "head.weight" not in report.missing
    torch.testing.assert_close(model.head.weight, before)
    assert torch.all(model.cls_token == 1)


def test_pos_embed_of_another_grid_is_interpolated_and_reported():
    torch.manual_seed(0)
    source = create_model("vit_cifar", num_classes=0, depth=1, embed_dim=32, num_heads=4, img_size=64)  # 16x16 grid
    model = small_vit(10)                                                                                 # 8x8 grid
    report = load_backbone_weights(model, source.state_dict())
    assert report.interpolated == ["pos_embed: (1, 257, 32) -> (1, 65, 32)"]
    assert "pos_embed" in report.loaded and report.mismatched == []
    torch.testing.assert_close(model.pos_embed, interpolate_pos_embed(source.pos_embed.detach(), 8, 1))
    assert "interpolated 1" in report.summary()
    off = small_vit(10)
    assert load_backbone_weights(off, source.state_dict(), interpolate_pos=False).mismatched == \
        ["pos_embed: (1, 257, 32) -> (1, 65, 32)"]


def test_swin_ape_of_another_grid_is_interpolated():
    kw = dict(num_classes=0, ape=True, depths=(1, 1), num_heads=(2, 4), embed_dim=16)
    source = create_model("swin_cifar", img_size=64, **kw)
    model = create_model("swin_cifar", **kw)
    report = load_backbone_weights(model, source.state_dict())
    assert report.interpolated == ["absolute_pos_embed: (1, 32, 32, 16) -> (1, 16, 16, 16)"]
    assert report.backbone_missing == [] and report.backbone_mismatched == []


def test_classifier_keys_of_each_family():
    assert classifier_keys(small_vit(10)) == ["head.bias", "head.weight"]
    assert classifier_keys(small_vit(0)) == []
    swin = create_model("swin_cifar", num_classes=10, depths=(1, 1), num_heads=(2, 4), embed_dim=16)
    assert classifier_keys(swin) == ["head.fc.bias", "head.fc.weight"]
    cait = create_model("cait_cifar", num_classes=10, depth=1, depth_token_only=1, embed_dim=16, num_heads=2)
    assert classifier_keys(cait) == ["head.bias", "head.weight"]


def test_strip_prefixes_only_leading():
    state = strip_prefixes({"module.backbone.blocks.0.w": torch.zeros(1), "backbone.module.x": torch.zeros(1),
                            "blocks.backbone.y": torch.zeros(1)})
    assert sorted(state) == ["blocks.0.w", "blocks.backbone.y", "x"]


def test_bad_checkpoint_paths_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="model.finetune_from: checkpoint not found"):
        read_state_dict(tmp_path / "nope.pth")
    path = tmp_path / "x.pth"
    torch.save({"teacher": 3}, path)
    with pytest.raises(ConfigError, match=f"model.finetune_from: {path} holds no state dict"):
        read_state_dict(path, "teacher")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ConfigError, match="model.finetune_from: .*bad.safetensors is not a readable safetensors"):
        read_state_dict(bad)


class _Payload:
    """Stands for arbitrary pickled code in a hostile checkpoint."""


def test_pretrained_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "hostile.pth"
    torch.save({"teacher": {"w": torch.zeros(2)}, "extra": _Payload()}, path)
    with pytest.raises(ConfigError, match="does not load as plain tensors"):
        read_state_dict(path)


def test_pretrained_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"backbone.blocks.0.norm1.weight": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    state = read_state_dict(tmp_path / "w.safetensors")
    assert list(state) == ["blocks.0.norm1.weight"] and torch.equal(state["blocks.0.norm1.weight"], torch.ones(3))


def test_report_json_round_trip():
    report = LoadReport(source="x", loaded=["a"], missing=["head.weight"], classifier=["head.weight"],
                        mismatched=["b: (1,) -> (2,)"])
    data = report.to_json()
    assert data["not_loaded"] == [{"key": "head.weight", "reason": "missing (classifier: expected)"},
                                  {"key": "b", "reason": "shape (1,) -> (2,)"}]
    assert data["backbone_missing"] == [] and data["backbone_mismatched"] == ["b: (1,) -> (2,)"]


# ------------------------------------------------------------------------------------ reference name maps
def _drloc_task(mode: str, embed_dim: int, grid: int):
    from engine.config import config_from_dict
    from engine.tasks import build_tasks

    cfg = config_from_dict({"tasks": {"drloc": {"enabled": True, "mode": mode}}})
    return build_tasks(cfg, embed_dim, grid)[0]


def test_cs_drloc_head_loads_from_cs_checkpoint_names(tmp_path):
    """C's whole-model state dict ({'model': ...}, DDP's `module.`): its `drloc.0.layers.*` / `drloc.0.unshared.*`
    (C's shapes, the third Linear layers.4 included) load into the drloc task's head; C's backbone keys, which
    belong to another network, are reported unexpected."""
    from test_tasks_drloc import c_state_dict_shapes

    torch.manual_seed(0)
    model = small_vit(10)
    task = _drloc_task("ce", 32, model.grid_size)
    head_state = {k: torch.randn(shape) for k, shape in c_state_dict_shapes(32, "ce", model.grid_size).items()}
    state = {f"module.drloc.0.{k}": v for k, v in head_state.items()}
    state["module.layers.0.blocks.0.attn.qkv.weight"] = torch.zeros(3, 3)          # C's Swin-T: not ours
    torch.save({"model": state, "epoch": 3}, tmp_path / "ckpt_epoch_3.pth")
    report = load_backbone_weights(model, read_state_dict(tmp_path / "ckpt_epoch_3.pth"), heads={"drloc": task})
    for key, value in head_state.items():
        assert torch.equal(task.head.state_dict()[key], value), key
    assert report.references == ["C"] and len(report.renamed) == len(head_state) == 10
    assert report.unexpected == ["layers.0.blocks.0.attn.qkv.weight"] and report.heads_missing == []


def test_as_translation_and_scale_heads_load(tmp_path):
    """A's Auxillary state dict: `backbone.*` (B's ViT names) and `mlp_head_trans` / `mlp_head_scale` =
    LayerNorm(2D) + Mlp(fc1, fc2) -> the perceptibility task's translate_head / scale_head."""
    from engine.config import config_from_dict
    from engine.tasks import build_tasks

    torch.manual_seed(0)
    source = small_vit(10)
    cfg = config_from_dict({"tasks": {"perceptibility": {"enabled": True, "kind": "both"}}})
    theirs = build_tasks(cfg, 32, 8)[0]
    state = {f"backbone.{k}": v for k, v in source.state_dict().items()}
    for ours, prefix in (("translate_head", "mlp_head_trans"), ("scale_head", "mlp_head_scale")):
        head = getattr(theirs, ours)
        state.update({f"{prefix}.0.{k}": v for k, v in head.norm.state_dict().items()})
        state.update({f"{prefix}.1.{fc}.{k}": v for fc in ("fc1", "fc2")
                      for k, v in getattr(head, fc).state_dict().items()})
    torch.save({"model_state_dict": state, "epoch": 299}, tmp_path / "best.pth")
    torch.manual_seed(1)
    model, task = small_vit(10), build_tasks(cfg, 32, 8)[0]
    report = load_backbone_weights(model, read_state_dict(tmp_path / "best.pth"), heads={"perceptibility": task})
    assert (report.missing, report.unexpected, report.mismatched, report.heads_missing) == ([], [], [], [])
    assert report.references == ["A"] and len(report.renamed) == 12
    for a, b in zip(task.state_dict().values(), theirs.state_dict().values()):
        assert torch.equal(a, b)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in source.state_dict().items())


def test_bs_cait_patch_linear_is_laid_out_as_our_conv():
    """B's CaiT embeds patches with Rearrange('b c (h p1) (w p2) -> b (h w) (p1 p2 c)') + Linear; loaded as
    patch_embed.proj (a conv), it computes the same tokens."""
    torch.manual_seed(0)
    model = create_model("cait_cifar", num_classes=10, depth=1, depth_token_only=1, embed_dim=16, num_heads=2)
    weight, bias = torch.randn(16, 48), torch.randn(16)
    report = load_backbone_weights(model, {"patch_embed.1.weight": weight, "patch_embed.1.bias": bias})
    assert report.mismatched == [] and report.references == ["B"]
    x = torch.randn(2, 3, 32, 32)
    patches = x.reshape(2, 3, 8, 4, 8, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, 64, 48)    # (h w) (p1 p2 c)
    torch.testing.assert_close(model.patch_embed(x), patches @ weight.T + bias)


def test_task_heads_absent_from_the_checkpoint_are_reported_not_refused():
    torch.manual_seed(0)
    teacher, model = small_vit(0), small_vit(10)
    task = _drloc_task("l1", 32, model.grid_size)
    report = load_backbone_weights(model, teacher.state_dict(), heads={"drloc": task})
    assert report.missing == ["head.bias", "head.weight"] and report.backbone_missing == []
    assert report.heads_missing == sorted(f"drloc.head.{k}" for k in task.head.state_dict())
    assert {"key": "drloc.head.layers.0.weight", "reason": "missing (auxiliary head: kept as initialised)"} in \
        report.not_loaded()
    c_l1 = {"drloc.layers.4.weight": torch.zeros(7, 512)}                           # another output size
    report = load_backbone_weights(model, c_l1, heads={"drloc": task})
    assert report.heads_mismatched == ["drloc.head.layers.4.weight: (7, 512) -> (2, 512)"]
    assert report.backbone_mismatched == []
