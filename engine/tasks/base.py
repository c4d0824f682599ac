"""The interface every auxiliary task follows (drloc, translation/scale perceptibility, ...).

The trainer runs the model once on the batch (plus any extra views a task asks for, batched into the same
forward), then sums `TaskOutput.loss` over the enabled tasks. A task never special-cases the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from engine.models import ModelOutput
from loaders.batch import Batch


@dataclass
class TaskOutput:
    loss: torch.Tensor                    # scalar, already weighted: what is added to the total loss
    raw: torch.Tensor                     # scalar, the unweighted task loss (for logs)
    weight: float                         # the weight applied at this epoch
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)  # extra scalars to log (device tensors)


class AuxTask(nn.Module):
    """Parts: `targets` (from the batch and the model output), `head` (an nn.Module), `loss`, `weight(epoch)`."""

    name: str = "task"

    def extra_views(self, batch: Batch) -> list[torch.Tensor]:
        """Images (B, 3, H, W) this task needs the model to see beside batch.images (default: none)."""
        return []

    def weight(self, epoch: float) -> float:
        raise NotImplementedError

    def compute(self, outputs: list[ModelOutput], batch: Batch, epoch: float,
                generator: torch.Generator | None = None) -> TaskOutput:
        """outputs[0] is the pass on batch.images, outputs[1:] the passes on extra_views in order."""
        raise NotImplementedError
