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
