"""`model.finetune_from` (METHODS.md B, the fine-tune stage): every kind of source it names loads the teacher backbone
by name, the report lands in the log and out_dir/finetune_load.json, and a backbone that did not load stops the
run before it starts; a short supervised run fine-tunes from a pretraining run folder with drloc and translation
perceptibility on."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine import checkpoint
from engine.config import ConfigError, ModelConfig, config_from_dict
from engine.models import create_model
from engine.models.pretrained import REPORT_FILE, load_finetune_weights

SIZES = dict(depth=2, embed_dim=32, num_heads=4)
CLASSIFIER = ["head.bias", "head.weight"]


def teacher_backbone(seed: int) -> torch.nn.Module:
    """What the pretraining exports: the backbone built with num_classes=0 (no classifier, no DINO head)."""
    torch.manual_seed(seed)
    return create_model("vit_cifar", num_classes=0, **SIZES)


def fake_checkpoint(run_dir: Path, step: int, model: torch.nn.Module) -> Path:
    """A complete smallvit checkpoint folder as engine.checkpoint.save lays it out (DeepSpeed files stubbed),
    named by the run's `latest` pointer."""
    folder = checkpoint.checkpoint_root(run_dir) / f"step_{step:08d}"
    (folder / "ds").mkdir(parents=True)
    torch.save({"global_step": step}, folder / checkpoint.STATE_FILE)
    checkpoint.export_weights(model, folder / checkpoint.EXPORT_FILE)
    (checkpoint.checkpoint_root(run_dir) / "latest").write_text(folder.name + "\n")
    return folder


def model_cfg(source, **kw) -> ModelConfig:
    return ModelConfig(name="vit_cifar", finetune_from=str(source), **kw)


def assert_backbone_equal(model, teacher):
    own = model.state_dict()
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(own[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ every source
def test_run_folder_loads_its_latest_checkpoint(tmp_path):
    run = tmp_path / "ssl_run"
    fake_checkpoint(run, 10, teacher_backbone(0))
    newest = fake_checkpoint(run, 20, teacher_backbone(1))
    model = create_model("vit_cifar", num_classes=10, **SIZES)
    report = load_finetune_weights(model, model_cfg(run), out_dir=tmp_path / "out")
    assert_backbone_equal(model, teacher_backbone(1))
    assert report.source == str(newest / checkpoint.EXPORT_FILE)
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert saved["source"] == report.source and saved["missing"] == CLASSIFIER
    assert saved["not_loaded"] == [{"key": k, "reason": "missing (classifier: expected)"} for k in CLASSIFIER]
    assert len(saved["loaded"]) == len(teacher_backbone(1).state_dict())


def test_checkpoint_folder_loads_its_weights(tmp_path):
    run = tmp_path / "ssl_run"
    older = fake_checkpoint(run, 10, teacher_backbone(0))
    fake_checkpoint(run, 20, teacher_backbone(1))
    model = create_model("vit_cifar", num_classes=10, **SIZES)
    report = load_finetune_weights(model, model_cfg(older))      # that checkpoint, not the run's latest
    assert_backbone_equal(model, teacher_backbone(0))
    assert report.backbone_missing == []


def test_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "teacher.safetensors"
    save_file({f"backbone.{k}": v.contiguous() for k, v in teacher_backbone(2).state_dict().items()}, str(path))
    model = create_model("vit_cifar", num_classes=10, **SIZES)
    load_finetune_weights(model, model_cfg(path))
    assert_backbone_equal(model, teacher_backbone(2))


def test_dino_style_pth_with_teacher_entry_and_prefixes(tmp_path):
    teacher, student = teacher_backbone(3), teacher_backbone(4)
    dino_head = {"head.mlp.0.weight": torch.randn(512, 32), "head.last_layer.weight_g": torch.ones(1024, 1)}

    def wrapped(model):   # DINO: DDP's module. + MultiCropWrapper's backbone. + the projection head
        state = {f"module.backbone.{k}": v for k, v in model.state_dict().items()}
        return {**state, **{f"module.{k}": v for k, v in dino_head.items()}}

    path = tmp_path / "checkpoint.pth"
    torch.save({"student": wrapped(student), "teacher": wrapped(teacher), "epoch": 100}, path)
    model = create_model("vit_cifar", num_classes=10, **SIZES)
    report = load_finetune_weights(model, model_cfg(path), out_dir=tmp_path)
    assert_backbone_equal(model, teacher)
    assert report.unexpected == sorted(dino_head)
    reasons = {row["key"]: row["reason"] for row in json.loads((tmp_path / REPORT_FILE).read_text())["not_loaded"]}
    assert reasons == {"head.bias": "missing (classifier: expected)", "head.weight": "missing (classifier: expected)",
                       "head.last_layer.weight_g": "unexpected", "head.mlp.0.weight": "unexpected"}
    other = create_model("vit_cifar", num_classes=10, **SIZES)          # finetune_key picks the other entry
    load_finetune_weights(other, model_cfg(path, finetune_key="student"))
    assert_backbone_equal(other, student)


@pytest.mark.parametrize("name, sizes, classifier", [
    ("swin_cifar", dict(depths=(1, 1), num_heads=(2, 4), embed_dim=16, ape=True), ["head.fc.bias", "head.fc.weight"]),
    ("cait_cifar", dict(depth=2, depth_token_only=1, embed_dim=16, num_heads=2, spt=True, lsa=True), CLASSIFIER),
    ("vit_tiny_imagenet", dict(spt=True, lsa=True, **SIZES), CLASSIFIER),
])
def test_every_family_loads_its_backbone_and_only_the_classifier_is_missing(tmp_path, name, sizes, classifier):
    torch.manual_seed(7)
    teacher = create_model(name, num_classes=0, **sizes)
    fake_checkpoint(tmp_path / "run", 1, teacher)
    model = create_model(name, num_classes=10, **sizes)
    report = load_finetune_weights(model, ModelConfig(name=name, finetune_from=str(tmp_path / "run")))
    assert report.missing == classifier and report.mismatched == [] and report.unexpected == []
    assert_backbone_equal(model, teacher)


# ------------------------------------------------------------------------------------------ refusals
def test_nothing_loaded_is_refused_naming_key_and_file(tmp_path):
    run = tmp_path / "swin_run"
    fake_checkpoint(run, 5, create_model("swin_cifar", num_classes=0, depths=(1, 1), num_heads=(2, 4),
                                         embed_dim=8))     # no width in common with the ViT (32)
    model = create_model("vit_cifar", num_classes=10, **SIZES)
    for strict in (True, False):
        with pytest.raises(ConfigError, match=r"model\.finetune_from: no weight of .*swin_run.*model\.safetensors "
                                              r"fits vit_cifar"):
            load_finetune_weights(model, model_cfg(run, finetune_strict=strict), out_dir=tmp_path / "out")
    assert json.loads((tmp_path / "out" / REPORT_FILE).read_text())["loaded"] == []   # the report is still written


def test_partial_backbone_is_refused_unless_not_strict(tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in teacher_backbone(5).state_dict().items()}
    del state["blocks.1.mlp.fc1.weight"]
    state["blocks.0.norm2.bias"] = torch.zeros(7)
    path = tmp_path / "partial.safetensors"
    save_file(state, str(path))
    model = create_model("vit_cifar", num_classes=10, **SIZES)
    with pytest.raises(ConfigError) as err:
        load_finetune_weights(model, model_cfg(path))
    text = str(err.value)
    assert "model.finetune_from" in text and str(path) in text and "model.finetune_strict=false" in text
    assert "blocks.1.mlp.fc1.weight" in text and "blocks.0.norm2.bias: (7,) -> (32,)" in text
    report = load_finetune_weights(model, model_cfg(path, finetune_strict=False))
    assert report.backbone_missing == ["blocks.1.mlp.fc1.weight"]
    assert report.backbone_mismatched == ["blocks.0.norm2.bias: (7,) -> (32,)"]


def test_missing_paths_and_folders_without_checkpoint(tmp_path):
    model = create_model("vit_cifar", num_classes=10, **SIZES)
    with pytest.raises(ConfigError, match="model.finetune_from: .*nowhere does not exist"):
        load_finetune_weights(model, model_cfg(tmp_path / "nowhere"))
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(ConfigError, match="model.finetune_from: .*empty_run is a folder without a complete"):
        load_finetune_weights(model, model_cfg(tmp_path / "empty_run"))


def test_config_keys():
    cfg = config_from_dict({"model": {"finetune_from": "runs/ssl_cifar10_vit", "finetune_strict": False}})
    assert (cfg.model.finetune_from, cfg.model.finetune_key, cfg.model.finetune_strict) == \
        ("runs/ssl_cifar10_vit", "teacher", False)
    with pytest.raises(ConfigError, match="unknown key 'model.pretrained'"):
        config_from_dict({"model": {"pretrained": "x.pth"}})


def test_a_reference_checkpoint_loads_through_its_name_map(tmp_path):
    """D's SL-ViT checkpoint as D's main.py leaves it (a plain state dict of D's names) fine-tunes our D-option
    ViT strictly: every backbone key renamed and loaded, the report says which reference's map did it."""
    from test_models_reference import D_VIT, reference_weights

    figures = json.loads((Path(__file__).parent / "fixtures" / "reference_d.json").read_text())
    state = reference_weights(figures["cases"]["vit_spt_lsa"]["state_dict"])
    del state["mlp_head.1.weight"], state["mlp_head.1.bias"]            # another class count: no classifier
    torch.save(state, tmp_path / "checkpoint.pth")
    model = create_model("vit_cifar", num_classes=100, spt=True, lsa=True, **D_VIT)
    report = load_finetune_weights(model, model_cfg(tmp_path / "checkpoint.pth"), out_dir=tmp_path / "out")
    assert report.missing == CLASSIFIER and report.unexpected == [] and report.references == ["D"]
    assert torch.equal(model.blocks[8].attn.qkv.weight, state["transformer.layers.8.0.fn.to_qkv.weight"])
    saved = json.loads((tmp_path / "out" / REPORT_FILE).read_text())
    assert "transformer.layers.0.0.fn.scale -> blocks.0.attn.temperature" in saved["renamed"]
    b_vit = create_model("vit_cifar", num_classes=100, spt=True, lsa=True)         # B's options: qkv bias
    with pytest.raises(ConfigError, match="did not fully load.*blocks.0.attn.qkv.bias"):
        load_finetune_weights(b_vit, model_cfg(tmp_path / "checkpoint.pth"))


# ------------------------------------------------------------------------------------------ in the loop
def _train_cfg(betons, out_dir, source, *extra):
    return config_from_dict({}, [
        f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny", "data.loader=ffcv",
        "data.batch_size=16", "data.eval_batch_size=48", "data.num_workers=1", "model.drop_path=0.0",
        "model.depth=2", "model.embed_dim=32", "model.num_heads=4", f"model.finetune_from={source}",
        "tasks.drloc.enabled=true", "tasks.perceptibility.enabled=true", "optim.epochs=1", "optim.warmup_epochs=0",
        "engine.precision=fp32", f"run.out_dir={out_dir}", "run.progress=false", "run.log_every=1",
        "run.max_steps=2", *extra])


def test_short_finetune_run_with_drloc_and_perceptibility(tiny_betons, tmp_path):
    from engine.run_log import read_metrics
    from engine.train import train

    run = tmp_path / "ssl_tiny"
    latest = fake_checkpoint(run, 7, teacher_backbone(6))
    out = tmp_path / "finetune"
    summary = train(_train_cfg(tiny_betons, out, run))
    assert summary["exit_code"] == 0 and summary["global_step"] == 2
    report = json.loads((out / REPORT_FILE).read_text())
    assert report["source"] == str(latest / checkpoint.EXPORT_FILE)
    assert report["missing"] == CLASSIFIER and report["mismatched"] == [] and report["unexpected"] == []
    assert len(report["loaded"]) == len(teacher_backbone(6).state_dict())
    assert any(k.startswith("drloc.head.") for k in report["heads_missing"])       # kept as initialised
    assert any(k.startswith("perceptibility.translate_head.") for k in report["heads_missing"])
    records = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]
    assert len(records) == 2
    assert all("drloc_loss" in r and any(k.startswith("perceptibility") for k in r) for r in records), records[0]


def test_finetune_run_refuses_a_backbone_of_another_architecture(tiny_betons, tmp_path):
    from engine.train import train

    run = tmp_path / "ssl_swin"
    fake_checkpoint(run, 3, create_model("swin_cifar", num_classes=0, depths=(1, 1), num_heads=(2, 4),
                                         embed_dim=8))
    with pytest.raises(ConfigError, match="model.finetune_from: no weight of"):
        train(_train_cfg(tiny_betons, tmp_path / "out", run))
    assert not (tmp_path / "out" / "checkpoints").exists()
