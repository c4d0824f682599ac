"""Every bench runs end to end at a tiny size and writes the outputs it promises: a JSON with the environment and
one row per variant, a bar chart PNG, and (unless told not to) markdown lines. CPU only; speed is not asserted."""
import json
import math
from pathlib import Path

import pytest

from bench import __main__ as bench_main


def _check(json_path, variants_expected):
    data = json.loads(json_path.read_text())
    assert {"bench", "date", "command", "environment", "unit", "rows"} <= set(data)
    assert {"python", "torch", "device", "commit"} <= set(data["environment"])
    rows = data["rows"]
    assert [r["variant"] for r in rows] == variants_expected
    assert all(r["images_per_s"] > 0 for r in rows)
    assert json_path.with_suffix(".png").stat().st_size > 1000
    return rows


def test_bench_loaders_tiny(tmp_path):
    rc = bench_main.main(["loaders", "--source", "", "--images", "64", "--batch", "16", "--workers", "1",
                          "--loaders", "torchvision,resident", "--out-dir", str(tmp_path), "--no-record"])
    assert rc == 0
    rows = _check(tmp_path / "loaders_cpu.json", ["torchvision (full recipe)", "torchvision (crop+flip)",
                                                   "resident (full recipe)", "resident (crop+flip)"])
    assert rows[0]["vs_reference"] == pytest.approx(1.0)
    assert not (tmp_path / "README.md").exists()
    for r in rows:                       # per batch, counted on the meta device here (on CUDA where there is one)
        assert r["counted_on"] in ("meta", "cuda") and r["blocking_copies"] == 0 and r["syncs"] == 0
        assert r["uploads"] == (0 if r["loader"] == "resident" else 1)
    full = {r["loader"]: r for r in rows if r["augment"] == "full"}
    assert full["resident"]["launches"] <= 100 < full["resident"]["launches_eager"]


def test_bench_train_tiny(tmp_path):
    rc = bench_main.main(["train", "--batch", "4", "--steps", "1", "--repeats", "1", "--images", "32",
                          "--workers", "0", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = _check(tmp_path / "train_cpu.json", ["model_only b4", "ours b4", "ours_deepspeed b4",
                                                 "ours_graphed (emulated) b4", "ours_deepspeed_graphed (emulated) b4",
                                                 "reference b4"])
    assert rows[0]["vs_model_only"] == pytest.approx(1.0)
    assert [r["mode"] for r in rows] == ["eager", "eager", "eager", "emulated", "emulated", "eager"]
    lines = (tmp_path / "README.md").read_text().splitlines()
    assert sum(" | train | " in line for line in lines) == 6


def test_bench_convert_tiny(tmp_path):
    """The conversion bench over a generated ImageFolder (train/test splits, 2 classes, 32x32 PNGs): four variants,
    each converting every image of both splits; a missing source is refused."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 4)):
        for c in ("cat", "dog"):
            folder = tmp_path / "src" / split / c
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    rc = bench_main.main(["convert", "--source", str(tmp_path / "src"), "--workers", "1", "--out-dir", str(out),
                          "--out-json", str(tmp_path / "copy.json")])
    assert rc == 0
    rows = _check(out / "convert_cpu.json", ["files -> raw", "files -> jpg", "arrays -> raw", "arrays -> jpg"])
    assert all(r["images"] == 20 and r["MB"] > 0 for r in rows)
    copied = json.loads((tmp_path / "copy.json").read_text())
    assert copied["rows"] == json.loads((out / "convert_cpu.json").read_text())["rows"]
    lines = (out / "README.md").read_text().splitlines()
    assert sum(" | convert | " in line for line in lines) == 4
    assert bench_main.main(["convert", "--source", str(tmp_path / "missing"), "--out-dir", str(out)]) == 2


def test_bench_usage_lists_every_bench(capsys):
    assert bench_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("loaders", "heads", "train", "convert", "ssl"):
        assert name in out
    assert bench_main.main(["nonsense"]) == 2


def test_bench_ssl_tiny(tmp_path, tiny_betons):
    """Random-init k-NN, DINO k-NN per evaluation, fine-tune vs scratch: one row each, curves and summaries in
    the JSON (accuracy, not speed: values are only range-checked)."""
    tiny = ["--set", f"data.train={tiny_betons['train']}", "--set", f"data.test={tiny_betons['test']}",
            "--set", "data.dataset=tiny", "--set", "data.loader=resident", "--set", "data.batch_size=16",
            "--set", "model.depth=1", "--set", "model.embed_dim=32", "--set", "model.num_heads=2",
            "--set", "engine.precision=fp32", "--set", "run.progress=false", "--set", "data.eval_batch_size=48",
            "--pretrain-set", "data.local_crops=2", "--pretrain-set", "ssl.out_dim=64",
            "--finetune-set", "data.auto_augment=none"]
    configs = Path(__file__).resolve().parents[1] / "configs"
    rc = bench_main.main(["ssl", "--pretrain-config", str(configs / "ssl_cifar10_vit.yaml"), "--finetune-config",
                          str(configs / "cifar10_vit_finetune.yaml"), "--pretrain-epochs", "1", "--finetune-epochs", "1",
                          "--work-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path), "--device", "cpu", *tiny])
    assert rc == 0
    data = json.loads((tmp_path / "ssl_cpu.json").read_text())
    assert [r["variant"] for r in data["rows"]] == ["k-NN, random init", "k-NN, DINO epoch 1",
                                                    "fine-tune from DINO, best test top-1", "scratch, best test top-1"]
    assert all(0 <= r["top1"] <= 100 for r in data["rows"])
    assert len(data["curves"]["pretrain_knn"]) == 1 and len(data["curves"]["scratch"]) == 1
    [loss] = data["curves"]["pretrain_loss"]
    assert loss["epoch"] == 0 and 0 < loss["loss"] < 2 * math.log(64)   # out_dim 64: near log K at the start
    assert json.loads((tmp_path / "runs" / "fine-tune" / "finetune_load.json").read_text())["loaded"]
    assert (tmp_path / "README.md").read_text().count(" | ssl | ") == 4
    for run in ("pretrain", "fine-tune", "scratch"):
        assert (tmp_path / f"ssl_cpu_{run}_curves.png").stat().st_size > 0


def test_bench_ssl_stops_when_pretraining_was_interrupted(tmp_path, tiny_betons, monkeypatch, capsys):
    """A pretraining run that ended early (SIGTERM: exit 143) is not compared: the bench returns its exit code and
    writes no results."""
    import engine.pretrain

    monkeypatch.setattr(engine.pretrain, "pretrain", lambda cfg: {"exit_code": 143})
    configs = Path(__file__).resolve().parents[1] / "configs"
    rc = bench_main.main(["ssl", "--pretrain-config", str(configs / "ssl_cifar10_vit.yaml"), "--device", "cpu",
                          "--work-dir", str(tmp_path / "runs"), "--out-dir", str(tmp_path / "out"),
                          "--set", f"data.train={tiny_betons['train']}", "--set", f"data.test={tiny_betons['test']}",
                          "--set", "data.dataset=tiny", "--set", "data.loader=resident", "--set", "model.depth=1",
                          "--set", "model.embed_dim=32", "--set", "model.num_heads=2", "--set", "data.eval_batch_size=48"])
    assert rc == 143
    assert "pretraining stopped early (exit 143)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
