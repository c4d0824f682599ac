"""DINO's schedules as pure functions of the optimizer step (METHODS.md B), so a resumed run recomputes them.

DINO builds them as per-iteration arrays (`cosine_scheduler`): an optional linear warm-up from `warmup_start` over
`warmup_steps`, then `final + (base - final) * (1 + cos(pi * i / n)) / 2` with i counting from the warm-up's end over
the n = total - warmup remaining steps. Learning rate: base lr·batch/256 -> min_lr, warm-up 30 epochs. Weight
decay: 0.04 -> 0.4. Teacher EMA momentum: 0.996 -> 1. The teacher temperature is per epoch: linear from 0.04 to
0.07 over the first 10 epochs (np.linspace, both ends included), then 0.07.
"""
from __future__ import annotations

import math


def cosine_at(step: int, total_steps: int, base: float, final: float, warmup_steps: int = 0,
              warmup_start: float = 0.0) -> float:
    """Value at optimizer step `step` (0-based) of DINO's cosine_scheduler(base, final, ..., warmup)."""
    if warmup_steps > 0 and step < warmup_steps:
        # np.linspace(warmup_start, base, warmup_steps)[step]
        if warmup_steps == 1:
            return warmup_start
        return warmup_start + (base - warmup_start) * step / (warmup_steps - 1)
    n = max(1, total_steps - warmup_steps)
    i = min(step - warmup_steps, n - 1)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * i / n))


def teacher_temp_at(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """Teacher softmax temperature in `epoch` (0-based): np.linspace(warmup_temp, temp, warmup_epochs)[epoch], then
    `temp`."""
    if epoch < warmup_epochs:
        if warmup_epochs == 1:
            return warmup_temp
        return warmup_temp + (temp - warmup_temp) * epoch / (warmup_epochs - 1)
    return temp
