"""Every recipe in configs/ loads through the schema, names its reference row and network, and builds its model
(with the parameter count its header states) and tasks."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from engine.config import load_config
from engine.models import create_model
from engine.models.options import model_kwargs
from engine.tasks import build_tasks

# training recipes; the pretraining recipes (ssl_<dataset>_<arch>.yaml) have their own schema section and tests
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")
                 if not p.stem.startswith("ssl_"))
DATASETS = ("cifar10", "cifar100", "svhn", "cinic10", "tinyimagenet")
METHODS = ("vit_scratch", "vit_sl", "vit_drloc", "vit_trans", "vit_finetune", "swin_scratch", "swin_finetune",
           "cait_scratch", "cait_finetune")
# fine-tuning composed with an auxiliary task (A's "vfsd + Trans"; drloc), CIFAR only
COMPOSED = [f"{d}_vit_finetune_{task}" for d in ("cifar10", "cifar100") for task in ("trans", "drloc")]
# D's SL-CaiT, on the datasets of D's README (METHODS.md's table has no such row)
D_ONLY = [f"{d}_cait_sl" for d in ("cifar10", "cifar100", "svhn", "tinyimagenet")]
CLASSES = {"cifar10": 10, "cifar100": 100, "svhn": 10, "cinic10": 10, "tinyimagenet": 200}
ALL = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_every_reference_recipe_exists():
    names = {p.stem for p in CONFIGS}
    missing = [f"{d}_{m}" for d in DATASETS for m in METHODS if f"{d}_{m}" not in names]
    missing += [n for n in COMPOSED + D_ONLY if n not in names]
    assert not missing, missing


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_recipe_loads_and_is_consistent(path):
    cfg = load_config(path)
    text = path.read_text()
    if path.stem in D_ONLY:
        assert "Reproduces D's README (SPT_LSA_ViT) row \"SL-CaiT\"" in text
    else:
        assert 'METHODS.md "Reference numbers", row' in text                   # names the row it reproduces
    dataset, arch, method = path.stem.split("_", 2)
    parts = method.split("_")                      # 'finetune_trans' = fine-tune + translation perceptibility
    assert cfg.data.dataset == dataset
    test_split = "val" if dataset == "tinyimagenet" else "test"   # Tiny-ImageNet's test/ has no labels
    assert cfg.data.train == f"data/{dataset}/train.beton" and cfg.data.test == f"data/{dataset}/{test_split}.beton"
    assert cfg.model.name.startswith(arch)
    assert cfg.data.image_size == (64 if dataset == "tinyimagenet" else 32)
    assert cfg.data.repeats == 3 and cfg.optim.label_smoothing == 0.1
    assert (cfg.model.spt, cfg.model.lsa) == ((True, True) if method == "sl" else (False, False))
    assert cfg.tasks.drloc.enabled == ("drloc" in parts)
    assert cfg.tasks.perceptibility.enabled == ("trans" in parts)
    fine_tuned = "finetune" in parts or method == "trans"          # A's trans rows start from the SSL teacher
    assert cfg.model.finetune_from == (f"runs/ssl_{dataset}_{arch}" if fine_tuned else "")
    assert cfg.model.finetune_key == "teacher" and cfg.model.finetune_strict
    assert cfg.run.out_dir == f"runs/{path.stem}"
    assert cfg.optim.epochs == (300 if method == "trans" else 100)
    # A, B and D pick the policy by dataset name ('CIFAR' -> CIFAR10Policy, 'SVHN' -> SVHNPolicy, else ImageNet)
    # from the PIL port in their utils/autoaug.py (D's main.py, B's finetune.py, A's copies of both)
    policy = "cifar10" if dataset.startswith("cifar") else "svhn" if dataset == "svhn" else "imagenet"
    assert (cfg.data.auto_augment, cfg.data.auto_augment_impl) == (policy, "reference")
    if fine_tuned and method != "trans":
        assert cfg.data.batch_size == 256                          # B's finetune.py


@pytest.mark.parametrize("name", ["cifar10_vit_trans", "tinyimagenet_vit_drloc", "cifar100_swin_scratch",
                                  "svhn_vit_sl", "cifar10_vit_finetune_trans", "cifar100_vit_finetune_drloc"])
def test_recipe_builds_model_and_tasks(name):
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    model = create_model(cfg.model.name, num_classes=10, **model_kwargs(cfg.model))
    tasks = build_tasks(cfg, model.embed_dim, model.grid_size)
    assert len(tasks) == int(cfg.tasks.drloc.enabled) + int(cfg.tasks.perceptibility.enabled)


REFERENCE_OPTIONS = {   # what each reference network is built with (engine/models/options.py)
    "D's": {"qkv_bias": False, "norm_eps": 1e-5, "drop_path_schedule": "constant", "init": "d"},
    "B's ViT": {"qkv_bias": True, "norm_eps": 1e-6, "drop_path_schedule": "linear", "init": "b"},
    "A's ViT": {"qkv_bias": True, "norm_eps": 1e-6, "drop_path_schedule": "linear", "init": "b"},
    "B's Swin": {"qkv_bias": True, "norm_eps": 1e-6, "drop_path_schedule": "linear", "init": "b"},
    "B's CaiT": {"qkv_bias": True, "norm_eps": 1e-6, "drop_path_schedule": "constant", "init": "b"},
}


@pytest.mark.parametrize("path", ALL, ids=[p.stem for p in ALL])
def test_recipe_names_its_network_sets_its_options_and_counts_its_parameters(path):
    """The header's 'Network:' line names the reference network; the model keys are that network's options (set
    explicitly, not left at 'reference'); the stated parameter count is the model the recipe builds."""
    cfg = load_config(path)
    header = " ".join(line[2:] for line in path.read_text().splitlines() if line.startswith("# "))
    network = re.search(r"Network: (\S+ \S+)", header)
    assert network, "no 'Network:' line in the header"
    who = next(k for k in REFERENCE_OPTIONS if network.group(1).startswith(k))
    for key, value in REFERENCE_OPTIONS[who].items():
        assert getattr(cfg.model, key) == value, key
    if who == "D's" and cfg.model.name.startswith("cait"):
        assert cfg.model.name.startswith("cait_d_") and cfg.model.lsa_reference_diagonal is True
    stated = re.search(r"([\d,]+) parameters \((\d+) classes\)", header)
    if stated:
        dataset = path.stem.split("_")[1 if path.stem.startswith("ssl_") else 0]
        assert int(stated.group(2)) == CLASSES[dataset]
        built = create_model(cfg.model.name, num_classes=CLASSES[dataset], **model_kwargs(cfg.model))
        assert sum(p.numel() for p in built.parameters()) == int(stated.group(1).replace(",", ""))
