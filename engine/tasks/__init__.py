"""Auxiliary tasks, one module each, all following engine.tasks.base.AuxTask.

Order is fixed (drloc, then perceptibility): perceptibility's extra view (batch.transformed) is the only one, so
the loop's outputs are [pass on batch.images, pass on batch.transformed] and drloc runs on both.
"""
from __future__ import annotations

from torch import nn

from engine.tasks.base import AuxTask, TaskOutput, class_ce  # noqa: F401
from engine.tasks.drloc import effective_epochs  # noqa: F401


def build_tasks(cfg, embed_dim: int, grid: int) -> nn.ModuleList:
    """The enabled auxiliary tasks of `cfg` (a Config), in a fixed order. embed_dim / grid: the model's
    `embed_dim` (channels of ModelOutput.tokens) and `grid_size` (k)."""
    from engine.tasks.drloc import DrlocTask
    from engine.tasks.perceptibility import PerceptibilityTask

    tasks: list[AuxTask] = []
    if cfg.tasks.drloc.enabled:
        tasks.append(DrlocTask(cfg.tasks.drloc, embed_dim, grid, cfg.optim.epochs, cfg.engine.kernels))
    if cfg.tasks.perceptibility.enabled:
        tasks.append(PerceptibilityTask(cfg.tasks.perceptibility, embed_dim, cfg.optim.epochs,
                                        cfg.optim.label_smoothing))
    return nn.ModuleList(tasks)
