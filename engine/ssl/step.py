"""One DINO pretraining step (engine/pretrain.py's loop body): teacher and student forward, loss, DeepSpeed backward,
DINO's per-parameter clipping, the last layer's freeze, the optimizer step, the teacher EMA and the centre update.

Host syncs, as in the supervised default step (engine/supervised_step.py):
  device skip  (engine.fail_on_nonfinite with a fused AdamW, i.e. on CUDA) the flag "loss or a gradient not
               finite" stays on the device: AdamW skips through found_inf, the EMA momentum becomes 1 and the centre
               keeps its value where it is set, for that step and every later one, so student, optimizer state,
               teacher and centre stay those before the bad step until the loop reads the flag at its next log
               point (or before a checkpoint) and stops;
  host check   (otherwise: fail_on_nonfinite=false, or an unfused AdamW as on the CPU, where the read costs no
               device wait) the loss and the gradients' finiteness are read each step and a bad step is reported
               before anything is updated.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from engine.grad_check import discard_gradients
from engine.loss_window import NonFiniteSteps
from engine.precision import autocast
from engine.ssl.updates import clip_per_parameter, ema_update
from engine.supervised_step import global_grad_norm


class DINOStep:
    """engine: DeepSpeed's engine over the student (ZeRO 0); optimizer: its torch AdamW; teacher: the EMA network;
    dino_loss: DINOLoss (its centre); last_layer: the head's last-layer parameters (frozen in the first epochs);
    clip: per-parameter max norm (0 = off, or DeepSpeed clips globally: ssl.clip_mode=global)."""

    def __init__(self, engine, optimizer, teacher, dino_loss, last_layer, device: torch.device,
                 dtype: torch.dtype, *, fail_on_nonfinite: bool, clip_per_param: float, grad_check):
        self._clip, self._ema = clip_per_parameter, ema_update
        self.engine, self.optimizer, self.teacher, self.dino_loss = engine, optimizer, teacher, dino_loss
        self.last_layer, self.device, self.dtype = list(last_layer), device, dtype
        self.clip_per_param = clip_per_param
        fused = all(group.get("fused") for group in optimizer.param_groups)
        self.device_skip = fail_on_nonfinite and fused and engine.optimizer is optimizer
        self.grad_check = grad_check   # GradientCheck over the student (host check only)
        self.student_params = [p for p in engine.module.parameters() if p.requires_grad]
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.bad_steps = NonFiniteSteps(device)   # device skip: the steps skipped since the last read
        self.loss: Optional[torch.Tensor] = None           # the last step's loss (device), for the log line
        self.teacher_out: Optional[torch.Tensor] = None    # the last step's teacher logits, for the monitors

    def step(self, crops: list[torch.Tensor], epoch: int, momentum: float, freeze_last_layer: bool,
             global_step: int, report: Callable[[str, object], None]) -> bool:
        """One step; -> False when the host check skipped it (report(what, value) was called first)."""
        with autocast(self.device, self.dtype):
            with torch.no_grad():
                teacher_out = self.teacher(crops[:2])
            student_out = self.engine(crops)
            loss = self.dino_loss(student_out, teacher_out, epoch)
        self.loss, self.teacher_out = loss.detach(), teacher_out
        if not self.device_skip:
            value = loss.item()
            if not math.isfinite(value):
                report("loss", value)
                return False
        self.engine.backward(loss)
        if not self.device_skip and not self.grad_check.finite():
            report("gradient", "nan/inf")
            discard_gradients(self.engine)
            return False
        if self.device_skip:   # before clipping: a NaN gradient's norm could be scaled into a finite one
            grads = [p.grad for p in self.student_params if p.grad is not None]
            bad = ~(torch.isfinite(loss.detach()) & torch.isfinite(global_grad_norm(grads).to(self.device)))
            self.bad_steps.count(bad, torch.isfinite(loss.detach()),
                                 torch.full_like(self.bad_steps.first_bad, global_step))
            self.halted.logical_or_(bad)
        if self.clip_per_param > 0:
            self._clip(self.student_params, self.clip_per_param)
        if freeze_last_layer:
            for p in self.last_layer:   # DINO's cancel_gradients_last_layer: no grad, AdamW skips them
                p.grad = None
        if not self.device_skip:
            self.engine.step()
            self._ema(self.teacher, self.engine.module, momentum)
            self.dino_loss.update_center(teacher_out)
            return True
        self.optimizer.found_inf = self.halted.float()
        try:
            self.engine.step()
        finally:
            del self.optimizer.found_inf
        keep = self.halted.clone()
        self._ema(self.teacher, self.engine.module,
                  torch.full_like(keep, momentum, dtype=torch.float32).masked_fill_(keep, 1.0))
        center = self.dino_loss.center.clone()
        self.dino_loss.update_center(teacher_out)
        self.dino_loss.center.copy_(torch.where(keep, center, self.dino_loss.center))
        return True

    def read_nonfinite(self) -> tuple[int, Optional[int], str]:
        """Device skip: (non-finite steps since the last read, the first one's 0-based global step, 'loss' or
        'gradient'); resets the count. One device-to-host copy."""
        counters = torch.stack(self.bad_steps.counters()).tolist()
        self.bad_steps.reset()
        return NonFiniteSteps.describe(*counters)
