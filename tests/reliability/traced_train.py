"""`engine/train.py` with a per-rank record of what each step saw, for the reliability tests.

    python tests/reliability/traced_train.py key=value ...                      # one process
    deepspeed --num_gpus 2 tests/reliability/traced_train.py key=value ...      # through the launcher

Each rank appends one JSON line per training step to run.out_dir/trace/rank{r}.jsonl (flushed at once, so a killed
run keeps every finished line): the global step, the sample indices of its batch, a SHA-1 of the augmented images
(equal digests = equal sampled augmentation parameters), the labels and the rank's own loss before averaging.
With RELIABILITY_KILL_AT_STEP=k (or RELIABILITY_TERM_AT_STEP=k) in the environment the process sends itself SIGKILL
(SIGTERM) in step k, right after the forward (faults.kill_at_step / term_at_step): an exact step, which polling the
log from outside cannot give on a fast machine.
Only the test harness wraps the engine; the engine itself is unchanged.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[2])


def _digest(t) -> str:
    return hashlib.sha1(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def tracing(out_dir: str | Path):
    import engine.train as train_module
    from engine.train_module import TrainModule

    state: dict = {"step": None, "rank": 0, "fh": None}
    signals = {signal.SIGKILL: int(os.environ.get("RELIABILITY_KILL_AT_STEP", "0")),
               signal.SIGTERM: int(os.environ.get("RELIABILITY_TERM_AT_STEP", "0"))}
    real_seed, real_forward = train_module.step_seed, TrainModule.forward

    def step_seed(seed, global_step, rank):
        state["step"], state["rank"] = global_step + 1, rank   # the step number the loop logs for this step
        return real_seed(seed, global_step, rank)

    def forward(self, batch, epoch, seed=0, **kwargs):
        loss, parts = real_forward(self, batch, epoch, seed, **kwargs)
        if state["fh"] is None:
            folder = Path(out_dir) / "trace"
            folder.mkdir(parents=True, exist_ok=True)
            state["fh"] = open(folder / f"rank{state['rank']}.jsonl", "a")
        state["fh"].write(json.dumps({"step": state["step"], "rank": state["rank"], "epoch": epoch,
                                      "index": batch.index.tolist(), "labels": batch.labels.tolist(),
                                      "images": _digest(batch.images), "loss": loss.item()}) + "\n")
        state["fh"].flush()
        for sig, at in signals.items():   # faults.kill_at_step / term_at_step: a real signal, mid-step
            if state["step"] == at:
                os.kill(os.getpid(), sig)
        return loss, parts

    train_module.step_seed, TrainModule.forward = step_seed, forward
    try:
        yield
    finally:
        train_module.step_seed, TrainModule.forward = real_seed, real_forward
        if state["fh"] is not None:
            state["fh"].close()


def main(argv: list[str]) -> int:
    from engine.train import main as train_main

    out_dir = next((a.split("=", 1)[1] for a in argv if a.startswith("run.out_dir=")), "runs/default")
    with tracing(out_dir):
        return train_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
