"""Fine-tune loading (METHODS.md B): teacher weights by name, prefixes stripped, every key not loaded reported."""
from __future__ import annotations

import pytest
import torch

from engine.models import create_model
from engine.models.pretrained import load_backbone_weights, read_state_dict


def small_vit(classes):
    return create_model("vit_cifar", num_classes=classes, depth=2, embed_dim=32, num_heads=4)


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
    assert report.mismatched == [] and "head.mlp.0.weight" in report.unexpected
    assert len(report.loaded) == len(teacher.state_dict())
    assert "missing 2" in report.summary()


def test_shape_mismatch_is_reported_not_loaded():
    model = small_vit(10)
    before = model.head.weight.clone()
    report = load_backbone_weights(model, {"head.weight": torch.zeros(5, 32), "cls_token": torch.ones(1, 1, 32)})
    assert report.mismatched == ["head.weight: (5, 32) -> (10, 32)"]
    assert "head.weight" not in report.missing
    torch.testing.assert_close(model.head.weight, before)
    assert torch.all(model.cls_token == 1)


def test_bad_checkpoint_paths_name_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.pretrained"):
        read_state_dict(tmp_path / "nope.pth")
    path = tmp_path / "x.pth"
    torch.save({"teacher": 3}, path)
    with pytest.raises(ValueError, match="model.pretrained"):
        read_state_dict(path, "teacher")


class _Payload:
    """Stands for arbitrary pickled code in a hostile checkpoint."""


def test_pretrained_checkpoint_with_pickled_objects_is_refused(tmp_path):
    import torch

    from engine.models.pretrained import read_state_dict

    path = tmp_path / "hostile.pth"
    torch.save({"teacher": {"w": torch.zeros(2)}, "extra": _Payload()}, path)
    with pytest.raises(ValueError, match="does not load as plain tensors"):
        read_state_dict(path)


def test_pretrained_reads_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.models.pretrained import read_state_dict

    save_file({"blocks.0.norm1.weight": torch.ones(3)}, str(tmp_path / "w.safetensors"))
    state = read_state_dict(tmp_path / "w.safetensors")
    assert torch.equal(state["blocks.0.norm1.weight"], torch.ones(3))
