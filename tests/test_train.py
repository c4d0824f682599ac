"""The DeepSpeed loop on the CPU accelerator: a step lowers the loss, a short run writes every output.

Resume exactness and non-finite steps are tested in tests/reliability/ (items 2, 12, 13)."""

import os

import pytest
import torch

from engine.config import config_from_dict
from engine.run_log import read_metrics


def _cfg(betons, out_dir, *extra):
    return config_from_dict({}, [
        f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny", "data.loader=ffcv",
        "data.batch_size=16", "data.eval_batch_size=48", "data.num_workers=1", "data.flip=true",
        "model.drop_path=0.0", "tasks.drloc.enabled=true", "optim.epochs=2", "optim.warmup_epochs=0",
        "engine.precision=fp32", f"run.out_dir={out_dir}", "run.progress=false", "run.log_every=1", *extra])


def test_deepspeed_step_reduces_loss():
    """Five DeepSpeed steps on one fixed batch of the real ViT + drloc lower the total loss."""
    import deepspeed

    from engine.models import create_model
    from engine.runtime import deepspeed_config, init_runtime
    from engine.tasks import build_tasks
    from engine.train import param_groups
    from engine.train_module import TrainModule
    from loaders.batch import Batch

    rt = init_runtime("cpu")
    cfg = config_from_dict({}, ["tasks.drloc.enabled=true", "data.batch_size=8", "engine.precision=fp32",
                                "optim.epochs=10", "optim.warmup_epochs=0"])
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=10, drop_path=0.0)
    module = TrainModule(model, build_tasks(cfg, model.embed_dim, model.grid_size), 0.1)
    optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=5e-4)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=deepspeed_config(cfg, rt.world_size, bf16=False))
    batch = Batch(images=torch.randn(8, 3, 32, 32), labels=torch.arange(8) % 10, index=torch.arange(8))
    losses = []
    for step in range(5):
        loss, parts = engine(batch, 5.0, step)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    assert "drloc_loss" in parts
    assert losses[-1] < losses[0] * 0.9, losses


def test_short_run_writes_metrics_checkpoint_curves(tiny_betons, tmp_path):
    from engine.train import train

    out = tmp_path / "run"
    summary = train(_cfg(tiny_betons, out))
    assert summary["exit_code"] == 0 and summary["epochs_done"] == 2
    assert summary["global_step"] == 2 * (96 // 16)
    records = read_metrics(out / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["epoch"] for r in evals] == [1, 2]
    assert all(r["count"] == 48 for r in evals)           # the whole test split, each sample once
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == summary["global_step"] and all("drloc_loss" in r for r in train_records)
    for name in ("config.yaml", "environment.json", "summary.json", "curves.png"):
        assert (out / name).is_file(), name
    latest = (out / "checkpoints" / "latest").read_text().strip()
    ckpt = out / "checkpoints" / latest
    assert latest == f"step_{summary['global_step']:08d}"
    assert (ckpt / "model.safetensors").is_file() and (ckpt / "trainer_state.pt").is_file()
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    assert state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert not list((out / "checkpoints").glob(".tmp-*"))


def test_resume_refuses_a_checkpoint_of_another_model(tiny_betons, tmp_path):
    from engine.config import ConfigError
    from engine.train import train

    out = tmp_path / "run"
    train(_cfg(tiny_betons, out, "run.max_steps=1"))
    state_file = next((out / "checkpoints").glob("step_*")) / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    torch.save({**state, "model": "cait_cifar", "num_classes": 100}, state_file)
    with pytest.raises(ConfigError, match="holds cait_cifar with 100 classes"):
        train(_cfg(tiny_betons, out, "run.resume=auto"))


def test_deterministic_run_restores_the_callers_setting(tiny_betons, tmp_path, monkeypatch):
    """engine.deterministic holds for the run only: the process's own setting (off, or on with warn_only) comes
    back after it, and CUBLAS_WORKSPACE_CONFIG is set for CUDA's deterministic cuBLAS unless the user set it."""
    from engine.runtime import deterministic_algorithms
    from engine.train import train

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    seen = {}

    def spy(*args, **kwargs):
        seen["inside"] = torch.are_deterministic_algorithms_enabled()
        return real_evaluate(*args, **kwargs)

    import engine.train as train_module
    real_evaluate = train_module.evaluate
    monkeypatch.setattr(train_module, "evaluate", spy)
    try:
        torch.use_deterministic_algorithms(False)
        summary = train(_cfg(tiny_betons, tmp_path / "run", "engine.deterministic=true", "optim.epochs=1"))
        assert summary["exit_code"] == 0 and seen["inside"] is True
        assert not torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"

        torch.use_deterministic_algorithms(True, warn_only=True)
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        with deterministic_algorithms(True):
            assert not torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
        with pytest.raises(RuntimeError, match="boom"), deterministic_algorithms(True):   # restored on an error too
            torch.use_deterministic_algorithms(False)
            raise RuntimeError("boom")
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
