"""ZeRO 1 and 2 on the CPU accelerator: training lowers the loss and a checkpoint resumes.

Kill -9, SIGTERM, several ranks through the launcher, world-size changes and 2-node --no_ssh runs are in
tests/reliability/ (issue 12). Small data (96 train / 48 test random 32x32 images, 4 classes), fp32, drop-path off.
"""
import json
from pathlib import Path

import pytest


def _overrides(betons, out, *extra):
    return [f"data.train={betons['train']}", f"data.test={betons['test']}", "data.dataset=tiny",
            "data.loader=resident", "data.batch_size=16", "data.eval_batch_size=48", "model.drop_path=0.0",
            "optim.epochs=3", "optim.warmup_epochs=0", "engine.precision=fp32", "run.progress=false",
            "run.log_every=1", f"run.out_dir={out}", *extra]


def _losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"}


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_stages_train_and_resume(tiny_betons, tmp_path, stage):
    """ZeRO 1 and 2 (one rank): the loss falls over 3 epochs of the same 96 images and a checkpoint resumes."""
    from engine.train import train
    from engine.config import config_from_dict

    out = tmp_path / "run"
    summary = train(config_from_dict({}, _overrides(tiny_betons, out, f"engine.zero_stage={stage}",
                                                     "optim.lr=3e-3")))
    losses = _losses(out)
    first, last = [losses[s] for s in range(1, 7)], [losses[s] for s in range(13, 19)]
    assert sum(last) < sum(first), (first, last)
    assert summary["global_step"] == 18
    more = train(config_from_dict({}, _overrides(tiny_betons, out, f"engine.zero_stage={stage}", "optim.lr=3e-3",
                                                  "optim.epochs=4", "run.resume=auto")))
    assert more["global_step"] == 24
