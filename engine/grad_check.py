"""Whether a step's gradients are all finite, on every rank, decided before the optimizer step.

DeepSpeed checks gradients for overflow only under fp16 loss scaling (and under ZeRO with bf16 only when asked),
and then skips the step silently; an fp32 run applies an Inf gradient. We watch every parameter's gradient as
autograd produces it (tensor hooks fire before DeepSpeed's own reduction hooks, so this works for ZeRO 0, 1 and 2),
fold the per-parameter sums into one scalar, and all-reduce it: one small collective per step, no copy of any
gradient. A sum is non-finite exactly when some element is NaN/Inf (fp32 sums of finite gradients do not overflow
at these scales; if one did, the step would be non-finite anyway).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


class GradientCheck:
    """Attach once to the trained module; after each backward, `finite()` says whether the step may be applied."""

    def __init__(self, module: nn.Module):
        self._sums: list[torch.Tensor] = []
        self._handles = [p.register_hook(self._record) for p in module.parameters() if p.requires_grad]

    def _record(self, grad: torch.Tensor) -> None:
        self._sums.append(grad.detach().float().sum())   # the hook returns None: the gradient itself is untouched

    def finite(self) -> bool:
        """Collective when several ranks run: True when every gradient of this step on every rank is finite.
        Resets the record for the next step."""
        sums, self._sums = self._sums, []
        if not sums:
            return True
        bad = (~torch.isfinite(torch.stack(sums).sum())).float().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return not bool(bad.item())

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def discard_gradients(engine) -> None:
    """Drop this step's gradients without touching parameters or optimizer state (a skipped step).

    ZeRO 1/2 keep reduced gradients in their own partition buffers; their step() skips and clears them when it
    finds an overflow, which it checks because train() sets `check_grad_overflow` on them. Without ZeRO (plain or
    bf16 optimizer) clearing the gradients is enough.
    """
    optimizer = engine.optimizer
    if hasattr(optimizer, "averaged_gradients"):          # DeepSpeedZeroOptimizer (stage 1 and 2)
        engine.step()
        if engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step whose gradients are non-finite")
        return
    optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()
