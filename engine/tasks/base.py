"""The interface every auxiliary task follows (drloc, translation/scale perceptibility, ...).

The trainer runs the model once on the batch (plus any extra views a task asks for, batched into the same
forward), then sums `TaskOutput.loss` over the enabled tasks. A task never special-cases the loop.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
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


def schedule_epoch(epoch: float, per_step: bool) -> float:
    """The epoch a weight schedule reads: the references compute lambda once per epoch from the integer epoch
    (per_step=False); per_step=True uses the fractional epoch the loop passes (epoch + step / steps_per_epoch)."""
    return float(epoch) if per_step else float(math.floor(epoch + 1e-9))


def class_ce(logits: torch.Tensor, labels: torch.Tensor, soft_labels: torch.Tensor | None,
             smoothing: float) -> torch.Tensor:
    """Label-smoothed CE on plain or mixed labels, as the references compute it: with mixing,
    lam * CE_ls(y_a) + (1 - lam) * CE_ls(y_b) = (1 - eps) * sum(soft * -log p) + eps * mean_c(-log p).

    logits (B, K); labels (B,) int64; soft_labels (B, K) unsmoothed mixed one-hots (rows sum to 1) or None.
    """
    logp = F.log_softmax(logits.float(), dim=-1)
    if soft_labels is None:
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    nll = -(soft_labels.float() * logp).sum(-1)
    return ((1.0 - smoothing) * nll - smoothing * logp.mean(-1)).mean()
