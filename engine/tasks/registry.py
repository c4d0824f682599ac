"""The auxiliary tasks by name: `name -> task class` (engine.tasks.base.AuxTask), the only place that lists them.

The built-in tasks are named by "module:Class" strings and imported on first use, so engine/config.py can read
the registry (to build the `tasks` section of the schema) without importing torch or the tasks' modules at its
own import. The order is fixed: the built-ins in the order below, then the registered ones in registration
order; the trainer sums the tasks' losses and batches their extra views in this order.

Adding a task: one module with its AuxTask subclass (its Config, check, build, batch_transform, head, targets,
loss and weight), and one line in BUILTIN (or `register(name, cls)` at run time, e.g. from a test).
"""
from __future__ import annotations

import importlib

BUILTIN: dict[str, str] = {
    "drloc": "engine.tasks.drloc:DrlocTask",
    "perceptibility": "engine.tasks.perceptibility:PerceptibilityTask",
}

_registered: dict[str, type] = {}   # register()'s additions, in order
_loaded: dict[str, type] = {}       # the built-ins, once imported
_version = 0                        # bumped by every change, so a cached schema knows when to rebuild


def _load(spec: str) -> type:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def register(name: str, cls: type) -> None:
    """Add the task class `cls` under `name` (its config section `tasks.<name>`, its logged parts `<name>_*`)."""
    global _version
    if name in BUILTIN or name in _registered:
        raise ValueError(f"auxiliary task {name!r} is already registered")
    if getattr(cls, "name", None) != name:
        raise ValueError(f"auxiliary task {name!r}: its class {cls.__name__} has name {getattr(cls, 'name', None)!r}")
    if not name.isidentifier():
        raise ValueError(f"auxiliary task name {name!r} must be an identifier (it is a config key)")
    _registered[name] = cls
    _version += 1


def unregister(name: str) -> None:
    """Remove a task added by register() (the built-ins stay)."""
    global _version
    if name not in _registered:
        raise KeyError(f"auxiliary task {name!r} was not added by register()")
    del _registered[name]
    _version += 1


def version() -> int:
    """A number that changes whenever the set of tasks does."""
    return _version


def registered() -> dict[str, type]:
    """{name: task class}: the built-ins first, in BUILTIN's order, then the registered ones in order."""
    out = {}
    for name, spec in BUILTIN.items():
        if name not in _loaded:
            _loaded[name] = _load(spec)
        out[name] = _loaded[name]
    out.update(_registered)
    return out


def enabled(cfg) -> list[tuple[str, object]]:
    """[(name, its config section)] of the tasks `cfg` (a Config) enables, in the registry's order."""
    return [(name, getattr(cfg.tasks, name)) for name in registered() if getattr(cfg.tasks, name).enabled]
