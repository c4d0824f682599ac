"""Every bench runs end to end at a tiny size and writes the outputs it promises: a JSON with the environment and
one row per variant, a bar chart PNG, and (unless told not to) markdown lines. CPU only; speed is not asserted."""
import json

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


def test_bench_train_tiny(tmp_path):
    rc = bench_main.main(["train", "--batch", "4", "--steps", "1", "--repeats", "1", "--images", "32",
                          "--workers", "0", "--out-dir", str(tmp_path)])
    assert rc == 0
    rows = _check(tmp_path / "train_cpu.json", ["model_only b4", "ours b4", "ours_deepspeed b4", "reference b4"])
    assert rows[0]["vs_model_only"] == pytest.approx(1.0)
    lines = (tmp_path / "README.md").read_text().splitlines()
    assert sum(" | train | " in line for line in lines) == 4


def test_bench_usage_lists_every_bench(capsys):
    assert bench_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("loaders", "heads", "train", "convert"):
        assert name in out
    assert bench_main.main(["nonsense"]) == 2
