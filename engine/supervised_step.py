"""The default supervised training step under DeepSpeed's engine: what `smallvit train` runs per optimizer step
(engine.graph_step=off) and what the bench's "ours_deepspeed" rows time, one code for both.

One step: the loader's batch (data.batch_size / ranks images on this rank) is cut into optim.accumulation_steps
equal micro-batches; each runs forward (under bf16 autocast when engine.precision=bf16) and DeepSpeed's backward
(which scales the loss by 1/k and all-reduces the gradients at the last one, the accumulation boundary we set);
then, with ZeRO 0, the loop's own gradient clipping (DeepSpeed's clip_grad_norm_ formula on one foreach norm) and
DeepSpeed's optimizer step. k micro-batches of b give the step of one batch of k*b (fp32: equal to rounding).

Host syncs. Losses, logged parts and the non-finite flag go into device accumulators that `read()` fetches every
run.log_every steps (one copy, one all-reduce), as the static step's runner does. Whether a step may be applied
is decided on the host only where that is needed or free:
  device skip  (engine.fail_on_nonfinite, ZeRO 0, fused AdamW: every CUDA run's default) the flag (loss or total
               gradient norm not finite) goes to AdamW's found_inf, so a bad step and every step after it leave
               parameters and optimizer state unchanged on the device; the run stops at the next read, which the
               loop also makes before any checkpoint, so nothing non-finite is ever saved;
  host check   (every other case: engine.fail_on_nonfinite=false, ZeRO 1/2, an unfused AdamW as on the CPU, where
               reading a flag costs no device wait) the flag is read after each step's backward and a bad step is
               reported (stop, or skip leaving parameters and optimizer state unchanged) before it reaches the
               optimizer. A skip under fail_on_nonfinite=false needs this per-step read.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist

from engine.grad_check import GradientCheck, discard_gradients
from engine.graphed_step import CLIP_EPS
from engine.loss_window import LossWindow, WindowReport
from engine.precision import autocast
from loaders.batch import Batch


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`batch` cut into `parts` equal micro-batches along the batch dimension (views, no copy)."""
    if parts == 1:
        return [batch]
    n = len(batch)
    if n % parts:
        raise ValueError(f"optim.accumulation_steps: {parts} does not divide this rank's batch of {n}")
    m = n // parts

    def cut(t, i):
        return None if t is None else t.narrow(0, i * m, m)
    return [Batch(images=cut(batch.images, i), labels=cut(batch.labels, i), index=cut(batch.index, i),
                  soft_labels=cut(batch.soft_labels, i), params={k: cut(v, i) for k, v in batch.params.items()},
                  views={k: cut(v, i) for k, v in batch.views.items()},
                  crops=None if batch.crops is None else [cut(c, i) for c in batch.crops])
            for i in range(parts)]


@torch.no_grad()
def global_grad_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The total L2 norm of `grads` as DeepSpeed's clip_grad_norm_ sums it (per-tensor fp32 norms, the root of
    their summed squares), from one foreach kernel instead of one norm per tensor. -> 0-dim fp32 tensor."""
    if not grads:
        return torch.zeros(())
    return torch.stack(torch._foreach_norm(grads, 2.0)).pow(2).sum().float().pow(0.5)


@torch.no_grad()
def clip_(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale `grads` in place by min(1, max_norm / (total_norm + 1e-6)), chosen on the device."""
    coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
    torch._foreach_mul_(grads, coef)


class SupervisedStep:
    """Runs the optimizer steps of a TrainModule held by a DeepSpeed engine (module docstring).

    engine: the DeepSpeed engine (its .module the TrainModule, its .optimizer ours or DeepSpeed's ZeRO wrapper);
    optimizer: the torch AdamW given to DeepSpeed; dtype: compute dtype (torch.bfloat16: autocast; float32: none);
    clip: max total gradient norm applied by this step (ZeRO 0; 0 = off; ZeRO 1/2 clip inside DeepSpeed);
    accumulation_steps: micro-batches per optimizer step; world_size: ranks (the logged means are over them)."""

    def __init__(self, engine, optimizer: torch.optim.Optimizer, device: torch.device, dtype: torch.dtype, *,
                 fail_on_nonfinite: bool, zero_stage: int, clip: float = 0.0, accumulation_steps: int = 1,
                 world_size: int = 1):
        self.engine, self.optimizer, self.device, self.dtype = engine, optimizer, device, dtype
        self.accumulation_steps, self.world_size = accumulation_steps, world_size
        self.zero_stage, self.clip = zero_stage, float(clip)
        fused = all(group.get("fused") for group in optimizer.param_groups)
        self.device_skip = fail_on_nonfinite and zero_stage == 0 and fused and engine.optimizer is optimizer
        self.grad_check = GradientCheck(engine.module) if zero_stage else None   # ZeRO moves grads into buckets
        self.params = [p for p in engine.module.parameters() if p.requires_grad]
        self.max_norm = torch.tensor(self.clip, dtype=torch.float32, device=device)
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.window = LossWindow(device)   # the losses since the last read()

    # ------------------------------------------------------------------------------------------------ a step
    def step(self, batch: Batch, lr: float, seed: int, epoch: float, global_step: int,
             report: Callable[[str, object], None]) -> bool:
        """One optimizer step (global_step: its 0-based number). `report(what, value)` is called for a step the
        host check finds non-finite (it raises under fail_on_nonfinite, else the step is skipped).
        -> False when the host check skipped the step, else True (device skips are counted for read())."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        engine, k = self.engine, self.accumulation_steps
        total, parts = None, None
        bad_loss = None   # host check: the first non-finite micro-batch loss value
        for i, micro in enumerate(split_batch(batch, k)):
            if k > 1:
                engine.set_gradient_accumulation_boundary(i == k - 1)
            with autocast(self.device, self.dtype):
                loss, micro_parts = engine(micro, epoch, seed)
            total = loss.detach() if total is None else total + loss.detach()
            parts = dict(micro_parts) if parts is None else {n: parts[n] + v for n, v in micro_parts.items()}
            if not self.device_skip and bad_loss is None:
                value = loss.item()
                if not math.isfinite(value):
                    bad_loss = value
                    if k == 1:      # no backward, no optimizer step: parameters and state unchanged
                        report("loss", value)
                        return False
            engine.backward(loss)   # a non-finite micro-batch's backward makes the step's gradients non-finite too
        if k > 1:
            total, parts = total / k, {n: v / k for n, v in parts.items()}
        if self.device_skip:
            return self._device_skip_step(total, parts, global_step)
        return self._host_check_step(total, parts, bad_loss, report)

    def _ready_gradients(self) -> Optional[torch.Tensor]:
        """ZeRO 0: the reduced gradients' total norm, after clipping them when clip > 0. ZeRO 1/2: None."""
        if self.zero_stage:
            return None
        grads = [p.grad for p in self.params if p.grad is not None]
        total_norm = global_grad_norm(grads).to(self.device)
        if self.clip > 0:
            if dist.is_initialized() and self.world_size > 1:   # DeepSpeed's mean of the (equal) per-rank norms
                total_norm = total_norm * 1.0 / float(self.world_size)
                dist.all_reduce(total_norm)
            clip_(grads, total_norm, self.max_norm)
        return total_norm

    def _device_skip_step(self, total: torch.Tensor, parts: dict, global_step: int) -> bool:
        total_norm = self._ready_gradients()
        loss_finite = torch.isfinite(total)
        bad = ~(loss_finite & torch.isfinite(total_norm))
        self.halted.logical_or_(bad)
        self.optimizer.found_inf = self.halted.float()   # fused AdamW skips (and steps its count back) where 1
        try:
            self.engine.step()
        finally:
            del self.optimizer.found_inf
        self.window.add(total, parts, bad, loss_finite, torch.full_like(self.window.first_bad, global_step))
        return True

    def _host_check_step(self, total: torch.Tensor, parts: dict, bad_loss, report) -> bool:
        total_norm = self._ready_gradients()
        if bad_loss is not None:
            what, value = "loss", bad_loss
        elif self.grad_check is not None and not self.grad_check.finite():
            what, value = "gradient", "nan/inf"
        elif total_norm is not None and not bool(torch.isfinite(total_norm)):
            what, value = "gradient", "nan/inf"
        else:
            self.engine.step()
            if not self.engine.was_step_applied():   # DeepSpeed's own overflow check skipped it
                report("gradient (found by DeepSpeed)", "overflow")
                return False
            self.window.add(total, parts)   # host check: only applied (finite) steps reach here
            return True
        if self.grad_check is not None:
            self.grad_check.finite()   # reset its record: this step is dropped
        report(what, value)
        discard_gradients(self.engine)   # parameters and optimizer state unchanged
        return False

    # -------------------------------------------------------------------------------------------- the host side
    def read(self) -> WindowReport:
        """Collective when several ranks run: the window's mean loss and parts over this rank's applied steps,
        averaged over ranks, and (device skip) its non-finite steps; resets the window. One device-to-host copy.
        Host-check skips were reported as they happened and are not repeated here."""
        return self.window.read(self.world_size)

    def remove(self) -> None:
        if self.grad_check is not None:
            self.grad_check.remove()

