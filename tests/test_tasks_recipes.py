"""Every recipe in configs/ loads through the schema, names its reference row, and builds its model and tasks."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config
from engine.models import create_model
from engine.tasks import build_tasks

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
DATASETS = ("cifar10", "cifar100", "svhn", "cinic10", "tinyimagenet")
METHODS = ("vit_scratch", "vit_sl", "vit_drloc", "vit_trans", "vit_finetune", "swin_scratch", "swin_finetune",
           "cait_scratch", "cait_finetune")


def test_every_reference_recipe_exists():
    names = {p.stem for p in CONFIGS}
    missing = [f"{d}_{m}" for d in DATASETS for m in METHODS if f"{d}_{m}" not in names]
    assert not missing, missing


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_loads_and_is_consistent(path):
    cfg = load_config(path)
    text = path.read_text()
    assert 'METHODS.md "Reference numbers", row' in text                       # names the row it reproduces
    dataset, arch, method = path.stem.split("_")
    assert cfg.data.dataset == dataset
    test_split = "val" if dataset == "tinyimagenet" else "test"   # Tiny-ImageNet's test/ has no labels
    assert cfg.data.train == f"data/{dataset}/train.beton" and cfg.data.test == f"data/{dataset}/{test_split}.beton"
    assert cfg.model.name.startswith(arch)
    assert cfg.data.image_size == (64 if dataset == "tinyimagenet" else 32)
    assert cfg.data.repeats == 3 and cfg.optim.label_smoothing == 0.1
    assert (cfg.model.spt, cfg.model.lsa) == ((True, True) if method == "sl" else (False, False))
    assert cfg.tasks.drloc.enabled == (method == "drloc")
    assert cfg.tasks.perceptibility.enabled == (method == "trans")
    assert bool(cfg.model.pretrained) == (method in ("finetune", "trans"))
    assert cfg.optim.epochs == (300 if method == "trans" else 100)


@pytest.mark.parametrize("name", ["cifar10_vit_trans", "tinyimagenet_vit_drloc", "cifar100_swin_scratch",
                                  "svhn_vit_sl"])
def test_recipe_builds_model_and_tasks(name):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    model = create_model(cfg.model.name, num_classes=10, drop_path=cfg.model.drop_path, spt=cfg.model.spt,
                         lsa=cfg.model.lsa)
    tasks = build_tasks(cfg, model.embed_dim, model.grid_size)
    assert len(tasks) == int(cfg.tasks.drloc.enabled) + int(cfg.tasks.perceptibility.enabled)
