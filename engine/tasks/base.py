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

    def peak_weight(self) -> float:
        """The weight the schedule ramps to (what a run that lasts long enough reaches)."""
        raise NotImplementedError

    def compute(self, outputs: list[ModelOutput], batch: Batch, epoch: float, seed: int = 0) -> TaskOutput:
        """outputs[0] is the pass on batch.images, outputs[1:] the passes on extra_views in order.

        seed: an int that differs every step and rank (the loop's step seed); a task draws its random numbers
        as a pure function of it, so a resumed run draws what the uninterrupted one drew.
        """
        raise NotImplementedError


def schedule_epoch(epoch: float, per_step: bool) -> float:
    """The epoch a weight schedule reads: the references compute lambda once per epoch from the integer epoch
    (per_step=False); per_step=True uses the fractional epoch the loop passes (epoch + step / steps_per_epoch)."""
    return float(epoch) if per_step else float(math.floor(epoch + 1e-9))


def class_ce(logits: torch.Tensor, labels: torch.Tensor, soft_labels: torch.Tensor | None,
             smoothing: float) -> torch.Tensor:
    """The class loss of every pass, as the references compute it.

    Plain labels: CE with label smoothing `smoothing`. Mixed labels: the soft labels from the loader's Mixup/CutMix
    already carry the smoothing (timm semantics: lam*smooth(y_a) + (1-lam)*smooth(y_b)), so the loss is the plain
    soft-target CE sum(soft * -log p), which equals lam*CE_ls(y_a) + (1-lam)*CE_ls(y_b) of the references.

    logits (B, K); labels (B,) int64; soft_labels (B, K) smoothed mixed targets (rows sum to 1) or None.
    """
    if soft_labels is None:
        return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)
    return -(soft_labels.float() * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
