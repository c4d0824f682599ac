"""Whether a run lasts long enough for its auxiliary tasks' weight schedules to reach their peaks.

The reference schedules ramp over a fixed number of epochs or a fraction of optim.epochs (each task's own weight):
a short run (6 epochs of a 20-epoch ramp) never gets past a small fraction of the peak weight. The loop logs each
task's weight on every train line and warns once at the start when this check finds the run too short.
"""
from __future__ import annotations

MAX_SAMPLES = 20_000   # weight evaluations per schedule (Python floats: a few milliseconds)


def _samples(steps: int, steps_per_epoch: int) -> list[float]:
    """Fractional epochs (epoch + step / steps_per_epoch) of `steps` steps, every step or evenly thinned."""
    stride = max(1, steps // MAX_SAMPLES)
    return [s / steps_per_epoch for s in range(0, steps, stride)]


def ramp_warnings(tasks, steps_per_epoch: int, run_steps: int) -> list[str]:
    """One line per task whose weight over the run's `run_steps` steps stays below the peak its schedule ramps to
    (a run shorter than the ramp, or a schedule whose ramp outlasts optim.epochs). tasks: AuxTask modules."""
    lines = []
    for task in tasks:
        peak = task.peak_weight()
        reached = max((task.weight(e) for e in _samples(run_steps, steps_per_epoch)), default=0.0)
        if peak > 0 and reached < peak * (1 - 1e-9):
            lines.append(f"tasks.{task.name}: the run ends at epoch {run_steps / steps_per_epoch:g} (optim.epochs / "
                         f"run.max_steps) before the weight's ramp does: its weight reaches at most {reached:g} of "
                         f"the {peak:g} it ramps to")
    return lines


def current_weights(tasks, epoch: float) -> dict[str, float]:
    """{'<task>_weight': lambda(epoch)} for a train log line."""
    return {f"{task.name}_weight": float(task.weight(epoch)) for task in tasks}
