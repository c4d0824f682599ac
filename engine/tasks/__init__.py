"""Auxiliary tasks, one module each, all following engine.tasks.base.AuxTask."""
from __future__ import annotations

from torch import nn

from engine.tasks.base import AuxTask, TaskOutput  # noqa: F401


def build_tasks(cfg, embed_dim: int, grid: int) -> nn.ModuleList:
    """The enabled auxiliary tasks of `cfg` (a Config), in a fixed order."""
    from engine.tasks.drloc import DrlocTask

    tasks: list[AuxTask] = []
    if cfg.tasks.drloc.enabled:
        tasks.append(DrlocTask(cfg.tasks.drloc, embed_dim, grid, cfg.optim.epochs))
    if cfg.tasks.perceptibility.enabled:
        raise NotImplementedError("tasks.perceptibility is not built yet (issue 5)")
    return nn.ModuleList(tasks)
