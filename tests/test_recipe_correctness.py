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
    from engine.train_module import TrainModule
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


# ------------------------------------------------------------------------- evaluation normalises with train stats
def _write_split(folder: Path, split: str, n: int, classes: int, name: str, low: int = 0, high: int = 256,
                 seed: int = 0) -> Path:
    """n random 32x32 images with pixels in [low, high) (so the sidecar's mean/std are the set's own), labels cycling."""
    import numpy as np
    from loaders.convert.digits import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    rng = np.random.default_rng(seed)
    images = rng.integers(low, high, (n, 32, 32, 3), dtype=np.uint8)
    out = folder / f"{split}.beton"
    write_beton(ArraySource(images, np.arange(n) % classes, [f"c{i}" for i in range(classes)], name, split), out,
                WriteOptions(num_workers=1, progress=False))
    return out


@pytest.fixture(scope="module")
def shifted_betons(tmp_path_factory):
    """A training split of full-range pixels and a test split of bright ones (another mean/std in its sidecar)."""
    folder = tmp_path_factory.mktemp("shifted")
    return {"train": _write_split(folder, "train", 40, 4, "shifted"),
            "test": _write_split(folder, "test", 24, 4, "shifted", low=150, seed=1)}


def _stats(path):
    from loaders.sidecar import read_sidecar

    meta = read_sidecar(path)
    return meta["mean"], meta["std"]


def test_evaluation_loader_normalises_with_the_training_statistics(shifted_betons):
    from engine.config import DataConfig
    from loaders.factory import build_loader

    (train_mean, train_std), (test_mean, _) = _stats(shifted_betons["train"]), _stats(shifted_betons["test"])
    assert abs(test_mean[0] - train_mean[0]) > 0.1               # the test split's own statistics differ
    data = DataConfig(train=str(shifted_betons["train"]), test=str(shifted_betons["test"]), loader="resident",
                      num_workers=0)
    loader, meta = build_loader(data, False, 0, torch.device("cpu"))
    assert meta["num_images"] == 24                               # the test split's loader...
    assert loader.transform.mean.tolist() == pytest.approx(train_mean)   # ...normalised as the training split
    assert loader.transform.std.tolist() == pytest.approx(train_std)
    raw = torch.cat([b.images for b in loader.epoch(0)])
    assert raw.mean().item() > 0.5   # bright test images stay bright after the training statistics (~0 with their own)


def test_knn_probe_bank_and_queries_both_use_the_training_statistics(shifted_betons, monkeypatch):
    import loaders.factory as factory
    from engine.config import config_from_dict
    from engine.models import create_model
    from engine.pretrain import knn_probe
    from engine.runtime import Runtime

    seen = []
    real = factory.EvalTransform
    monkeypatch.setattr(factory, "EvalTransform", lambda mean, std, *a, **k: seen.append(list(mean)) or
                        real(mean, std, *a, **k))
    cfg = config_from_dict({}, [f"data.train={shifted_betons['train']}", f"data.test={shifted_betons['test']}",
                                "data.loader=resident", "data.num_workers=0", "ssl.knn_k=3"])
    model = create_model("vit_cifar", num_classes=0, depth=1, embed_dim=32, num_heads=2)
    knn_probe(model, cfg, Runtime(0, 1, 0, torch.device("cpu")), torch.float32)
    train_mean = _stats(shifted_betons["train"])[0]
    assert len(seen) == 2 and all(m == pytest.approx(train_mean) for m in seen)   # bank and queries


def test_run_records_its_training_statistics_and_eval_uses_them(shifted_betons, tmp_path, monkeypatch, capsys):
    """trainer_state.pt carries the training split's mean/std; `smallvit eval` normalises with them, and with the
    run's training sidecar for a checkpoint written before they were recorded."""
    import loaders.factory as factory
    from engine import checkpoint
    from engine.cli import main
    from engine.config import config_from_dict
    from engine.train import train

    out = tmp_path / "run"
    train(config_from_dict({}, [f"data.train={shifted_betons['train']}", f"data.test={shifted_betons['test']}",
                                "data.loader=resident", "data.batch_size=20", "data.eval_batch_size=24",
                                "model.depth=1", "model.embed_dim=32", "model.num_heads=2", "optim.epochs=1",
                                "optim.warmup_epochs=0", "engine.precision=fp32", "run.progress=false",
                                f"run.out_dir={out}"]))
    folder = checkpoint.find(out)
    state = checkpoint.read_state(folder)
    train_mean, train_std = _stats(shifted_betons["train"])
    assert state["mean"] == pytest.approx(train_mean) and state["std"] == pytest.approx(train_std)

    recorded = {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}
    torch.save({**state, **recorded}, folder / checkpoint.STATE_FILE)
    stats_seen = []
    real = factory.build_loader
    monkeypatch.setattr(factory, "build_loader", lambda *a, **k: stats_seen.append(k.get("stats")) or real(*a, **k))
    assert main(["eval", str(out), "--no-progress"]) == 0
    old = {k: v for k, v in state.items() if k not in ("mean", "std")}
    torch.save(old, folder / checkpoint.STATE_FILE)
    assert main(["eval", str(out), "--no-progress"]) == 0
    assert stats_seen[0] == (recorded["mean"], recorded["std"])
    assert stats_seen[1][0] == pytest.approx(train_mean) and stats_seen[1][1] == pytest.approx(train_std)
    assert '"count": 24' in capsys.readouterr().out


# ------------------------------------------------------------------------------------- several ranks: plan level
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("num_samples, global_batch, repeats", [(97, 32, 1), (97, 30, 1), (50, 12, 2), (7, 6, 1),
                                                                (1, 6, 1), (101, 24, 3)])
def test_training_plan_without_drop_last_gives_every_rank_the_same_steps(world, num_samples, global_batch, repeats):
    """drop_last=false: each rank reads the same number of batches (its loaders cut the rank's order into
    per-rank batches), each sample at most `repeats` times, batches as equal over the ranks as the tail allows."""
    import numpy as np
    from loaders.order import EpochPlan

    global_batch = global_batch // world * world
    plan = EpochPlan(num_samples, global_batch, seed=1, repeats=repeats, drop_last=False, lockstep_ranks=world)
    per = plan.per_rank_batch(world)
    batches = []
    for rank in range(world):
        positions = plan.rank_positions(rank, world)
        batches.append([positions[i:i + per] for i in range(0, len(positions), per)])
    assert all(len(b) == plan.steps() for b in batches)                       # the same step count on every rank
    for step in range(plan.steps()):
        assert len({len(b[step]) for b in batches}) == 1                      # and the same batch size per step
    seen = np.concatenate([np.concatenate(b) for b in batches if b]) if plan.steps() else np.zeros(0, int)
    assert len(set(seen.tolist())) == len(seen)                              # each position once
    dropped = num_samples * repeats - len(seen)
    assert 0 <= dropped < world                                               # at most the tail's remainder


@pytest.mark.parametrize("world", [1, 2, 3, 6])
@pytest.mark.parametrize("num_images, requested", [(50, 17), (50, 512), (10000, 512), (5, 64)])
def test_evaluation_plan_splits_any_eval_batch_and_sees_every_image_once(world, num_images, requested):
    import numpy as np
    from loaders.factory import eval_global_batch
    from loaders.order import EpochPlan

    batch = eval_global_batch(requested, num_images, world)
    assert batch % world == 0 and 0 < batch <= max(requested, world)
    plan = EpochPlan(num_images, batch, shuffle=False, drop_last=False)
    seen = np.concatenate([plan.rank_order(0, r, world) for r in range(world)])
    assert sorted(seen.tolist()) == list(range(num_images))


# ---------------------------------------------------------------------------------- several ranks: the launcher
def _launch(world: int, betons: dict, out: Path, *extra: str, timeout: float = 420):
    """`deepspeed --num_gpus world` (gloo on the CPU) on the traced training entry; a hang is killed (the whole
    process group: the ranks too) and fails the test instead of hanging it."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "reliability"))
    import runs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = ["deepspeed", "--num_gpus", str(world), "--master_port", str(port),
           str(runs.REPO / "tests" / "reliability" / "traced_train.py"),
           *runs.overrides(betons, out, *extra, drloc=False)]
    proc = subprocess.Popen(cmd, cwd=runs.REPO, env=runs.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{world} ranks: no end after {timeout:.0f} s (a hang); last output:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-4000:]
    return runs


@pytest.fixture(scope="module")
def odd_betons(tmp_path_factory):
    """97 training and 50 test images: neither splits evenly over 2 or 3 ranks at the batches below."""
    folder = tmp_path_factory.mktemp("odd")
    return {"train": _write_split(folder, "train", 97, 4, "odd"),
            "test": _write_split(folder, "test", 50, 4, "odd", seed=1)}


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("world, batch", [(2, 32), (3, 30)])
def test_ranks_without_drop_last_and_an_eval_batch_that_does_not_split(odd_betons, tmp_path, world, batch):
    """Issue 25 items 7 and 8 in one launch per world size: data.drop_last=false with 97 images (2 ranks at batch
    32: a last step of 1 image, which one rank had no share of, hung the gradient all-reduce) and
    data.eval_batch_size=17 (3 ranks: "global batch 17 does not split over 3 ranks" at the first evaluation).
    Every rank takes the same steps, no sample twice per epoch, and each evaluation counts the 50 test images."""
    out = tmp_path / f"ranks{world}"
    runs = _launch(world, odd_betons, out, f"data.batch_size={batch}", "data.eval_batch_size=17",
                   "data.drop_last=false", "optim.epochs=2", "data.train=" + str(odd_betons["train"]),
                   "data.test=" + str(odd_betons["test"]), "data.dataset=odd")
    traces = [runs.trace(out, r) for r in range(world)]
    steps = [sorted(t) for t in traces]
    assert all(s == steps[0] for s in steps)                  # the same global steps on every rank
    per_epoch = 97 // batch + (97 % batch >= world)
    assert steps[0] == list(range(1, 2 * per_epoch + 1))
    for epoch in (0, 1):
        seen = [i for t in traces for rec in t.values() if int(rec["epoch"]) == epoch for i in rec["index"]]
        assert len(seen) == len(set(seen)) and len(seen) > 97 - world
    evals = runs.records(out, "eval")
    assert [r["epoch"] for r in evals] == [1, 2] and all(r["count"] == 50 for r in evals)
    assert all("top5" not in r for r in evals)                 # 4 classes: no top-5
