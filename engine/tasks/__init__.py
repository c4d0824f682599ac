"""Auxiliary tasks, one module each, all following engine.tasks.base.AuxTask, listed by engine/tasks/registry.py.

The order is the registry's (the built-ins first): the trainer batches the tasks' extra views into one forward and
sums their losses in that order. This package imports nothing heavy at its own import (engine/config.py reads the
registry while torch and the tasks' modules may not be loaded yet): build_tasks and the base's names load lazily.
"""
from __future__ import annotations

from engine.tasks.registry import enabled, registered


def build_tasks(cfg, embed_dim: int, grid: int):
    """The enabled auxiliary tasks of `cfg` (a Config), in the registry's order, as an nn.ModuleList.
    embed_dim / grid: the model's `embed_dim` (channels of ModelOutput.tokens) and `grid_size` (k)."""
    from torch import nn

    classes = registered()
    return nn.ModuleList([classes[name].build(cfg, embed_dim, grid) for name, _ in enabled(cfg)])


def batch_transforms(cfg) -> list:
    """The loader-side batch transforms of the enabled tasks of `cfg`, in the registry's order (None dropped)."""
    classes = registered()
    made = [classes[name].batch_transform(section, cfg.data) for name, section in enabled(cfg)]
    return [t for t in made if t is not None]


def effective_epochs(cfg) -> int:
    """How many epochs the training loop runs for `cfg` (a Config): optim.epochs, folded through every registered
    task's `epochs` hook (enabled or not: a reference's loop length is a property of the recipe)."""
    epochs = cfg.optim.epochs
    for name, cls in registered().items():
        epochs = cls.epochs(getattr(cfg.tasks, name), epochs)
    return epochs


def __getattr__(name: str):
    """AuxTask, TaskOutput, class_ce, schedule_epoch from engine.tasks.base, imported on first use."""
    if name in ("AuxTask", "TaskOutput", "class_ce", "schedule_epoch"):
        from engine.tasks import base

        return getattr(base, name)
    raise AttributeError(f"module 'engine.tasks' has no attribute {name!r}")
