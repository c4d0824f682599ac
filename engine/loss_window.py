"""The device-side window of a training step's losses between two log points, shared by the default step
(engine/supervised_step.py) and the static one (engine/graphed_step.py): per step, the loss and its logged parts
are summed in float64 on the device and non-finite steps are counted there, so the loop syncs with the device once
per run.log_every steps (`read`), not once per step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class WindowReport:
    """What `read()` found since the previous read: `steps` finite steps whose mean loss and parts are `means`;
    `nonfinite` skipped steps, the first at 0-based global step `first_step` with a non-finite `first_what`."""
    steps: int
    means: dict[str, float]
    nonfinite: int
    first_step: Optional[int] = None
    first_what: str = ""


class NonFiniteSteps:
    """The non-finite steps since the last reset, counted on the device: how many (`nonfinite`), the first one's
    0-based global step (`first_bad`, -1: none) and whether its loss was finite (`first_bad_is_grad`: then its
    gradient was not). 0-dim int64 tensors on `device`; `count` makes no host sync. Shared by the supervised
    steps' LossWindow and the DINO step."""

    def __init__(self, device: torch.device):
        self.nonfinite = torch.zeros((), dtype=torch.int64, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_bad_is_grad = torch.zeros((), dtype=torch.int64, device=device)

    def count(self, bad: torch.Tensor, loss_finite: torch.Tensor, step_number: torch.Tensor) -> None:
        """bad, loss_finite: 0-dim bool; step_number: 0-dim int64 (all on the device)."""
        first = bad & (self.first_bad < 0)
        self.first_bad.copy_(torch.where(first, step_number, self.first_bad))
        self.first_bad_is_grad.copy_(torch.where(first, loss_finite.long(), self.first_bad_is_grad))
        self.nonfinite.add_(bad.long())

    def counters(self) -> list[torch.Tensor]:
        return [self.nonfinite, self.first_bad, self.first_bad_is_grad]

    def reset(self) -> None:
        self.nonfinite.zero_()
        self.first_bad.fill_(-1)

    @staticmethod
    def describe(bad: float, first: float, is_grad: float) -> tuple[int, Optional[int], str]:
        """The read counters as (count, first step or None, 'loss' | 'gradient' | '')."""
        bad = int(bad)
        return bad, (int(first) if bad else None), (("gradient" if is_grad else "loss") if bad else "")


class LossWindow(NonFiniteSteps):
    """Sums of ("loss", *parts) over the finite steps since the last read, their count, and the non-finite steps
    (NonFiniteSteps). All 0-dim int64 or (n,) float64 tensors on `device`; `add` makes no host sync, so it may run
    inside a captured CUDA graph once the first (eager) call has allocated `sums`."""

    def __init__(self, device: torch.device):
        super().__init__(device)
        self.names: list[str] = []
        self.sums: Optional[torch.Tensor] = None
        self.ok_steps = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, parts: dict, bad: Optional[torch.Tensor] = None,
            loss_finite: Optional[torch.Tensor] = None, step_number: Optional[torch.Tensor] = None) -> None:
        """One step's loss and parts. bad (0-dim bool, on the device): the step was not finite and is counted,
        not summed, with its loss_finite flag and step_number (0-dim int64); None: a step known finite."""
        values = torch.stack([loss.detach().double().reshape(()),
                              *[v.detach().double().reshape(()) for v in parts.values()]])
        if self.sums is None:
            self.names = ["loss", *parts]
            self.sums = torch.zeros_like(values)
        if bad is None:
            self.sums.add_(values)
            self.ok_steps.add_(1)
            return
        self.sums.add_(values.masked_fill(bad, 0.0))
        self.ok_steps.add_((~bad).long())
        self.count(bad, loss_finite, step_number)

    def read(self, world_size: Optional[int] = None) -> WindowReport:
        """One device-to-host copy of the window, then reset it. world_size None: the means in float64 on the host
        (one rank); else the float32 means averaged over `world_size` ranks (collective when there are several)."""
        if self.sums is None:
            return WindowReport(0, {}, 0)
        counts = torch.stack([self.ok_steps, *self.counters()])
        if world_size is None:
            packed = torch.cat([self.sums, counts.double()]).tolist()
        else:
            means = (self.sums / self.ok_steps.clamp(min=1)).float()   # one step: exactly that step's fp32 values
            if dist.is_initialized() and world_size > 1:
                dist.all_reduce(means)
                means /= world_size
            packed = torch.cat([means.double(), counts.double()]).tolist()
        values, (ok, *counters) = packed[:len(self.names)], packed[len(self.names):]
        ok = int(ok)
        self.sums.zero_()
        self.ok_steps.zero_()
        self.reset()
        if world_size is None:
            values = [s / ok for s in values] if ok else []
        return WindowReport(ok, dict(zip(self.names, values)) if ok else {}, *self.describe(*counters))
