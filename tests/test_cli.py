"""The `smallvit` command as a user meets it: help texts, and bad input failing in one line, writing nothing."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


def smallvit(*args, cwd=None, timeout=300):
    env = subprocess_env(PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env=env)


def test_top_level_help_lists_subcommands():
    res = smallvit("--help")
    assert res.returncode == 0
    for cmd in ("convert", "train", "eval", "bench", "inspect", "demo"):
        assert cmd in res.stdout


def test_train_help_lists_every_option_with_its_default():
    from engine.config import describe_options

    res = smallvit("train", "--help")
    assert res.returncode == 0
    for key, _, default in describe_options():
        line = next((l for l in res.stdout.splitlines() if l.strip().startswith(key + " ")), None)
        assert line is not None, key
        assert default in line, (key, default, line)


def test_train_lists_registered_models():
    res = smallvit("train", "--list-models")
    assert res.returncode == 0
    assert {"vit_cifar", "swin_cifar", "cait_cifar", "vit_tiny_imagenet"} <= set(res.stdout.split())


def _error_line(res):
    lines = [l for l in res.stderr.strip().splitlines() if l.startswith("smallvit: error")]
    assert len(lines) == 1, res.stderr
    return lines[0]


def test_unknown_config_key_fails_before_any_work(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lrate: 0.1\n")
    res = smallvit("train", "--config", recipe, f"run.out_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    assert "optim.lrate" in _error_line(res)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_path_fails_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "train.beton"
    res = smallvit("train", f"data.train={missing}", f"data.test={missing}", f"run.out_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    assert str(missing) in _error_line(res)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("same_size", [False, True])
def test_file_that_is_not_a_beton_fails_naming_it(tmp_path, digits_betons, same_size):
    """Random bytes under a real .beton's sidecar: refused by size, or (as large as the real file) by content."""
    fake = tmp_path / "train.beton"
    real_size = Path(digits_betons["train"]).stat().st_size
    fake.write_bytes(os.urandom(real_size if same_size else 4096))
    sidecar = Path(str(digits_betons["train"]) + ".json")
    Path(str(fake) + ".json").write_text(sidecar.read_text())
    res = smallvit("train", f"data.train={fake}", f"data.test={digits_betons['test']}",
                   f"run.out_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    line = _error_line(res)
    assert str(fake) in line
    assert ("not a readable .beton" in line or "checksum" in line or "header" in line) if same_size \
        else "bytes but its sidecar says" in line
    assert not (tmp_path / "out").exists()


def test_beton_of_another_dataset_is_refused(tmp_path, tiny_betons):
    res = smallvit("train", f"data.train={tiny_betons['train']}", f"data.test={tiny_betons['test']}",
                   "data.dataset=cifar10", f"run.out_dir={tmp_path / 'out'}")
    assert res.returncode == 2
    assert "holds dataset 'tiny'" in _error_line(res)


def test_inspect_and_eval_a_run(tmp_path, tiny_betons):
    out = tmp_path / "run"
    res = smallvit("train", f"data.train={tiny_betons['train']}", f"data.test={tiny_betons['test']}",
                   "data.dataset=tiny", "data.batch_size=32", "optim.epochs=1", "optim.warmup_epochs=0",
                   "engine.precision=fp32", "run.progress=false", f"run.out_dir={out}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "final test top-1" in res.stdout
    res = smallvit("inspect", out)
    assert res.returncode == 0, res.stderr
    assert "global_step: 3" in res.stdout
    assert "2,696,452 parameters" in res.stdout       # vit_cifar with a 4-class head; drloc's head is not exported
    res = smallvit("eval", out)
    assert res.returncode == 0, res.stderr
    assert '"count": 48' in res.stdout
