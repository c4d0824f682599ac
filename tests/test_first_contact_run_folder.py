"""Issue 21 items 6, 7, 8, 10, 11, 12, 13: run folders, checkpoint retention, resolved config, timm export, corrupt
checkpoint files, resume with another config. One 3-epoch tiny run (module fixture) serves most tests; the bad
inputs each get their one-line error, exit code 2 and nothing new on disk."""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from pathlib import Path

import pytest
import torch

from engine.config import config_from_dict, load_config

EPOCHS, BATCH, TRAIN = 3, 16, 96
STEPS_PER_EPOCH = TRAIN // BATCH


def _overrides(betons, out, *extra):
    return [f"data.train={betons['train']}", f"data.test={betons['test']}", "data.loader=resident",
            f"data.batch_size={BATCH}", "data.eval_batch_size=48", "model.depth=1", "model.embed_dim=32",
            "model.num_heads=2", "model.drop_path=0.0", f"optim.epochs={EPOCHS}", "optim.warmup_epochs=0",
            "engine.device=cpu", "run.progress=false", "run.log_every=1", f"run.out_dir={out}", *extra]


def _cfg(betons, out, *extra):
    return config_from_dict({}, _overrides(betons, out, *extra))


def _refused(capsys, code, *named):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("smallvit: error: "), (code, err)
    for text in named:
        assert text in err[0], err[0]
    return err[0]


def _listing(folder: Path) -> dict[str, float]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def run(tiny_betons, tmp_path_factory):
    """A finished 3-epoch run (engine.precision left at bf16, which falls back to fp32 on the CPU)."""
    from engine.train import train

    out = tmp_path_factory.mktemp("rf") / "run"
    old_umask = os.umask(0o022)
    try:
        summary = train(_cfg(tiny_betons, out))
    finally:
        os.umask(old_umask)
    assert summary["exit_code"] == 0 and summary["global_step"] == EPOCHS * STEPS_PER_EPOCH
    return out, summary


# ---------------------------------------------------------------------------------------------------- item 7
@pytest.mark.parametrize("where", ["file", "parent"])
def test_item07_out_dir_that_is_a_file_is_refused_before_any_work(tiny_betons, tmp_path, capsys, monkeypatch,
                                                                   where):
    import engine.train as train_module

    monkeypatch.setattr(train_module, "preflight", lambda data: pytest.fail("preflight ran"))
    monkeypatch.setattr(train_module, "init_runtime", lambda *a: pytest.fail("process group started"))
    blocker = tmp_path / "taken"
    blocker.write_text("a file\n")
    out = blocker if where == "file" else blocker / "run"
    t0 = time.perf_counter()
    code = train_module.run_training(_cfg(tiny_betons, out))
    _refused(capsys, code, "run.out_dir", str(blocker))
    assert time.perf_counter() - t0 < 5.0   # no data read, no DeepSpeed
    assert blocker.read_text() == "a file\n" and sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


# --------------------------------------------------------------------------------------------------- item 10
def test_item10_second_run_into_a_used_folder_is_refused(run, tiny_betons, capsys):
    from engine.train import run_training

    out, _ = run
    before = _listing(out)
    code = run_training(_cfg(tiny_betons, out))
    _refused(capsys, code, "run.out_dir", "already holds a run", "run.resume=auto")
    assert _listing(out) == before


def test_item10_resume_of_another_folders_checkpoint_into_a_used_folder_is_refused(run, tiny_betons, tmp_path,
                                                                                    capsys):
    from engine.train import run_training

    out, _ = run
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("")
    code = run_training(_cfg(tiny_betons, other, f"run.resume={out}"))
    _refused(capsys, code, "run.out_dir", "another folder")
    assert sorted(p.name for p in other.iterdir()) == ["metrics.jsonl"]


# --------------------------------------------------------------------------------------------------- item 11
def test_item11_keep_last_and_best(run):
    from engine.run_log import read_metrics

    out, summary = run
    root = out / "checkpoints"
    steps = sorted(p.name for p in root.glob("step_*"))
    assert steps == [f"step_{2 * STEPS_PER_EPOCH:08d}", f"step_{3 * STEPS_PER_EPOCH:08d}"]   # keep_last=2
    assert (root / "latest").read_text().strip() == steps[-1]
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    best = max(evals, key=lambda r: (r["top1"], -r["step"]))   # the first evaluation reaching the maximum
    state = torch.load(root / "best" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == best["step"] == summary["selection"]["best_step"]
    assert state["selection"]["metric"] == "test_top1" and state["selection"]["best"] == best["top1"]
    for name in ("model.safetensors", "config.json", "ds"):
        assert (root / "best" / name).exists(), name
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".old-*"))
    assert summary["best_top1_is"] == "the best over test evaluations"


def test_item11_prune_never_deletes_what_latest_names(tmp_path):
    from engine import checkpoint

    root = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        (root / f"step_{step:08d}").mkdir(parents=True)
    (root / "latest").write_text("step_00000003\n")   # a resumed run re-saving an old step
    checkpoint.prune(root, 1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000009"]
    checkpoint.prune(root, 0)
    assert len(list(root.glob("step_*"))) == 2


# --------------------------------------------------------------------------------------------------- item 12
def test_item12_config_yaml_is_what_ran_and_rebuilds_the_model(run, tmp_path, monkeypatch):
    from engine.models import create_model
    from engine.models.options import model_kwargs

    out, _ = run
    monkeypatch.chdir(tmp_path)   # absolute paths: it loads from anywhere
    cfg = load_config(out / "config.yaml")
    assert (cfg.model.num_classes, cfg.model.depth, cfg.model.embed_dim, cfg.model.num_heads) == (4, 1, 32, 2)
    assert cfg.engine.precision == "fp32" and cfg.data.dataset == "tiny"
    assert Path(cfg.data.train).is_absolute() and Path(cfg.data.train).is_file()
    assert Path(cfg.run.out_dir) == out.resolve()
    model = create_model(cfg.model.name, num_classes=cfg.model.num_classes, **model_kwargs(cfg.model))
    from engine import checkpoint

    exported = checkpoint.read_export(checkpoint.find(out) / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in exported.items()}


# --------------------------------------------------------------------------------------------------- item 13
def test_item13_export_loads_with_timm_local_dir_and_is_world_readable(run):
    import json

    import timm

    from engine import checkpoint

    out, _ = run
    folder = checkpoint.find(out)
    hub = json.loads((folder / "config.json").read_text())
    assert hub["architecture"] == "vit_cifar" and hub["num_classes"] == 4
    assert hub["pretrained_cfg"]["input_size"] == [3, 32, 32] and len(hub["pretrained_cfg"]["mean"]) == 3
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    exported = checkpoint.read_export(folder / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exported.items())
    assert model.pretrained_cfg["mean"] == hub["pretrained_cfg"]["mean"]
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644


# ---------------------------------------------------------------------------------------------------- item 8
def test_item08_resume_with_another_model_names_the_keys_before_deepspeed_loads(run, tiny_betons, capsys,
                                                                                monkeypatch, tmp_path):
    from engine import checkpoint
    from engine.train import run_training

    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    before = _listing(copy)
    monkeypatch.setattr(checkpoint, "load", lambda *a, **k: pytest.fail("DeepSpeed loaded the checkpoint"))
    code = run_training(_cfg(tiny_betons, copy, "run.resume=auto", "model.depth=2", "optim.lr=5e-4"))
    line = _refused(capsys, code, "run.resume", "model.depth 1 -> 2", "optim.lr 0.001 -> 0.0005")
    assert "run.max_steps" not in line
    assert _listing(copy) == before


def test_item08_harmless_keys_may_change_on_resume(run):
    from engine import run_folder
    from engine.config import load_config

    out, _ = run
    saved = torch.load(out / "checkpoints" / "best" / "trainer_state.pt", weights_only=True)
    base = load_config(out / "config.yaml")
    import dataclasses

    changed = dataclasses.replace(base, run=dataclasses.replace(base.run, max_steps=7, progress=True, log_every=5,
                                                                 resume="auto"))
    run_folder.check_resume(saved, changed, out)   # no error
    assert saved["config_digest"] == run_folder.config_digest(base)


# ---------------------------------------------------------------------------------------------------- item 6
def _corrupt(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


@pytest.mark.parametrize("part", ["ds/mp_rank_00_model_states.pt", "trainer_state.pt", "model.safetensors"])
def test_item06_corrupt_part_named_by_eval_inspect_and_resume(run, tiny_betons, tmp_path, capsys, part):
    from engine.evaluate import run_eval
    from engine.inspect_checkpoint import inspect_path
    from engine.train import run_training

    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    latest = copy / "checkpoints" / (copy / "checkpoints" / "latest").read_text().strip()
    bad = latest / part
    _corrupt(bad)
    before = _listing(copy)
    calls = {"resume": lambda: run_training(_cfg(tiny_betons, copy, f"run.resume={latest}")),
             "inspect": lambda: inspect_path(argparse.Namespace(path=str(latest)))}
    if part != "ds/mp_rank_00_model_states.pt":   # eval reads the trainer state and the export only
        calls["eval"] = lambda: run_eval(argparse.Namespace(checkpoint=str(latest), config=None, overrides=[]))
    for name, call in calls.items():
        line = _refused(capsys, call(), str(bad), "corrupt")
        assert "weights_only" not in line and "Traceback" not in line, (name, line)
    assert _listing(copy) == before


def test_item06_resume_auto_falls_back_to_the_newest_readable_checkpoint(run, tiny_betons, tmp_path, caplog):
    from engine.train import train

    out, _ = run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    root = copy / "checkpoints"
    latest = root / root.joinpath("latest").read_text().strip()
    _corrupt(latest / "ds" / "mp_rank_00_model_states.pt")
    older = sorted(root.glob("step_*"))[0]
    with caplog.at_level(logging.INFO, logger="smallvit"):
        summary = train(_cfg(tiny_betons, copy, "run.resume=auto", f"optim.epochs={EPOCHS}"))
    text = caplog.text
    assert "mp_rank_00_model_states.pt" in text and f"resuming from {older}" in text
    assert f"resumed from {older}" in text
    assert summary["exit_code"] == 0 and summary["global_step"] == EPOCHS * STEPS_PER_EPOCH


# ------------------------------------------------------------------------------- the same rules for pretraining
def test_pretraining_follows_the_run_folder_rules(tiny_betons, tmp_path, capsys):
    import json

    from engine.pretrain import pretrain, run_pretraining

    out = tmp_path / "ssl"
    overrides = [f"data.train={tiny_betons['train']}", f"data.test={tiny_betons['test']}", "data.loader=resident",
                 "data.batch_size=32", "data.eval_batch_size=48", "data.multicrop=true", "data.local_crops=2",
                 "data.crop_padding=0", "data.flip=false", "model.depth=1", "model.embed_dim=32", "model.num_heads=2",
                 "ssl.out_dim=64", "ssl.hidden_dim=32", "ssl.bottleneck_dim=16", "ssl.warmup_teacher_temp_epochs=1",
                 "optim.epochs=3", "optim.warmup_epochs=1", "engine.device=cpu", f"run.out_dir={out}",
                 "run.progress=false", "run.keep_last=1"]
    summary = pretrain(config_from_dict({}, overrides))
    assert summary["exit_code"] == 0
    root = out / "checkpoints"
    assert [p.name for p in root.glob("step_*")] == [(root / "latest").read_text().strip()]
    cfg = load_config(out / "config.yaml")
    assert (cfg.model.depth, cfg.model.embed_dim, cfg.engine.precision, cfg.data.dataset) == (1, 32, "fp32", "tiny")
    hub = json.loads((root / (root / "latest").read_text().strip() / "config.json").read_text())
    assert hub["architecture"] == "vit_cifar" and hub["model_args"]["num_classes"] == 0
    before = _listing(out)
    code = run_pretraining(config_from_dict({}, overrides))
    _refused(capsys, code, "run.out_dir", "already holds a run")
    assert _listing(out) == before
