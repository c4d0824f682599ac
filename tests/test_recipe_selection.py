"""Issue 25 items 5 and 6: a validation split held out of training picks the best checkpoint, and a resume at
another global batch or data.repeats is refused with the keys named (never an exit 0 that trained nothing)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.config import config_from_dict
from engine.run_log import read_metrics
from loaders.holdout import split_indices
from loaders.order import EpochPlan

BATCH = 16


def _cfg(betons, out, *extra):
    return config_from_dict({}, [
        f"data.train={betons['train']}", f"data.test={betons['test']}", "data.loader=resident",
        f"data.batch_size={BATCH}", "data.eval_batch_size=48", "model.depth=1", "model.embed_dim=32",
        "model.num_heads=2", "model.drop_path=0.0", "optim.warmup_epochs=0", "engine.device=cpu",
        "run.progress=false", "run.log_every=1", f"run.out_dir={out}", *extra])


# ---------------------------------------------------------------------------------------------- item 5: split
def test_item05_holdout_is_stratified_seeded_and_disjoint():
    labels = np.repeat(np.arange(5), [40, 20, 10, 3, 1])
    split = split_indices(labels, 0.25, seed=7)
    assert np.array_equal(np.sort(np.concatenate([split.train, split.val])), np.arange(len(labels)))
    assert np.bincount(labels[split.val], minlength=5).tolist() == [10, 5, 2, 1, 0]   # a lone sample stays in train
    again = split_indices(labels, 0.25, seed=7)
    assert np.array_equal(again.val, split.val)
    assert not np.array_equal(split_indices(labels, 0.25, seed=8).val, split.val)


@pytest.mark.parametrize("order", ["random", "quasi_random"])
def test_item05_training_plan_never_draws_held_out_samples_on_any_rank_count(order):
    labels = np.arange(100) % 4
    split = split_indices(labels, 0.2, seed=0)
    pages = np.arange(100) // 7
    seen = {}
    for world in (1, 2):
        plan = EpochPlan(num_samples=100, global_batch=8, seed=3, order=order, pages=pages, subset=split.train)
        assert plan.steps() == len(split.train) // 8
        seen[world] = np.concatenate([plan.rank_order(1, r, world) for r in range(world)])
        assert not set(seen[world].tolist()) & set(split.val.tolist())
        assert len(set(seen[world].tolist())) == len(seen[world])
    assert sorted(seen[1].tolist()) == sorted(seen[2].tolist())
    val_plan = EpochPlan(num_samples=100, global_batch=10, shuffle=False, drop_last=False, subset=split.val)
    assert sorted(val_plan.rank_order(0).tolist()) == split.val.tolist()


def test_item05_best_checkpoint_chosen_on_validation(tiny_betons, tmp_path, monkeypatch):
    import engine.train as train_module
    from engine.train_module import TrainModule

    indices = []
    real_forward = TrainModule.forward

    def spy(self, batch, *args, **kwargs):
        indices.extend(batch.index.tolist())
        return real_forward(self, batch, *args, **kwargs)

    monkeypatch.setattr(TrainModule, "forward", spy)
    out = tmp_path / "run"
    summary = train_module.train(_cfg(tiny_betons, out, "data.val_fraction=0.25", "optim.epochs=3"))
    held = split_indices(np.arange(96) % 4, 0.25, seed=0).val   # tiny labels cycle 0..3
    assert len(held) == 24 and not set(indices) & set(held.tolist())
    assert summary["global_step"] == 3 * (72 // BATCH)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert all("val_top1" in r for r in evals) and len(evals) == 3
    best = max(evals, key=lambda r: (r["val_top1"], -r["step"]))
    chosen = summary["selection"]
    assert chosen["metric"] == "val_top1" and chosen["best_step"] == best["step"]
    assert chosen["test_top1_at_best"] == best["top1"] and chosen["test_top1_last"] == evals[-1]["top1"]
    assert summary["best_top1"] == max(r["top1"] for r in evals)   # still reported: the best over test evaluations
    state = torch.load(out / "checkpoints" / "best" / "trainer_state.pt", weights_only=True)
    assert state["global_step"] == best["step"]


# ---------------------------------------------------------------------------------------------- item 6: resume
@pytest.fixture(scope="module")
def half_run(tiny_betons, tmp_path_factory):
    """2 of 4 epochs at batch 16 (run.max_steps), as a user stops a run to resume it later."""
    from engine.train import train

    out = tmp_path_factory.mktemp("half") / "run"
    summary = train(_cfg(tiny_betons, out, "optim.epochs=4", f"run.max_steps={2 * 96 // BATCH}"))
    assert summary["global_step"] == 12
    return out


@pytest.mark.parametrize("change, key", [(f"data.batch_size={2 * BATCH}", "data.batch_size 16 -> 32"),
                                         ("data.repeats=2", "data.repeats 1 -> 2")])
def test_item06_resume_at_another_batch_or_repeats_is_refused(half_run, tiny_betons, capsys, change, key):
    from engine.train import run_training

    before = (half_run / "metrics.jsonl").read_text()
    code = run_training(_cfg(tiny_betons, half_run, "optim.epochs=4", "run.resume=auto", change))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("smallvit: error: run.resume:"), err
    assert key in err[0] and "global batch" in err[0]
    assert (half_run / "metrics.jsonl").read_text() == before


def test_item06_digest_is_written_and_the_same_batch_resumes_to_the_end(half_run, tiny_betons, tmp_path):
    import shutil

    from engine import run_folder
    from engine.config import load_config
    from engine.train import train

    state = torch.load(half_run / "checkpoints" / "step_00000012" / "trainer_state.pt", weights_only=True)
    assert state["config_digest"] == run_folder.config_digest(load_config(half_run / "config.yaml"))
    copy = tmp_path / "run"
    shutil.copytree(half_run, copy)
    summary = train(_cfg(tiny_betons, copy, "optim.epochs=4", "run.resume=auto"))
    assert summary["global_step"] == 4 * 96 // BATCH and summary["epochs_done"] == 4
