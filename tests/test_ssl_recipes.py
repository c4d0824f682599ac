"""The pretraining recipes (configs/ssl_*.yaml): every <dataset> x <arch> exists, loads, passes the pretraining
checks and carries METHODS.md B's values; the CPU-sized demonstration recipe differs only where its comment says."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import load_config
from engine.pretrain import check_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
DATASETS = ("cifar10", "cifar100", "svhn", "cinic10", "tinyimagenet")
ARCHS = ("vit", "swin", "cait")
SPEC = {   # METHODS.md B
    "ssl.out_dim": 1024, "ssl.hidden_dim": 512, "ssl.bottleneck_dim": 256, "ssl.norm_last_layer": True,
    "ssl.student_temp": 0.1, "ssl.warmup_teacher_temp": 0.04, "ssl.teacher_temp": 0.07,
    "ssl.warmup_teacher_temp_epochs": 10, "ssl.center_momentum": 0.9, "ssl.momentum_teacher": 0.996,
    "ssl.weight_decay_end": 0.4, "ssl.freeze_last_layer": 1, "ssl.lr_per_256": True, "ssl.clip_mode": "per_param",
    "optim.lr": 1e-4, "optim.min_lr": 1e-6, "optim.weight_decay": 0.04, "optim.warmup_epochs": 30,
    "optim.clip_grad": 3.0, "optim.epochs": 200, "model.drop_path": 0.1, "data.multicrop": True,
    "data.local_crops": 8, "engine.zero_stage": 0,
}
# what the CPU demonstration changes, each named in its header comment
CPU_SMALL = {"model.depth": 4, "model.embed_dim": 128, "model.num_heads": 4, "model.drop_path": 0.0,
             "data.local_crops": 4, "data.batch_size": 128, "optim.lr": 5e-4, "ssl.lr_per_256": False,
             "optim.warmup_epochs": 2, "optim.min_lr": 1e-5, "ssl.teacher_temp": 0.04,
             "ssl.warmup_teacher_temp_epochs": 0, "ssl.momentum_teacher": 0.99, "ssl.weight_decay_end": 0.1,
             "optim.epochs": 10}


def _get(cfg, dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_recipe_has_the_spec_values(dataset, arch):
    path = CONFIGS / f"ssl_{dataset}_{arch}.yaml"
    cfg = load_config(str(path), [])
    check_config(cfg, 1)
    for key, value in SPEC.items():
        assert _get(cfg, key) == value, f"{path.name}: {key}"
    tiny = dataset == "tinyimagenet"
    assert cfg.data.image_size == (64 if tiny else 32)
    assert tuple(cfg.data.global_crop_scale) == ((0.5, 1.0) if tiny else (0.7, 1.0))
    assert tuple(cfg.data.local_crop_scale) == ((0.2, 0.4) if tiny else (0.2, 0.5))
    assert cfg.data.dataset == dataset and cfg.run.out_dir == f"runs/ssl_{dataset}_{arch}"
    assert cfg.model.name.startswith(arch)


def test_no_unexpected_pretraining_recipe():
    names = {p.stem for p in CONFIGS.glob("ssl_*.yaml")}
    expected = {f"ssl_{d}_{a}" for d in DATASETS for a in ARCHS} | {"ssl_cifar10_vit_cpu_small"}
    assert names == expected


def test_cpu_demonstration_recipe_deviates_only_where_it_says():
    cfg = load_config(str(CONFIGS / "ssl_cifar10_vit_cpu_small.yaml"), [])
    check_config(cfg, 1)
    spec = load_config(str(CONFIGS / "ssl_cifar10_vit.yaml"), [])
    header = (CONFIGS / "ssl_cifar10_vit_cpu_small.yaml").read_text().split("\ndata:")[0]
    for key, value in CPU_SMALL.items():
        assert _get(cfg, key) == value, key
    for key in SPEC:
        if key not in CPU_SMALL:
            assert _get(cfg, key) == _get(spec, key), f"{key} differs from the spec recipe but is not named"
    for named in ("4 blocks x 128", "no drop-path", "4 local crops", "batch 128", "lr 5e-4", "0.04 throughout",
                  "0.99 -> 1", "0.04 -> 0.1", "10 epochs"):
        assert named in header, named
