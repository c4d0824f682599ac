"""The interface every auxiliary task follows; engine/tasks/registry.py lists the tasks by name.

A task class owns everything about its task, so nothing else names it:
  Config            its config dataclass (the `tasks.<name>` section of the schema; an `enabled` field)
  check             its value checks, as rows of engine.config.validate
  build             the task module, from the whole config and the model's dims
  batch_transform   the loader-side transform that writes its extra views and targets into each Batch (or None)
  views             the names of the Batch.views its forward needs (written by its batch transform)
  epochs            its say in how many epochs the loop runs (default: optim.epochs unchanged)
  reference_rules   how a reference repository's checkpoint names its head (model.finetune_from loads it)
  head, targets, loss, weight(epoch), peak_weight   its parts, called by its own compute()
The trainer (engine/train_module.py) calls, per step: `extra_views(batch)` of every task, one forward over the
images and all those views (task order), then `compute(outputs, batch, epoch, seed, weight)` of every task and
sums the class loss and their `TaskOutput.loss`; the logs read `weight(epoch)` and `peak_weight()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

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
    """One auxiliary task (module docstring). Subclasses set `name`, `Config`, and implement build, weight,
    peak_weight and compute; the rest has defaults."""

    name: str = "task"
    Config: type = None                   # the dataclass of tasks.<name>; must have `enabled: bool = False`
    views: tuple[str, ...] = ()           # Batch.views this task's forward needs, in order
    reference_rules: tuple = ()           # engine.models.reference_names.Rule's renaming a reference repository's
                                          # checkpoint keys of this head to ours ('<name>.<state-dict key>')

    # ------------------------------------------------------------------------------------ class-level hooks
    @classmethod
    def check(cls, section, cfg) -> list[tuple[str, bool, str]]:
        """Value checks of `section` (this task's config) in the whole config `cfg`: [(dotted key, ok, why)],
        raised by engine.config.validate as "<key>: <why> (got <value>)" for the first row not ok."""
        return []

    @classmethod
    def build(cls, cfg, embed_dim: int, grid: int) -> "AuxTask":
        """The task for the whole config `cfg` (its section is cfg.tasks.<name>); embed_dim / grid: the model's
        `embed_dim` (channels of ModelOutput.tokens) and `grid_size` (k)."""
        raise NotImplementedError

    @classmethod
    def batch_transform(cls, section, data):
        """The loader-side batch transform (a loaders.transforms.pipeline.BatchTransform) for this task's config
        `section` and the data config, or None when the task needs nothing from the loader."""
        return None

    @classmethod
    def epochs(cls, section, epochs: int) -> int:
        """How many epochs the training loop runs, given the `epochs` decided so far (folded over every registered
        task, enabled or not, by engine.tasks.effective_epochs)."""
        return epochs

    # ------------------------------------------------------------------------------------------ per step
    def extra_views(self, batch: Batch) -> list[torch.Tensor]:
        """Images (B, 3, H, W) this task needs the model to see beside batch.images: batch.views[v] for v in
        `views`."""
        missing = [v for v in self.views if batch.views.get(v) is None]
        if missing:
            raise ValueError(f"tasks.{self.name} is enabled but the batch has no {', '.join(map(repr, missing))} "
                             f"view (Batch.views): the loader's batch transform of this task did not run")
        return [batch.views[v] for v in self.views]

    def weight(self, epoch: float) -> float:
        raise NotImplementedError

    def peak_weight(self) -> float:
        """The weight the schedule ramps to (what a run that lasts long enough reaches)."""
        raise NotImplementedError

    def compute(self, outputs: list[ModelOutput], batch: Batch, epoch: float, seed: int = 0,
                weight: Optional[torch.Tensor] = None) -> TaskOutput:
        """outputs[0] is the pass on batch.images, outputs[1:] the passes on every task's extra views, in task
        order (each task's in its `views` order).

        seed: an int that differs every step and rank (the loop's step seed); a task draws its random numbers
        as a pure function of it, so a resumed run draws what the uninterrupted one drew.
        weight: this step's weight as a 0-dim device tensor (the static step fills it from weight(epoch) before
        each replay), or None: use weight(epoch).
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
