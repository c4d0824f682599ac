"""What a new user meets in `smallvit eval`, the run's console lines and the CLI (issue 21 items 1, 2, 9, 17, 18).

One small run (the tiny 4-class set, a 2-block ViT of width 48 with 3 heads: not the registered sizes, the loader
chosen by data.loader=auto, run.progress=false) serves the eval and console tests.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import subprocess_env

REPO = Path(__file__).resolve().parents[1]


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def sized_run(tiny_betons, tmp_path_factory):
    """-> (run folder, its summary, the INFO lines it logged)."""
    from engine.config import config_from_dict
    from engine.train import train

    out = tmp_path_factory.mktemp("sized") / "run"
    lines = _Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(lines)
    root.setLevel(logging.INFO)
    try:
        summary = train(config_from_dict({}, [
            f"data.train={tiny_betons['train']}", f"data.test={tiny_betons['test']}", "data.loader=auto",
            "data.batch_size=32", "data.eval_batch_size=48", "model.depth=2", "model.embed_dim=48",
            "model.num_heads=3", "model.drop_path=0.0", "optim.epochs=1", "optim.warmup_epochs=0",
            "engine.precision=fp32", "run.progress=false", f"run.out_dir={out}"]))
    finally:
        root.removeHandler(lines)
        root.setLevel(level)
    return out, summary, lines.lines


def _eval(capsys, *args) -> tuple[int, str, str]:
    from engine.cli import main

    capsys.readouterr()
    code = main(["eval", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("smallvit: error")]
    assert len(lines) == 1, err
    return lines[0]


def _split(folder: Path, name: str, n: int, classes: int) -> Path:
    from loaders.convert.digits import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    images = np.random.default_rng(3).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    path = folder / f"{name}.beton"
    write_beton(ArraySource(images, np.arange(n) % classes, [f"k{i}" for i in range(classes)], name, "test"), path,
                WriteOptions(num_workers=1, progress=False))
    return path


# ------------------------------------------------------------------------------------------------ item 1
def test_eval_rebuilds_the_runs_model_with_its_size_overrides(sized_run, capsys):
    """model.depth/embed_dim/num_heads of the run: eval builds that model (no size mismatch) and reproduces the
    run's own final evaluation."""
    out, summary, _ = sized_run
    code, stdout, err = _eval(capsys, out, "--no-progress")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["count"] == 48
    assert result["top1"] == pytest.approx(summary["last"]["top1"]) and result["loss"] == pytest.approx(
        summary["last"]["loss"], rel=1e-5)


# ------------------------------------------------------------------------------------------------ item 2
@pytest.mark.parametrize("classes", [2, 10])
def test_eval_refuses_a_test_split_with_another_class_count(sized_run, capsys, tmp_path, classes):
    """A 4-class checkpoint on a 2-class split (once 'reported' a wrong accuracy with exit 0) and on a 10-class
    one (once an IndexError): one line naming both counts and both dataset names, exit 2."""
    out, _, _ = sized_run
    name = {2: "two", 10: "ten"}[classes]
    split = _split(tmp_path, name, 20, classes)
    code, stdout, err = _eval(capsys, out, "--no-progress", f"data.test={split}")
    assert code == 2 and not stdout
    line = _error_line(err)
    assert "4 classes (dataset 'tiny')" in line and f"has {classes} (dataset '{name}')" in line, line


# ------------------------------------------------------------------------------------------- item 9 (eval)
def test_eval_of_a_missing_checkpoint_names_what_the_user_typed(capsys, tmp_path):
    for target in (tmp_path / "no_such_run", tmp_path):
        code, _, err = _eval(capsys, target)
        line = _error_line(err)
        assert code == 2 and f"{target}:" in line and "run.resume" not in line, line


# ------------------------------------------------------------------------------------------------ item 17
def test_progress_off_keeps_the_epoch_line_and_the_loader_choice_is_said_once(sized_run):
    _, _, lines = sized_run
    assert len([line for line in lines if line.startswith("epoch 1/1: test top-1")]) == 1, lines
    assert len([line for line in lines if line.startswith("loader auto ->")]) == 1, lines


def test_top5_is_not_reported_for_five_classes_or_fewer(sized_run, capsys):
    out, summary, _ = sized_run
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert evals and all("top5" not in r and "top1" in r for r in evals)
    assert "top5" not in summary["last"]
    _, stdout, _ = _eval(capsys, out, "--no-progress")
    assert "top5" not in json.loads(stdout)


@pytest.mark.parametrize("classes, top5", [(4, False), (5, False), (6, True), (10, True)])
def test_evaluate_computes_top5_only_above_five_classes(classes, top5):
    from engine.evaluate import evaluate
    from engine.runtime import Runtime
    from loaders.batch import Batch

    class Loader:
        def __len__(self):
            return 2

        def epoch(self, epoch, start_step=0):
            for n in (3, 2):
                yield Batch(images=torch.randn(n, classes), labels=torch.arange(n) % classes, index=torch.arange(n))

    result = evaluate(torch.nn.Identity(), Loader(), Runtime(0, 1, 0, torch.device("cpu")), torch.float32)
    assert ("top5" in result) is top5 and result["count"] == 5


def test_eval_shows_a_progress_bar_unless_told_not_to(sized_run, capsys):
    out, _, _ = sized_run
    code, _, err = _eval(capsys, out, "run.progress=true")
    assert code == 0 and "eval:" in err and "batch" in err
    code, _, err = _eval(capsys, out, "run.progress=true", "--no-progress")
    assert code == 0 and "eval:" not in err


def test_override_errors_name_the_override_and_yaml_errors_the_file(tmp_path):
    from engine.config import ConfigError, load_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 1.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["optim.lrr=0.1"])
    assert str(err.value).startswith("override optim.lrr=0.1: unknown key 'optim.lrr'") and str(recipe) not in str(
        err.value)
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["optim.lr=-1"])
    assert str(err.value).startswith("override optim.lr=-1: optim.lr: must be > 0")
    recipe.write_text("optim:\n  lrr: 1.0e-3\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe, ["optim.lr=0.1"])
    assert str(err.value).startswith(f"{recipe}: unknown key 'optim.lrr'")
    recipe.write_text("optim:\n  epochs: 5\n  warmup_epochs: 10\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(recipe))}: optim.warmup_epochs"):
        load_config(recipe)


# ------------------------------------------------------------------------------------------------ item 18
def _smallvit(*args):
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=subprocess_env(PYTHONWARNINGS="ignore"))


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_bench_help_works(flag):
    res = _smallvit("bench", flag)
    assert res.returncode == 0, res.stderr
    assert "python -m bench loaders|heads|train" in res.stdout and "gpu-check" in res.stdout


def test_version():
    from engine import __version__

    res = _smallvit("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"smallvit {__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", __version__)


def test_readme_states_the_demo_recipes_epochs():
    from engine.cli import DEMO_CONFIG
    from engine.config import load_config

    stated = re.search(r"trained for (\d+) epochs", (REPO / "README.md").read_text())
    assert stated and int(stated.group(1)) == load_config(DEMO_CONFIG).optim.epochs
