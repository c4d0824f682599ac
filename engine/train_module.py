"""The model and its auxiliary tasks as one module (what DeepSpeed holds and both step paths call).

One forward per step: the images and every extra view the tasks ask for (AuxTask.extra_views, task order) stacked
into one batch, split back into passes; the class loss on the clean pass, plus each task's TaskOutput.loss. The
module names no task: the tasks come from engine.tasks.build_tasks (the registry's order).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from engine.tasks.base import class_ce
from loaders.batch import Batch


class TrainModule(nn.Module):
    """The model and its auxiliary tasks as one module, so DeepSpeed owns every trainable parameter."""

    def __init__(self, model: nn.Module, tasks: nn.ModuleList, label_smoothing: float):
        super().__init__()
        self.model = model
        self.tasks = tasks
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch, epoch: float, seed: int = 0,
                weights: Optional[Sequence[torch.Tensor] | torch.Tensor] = None):
        """-> (total loss scalar, {name: detached scalar} for the logs).

        weights: each task's weight for this step, one 0-dim device tensor per task in order (the static step's
        buffers, filled before each replay), or None: every task uses its weight(epoch)."""
        views = [v for task in self.tasks for v in task.extra_views(batch)]
        images = torch.cat([batch.images, *views]) if views else batch.images
        outputs = self.model.forward_with_tokens(images).split(1 + len(views))
        cls_loss = class_ce(outputs[0].logits, batch.labels, batch.soft_labels, self.label_smoothing)
        total = cls_loss
        parts = {"cls_loss": cls_loss.detach()}
        for i, task in enumerate(self.tasks):
            res = task.compute(outputs, batch, epoch, seed, weight=None if weights is None else weights[i])
            total = total + res.loss
            parts[f"{task.name}_loss"] = res.raw
            parts.update({f"{task.name}_{k}": v for k, v in res.metrics.items()})
        return total, parts
