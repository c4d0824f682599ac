"""The run folder's rules, shared by training (engine/train.py) and pretraining (engine/pretrain.py).

- run.out_dir must be a folder (or not exist yet, under folders): checked before any work (check_out_dir).
- A folder that already holds a run (any of RUN_FILES) is refused unless the run resumes it (run.resume=auto, or
  a checkpoint inside it): two runs never share metrics.jsonl, tb/, `latest` or curves.png (check_fresh).
- config.yaml holds what the run used (resolved_config): num_classes, the model sizes built, the precision that
  ran, the dataset name of the sidecar, absolute paths; load_config reads it back to the same model.
- The trainer state carries that resolved config and its digest; a resume compares them with the new run's and
  names every differing key but those in RESUME_MAY_CHANGE (check_resume), before DeepSpeed loads anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Optional

from engine.config import Config, ConfigError, to_dict

RUN_FILES = ("config.yaml", "environment.json", "metrics.jsonl", "summary.json", "curves.png", "tb", "checkpoints",
             "finetune_load.json")

# keys a resume may change: how the run is watched, stopped, read and run on this machine, not what it computes.
# optim.epochs may grow (or shrink) a run: the cosine's horizon moves and the LR follows the new curve from the
# resumed step on. The global batch, data.repeats and every model/optimizer/augmentation key are compared: the
# LR schedule and the stopping point count steps of the global batch, so another batch would be another run.
RESUME_MAY_CHANGE = frozenset({
    "run.out_dir", "run.resume", "run.max_steps", "run.progress", "run.log_every", "run.eval_every",
    "run.checkpoint_every", "run.checkpoint_every_steps", "run.keep_last", "optim.epochs",
    "data.train", "data.test", "data.loader", "data.num_workers", "data.os_cache", "data.resident_max_fraction",
    "data.eval_batch_size", "data.capture_transform",
    "engine.device", "engine.compile", "engine.kernels", "engine.deterministic", "engine.fail_on_nonfinite",
    "engine.graph_step", "engine.channels_last",
    "model.finetune_from", "model.finetune_key", "model.finetune_strict",   # initial weights; a resume loads its own
})


def check_out_dir(cfg: Config) -> None:
    """run.out_dir is a folder or can become one: refuse a file there or at any parent, naming run.out_dir."""
    out = Path(cfg.run.out_dir)
    for folder in (out, *out.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                where = "is a file" if folder == out else f"lies under {folder}, which is a file"
                raise ConfigError(f"run.out_dir: {out} {where}, not a folder")
            return


def used_entries(out_dir: Path) -> list[str]:
    """Which of a run's own files and folders `out_dir` already holds."""
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def check_fresh(cfg: Config) -> None:
    """Refuse a run folder that already holds a run unless this run resumes it (see the module docstring)."""
    out = Path(cfg.run.out_dir)
    used = used_entries(out) if out.is_dir() else []
    if not used:
        return
    resume = cfg.run.resume
    if resume == "auto":
        return
    if resume and _inside(Path(resume), out):
        return
    how = f"run.resume={resume} is a checkpoint of another folder" if resume else "this run does not resume it"
    raise ConfigError(f"run.out_dir: {out} already holds a run ({', '.join(used)}) and {how}; resume it with "
                      f"run.resume=auto or choose a new run.out_dir")


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def built_sizes(model) -> dict[str, int]:
    """model.depth / embed_dim / num_heads of the model as built, where the model has one of each (ViT, CaiT:
    timm_kwargs); Swin's per-stage lists have no single value and stay at the config's (0 = registered)."""
    kwargs = getattr(model, "timm_kwargs", {}) or {}
    return {k: kwargs[k] for k in ("depth", "embed_dim", "num_heads") if isinstance(kwargs.get(k), int)}


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if path else path


def resolved_config(cfg: Config, meta: dict, num_classes: int, model, precision: str) -> Config:
    """The config this run actually uses: what the run folder's config.yaml and the trainer state record."""
    data = dataclasses.replace(cfg.data, dataset=cfg.data.dataset or meta["dataset"], train=_absolute(cfg.data.train),
                               test=_absolute(cfg.data.test))
    model_cfg = dataclasses.replace(cfg.model, num_classes=num_classes, finetune_from=_absolute(cfg.model.finetune_from),
                                    **built_sizes(model))
    engine = dataclasses.replace(cfg.engine, precision=precision,
                                 deepspeed_config=_absolute(cfg.engine.deepspeed_config))
    run = dataclasses.replace(cfg.run, out_dir=_absolute(cfg.run.out_dir))
    return dataclasses.replace(cfg, data=data, model=model_cfg, engine=engine, run=run)


def flat(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            out.update(flat(value, dotted))
        else:
            out[dotted] = list(value) if isinstance(value, tuple) else value
    return out


def compared(resolved: Config) -> dict[str, Any]:
    """The resolved config's keys a resume must keep, flat."""
    return {k: v for k, v in flat(to_dict(resolved)).items() if k not in RESUME_MAY_CHANGE}


def config_digest(resolved: Config) -> str:
    """sha256 (16 hex digits) of the compared keys: equal digests, the same run."""
    return hashlib.sha256(json.dumps(compared(resolved), sort_keys=True).encode()).hexdigest()[:16]


def state_entries(resolved: Config) -> dict[str, Any]:
    """What a trainer state stores about its config: the compared keys (flat plain data, weights_only-safe) and
    their digest. The keys a resume may change stay out, so a run and its resume write equal trainer states."""
    return {"config": compared(resolved), "config_digest": config_digest(resolved)}


def check_resume(saved: dict, resolved: Config, folder: Path) -> None:
    """Refuse to resume `folder` when the new run's resolved config differs from the saved one in a compared key;
    the message names each such key with both values. Checkpoints written before the digest existed skip this."""
    if "config_digest" not in saved or saved["config_digest"] == config_digest(resolved):
        return
    old = {k: v for k, v in (saved.get("config") or {}).items() if k not in RESUME_MAY_CHANGE}
    new = compared(resolved)
    diffs = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    batch_keys = {"data.batch_size", "data.repeats"} & {d.split(" ")[0] for d in diffs}
    why = (" (the LR schedule and the stopping point count steps of the checkpoint's global batch: start a new run, "
           "e.g. with model.finetune_from)" if batch_keys else "")
    raise ConfigError(f"run.resume: {folder} was written by another config: {'; '.join(diffs) or 'config digest'}"
                      f"{why}")


def hub_config(resolved: Config, meta: dict, model_args: dict) -> dict:
    """config.json in timm's hub layout for an export of this run (engine/models/timm_hub.py registers our
    architectures with timm, so timm.create_model('local-dir:<checkpoint>', pretrained=True) rebuilds and loads it)."""
    size = resolved.data.image_size
    return {
        "architecture": resolved.model.name,
        "num_classes": resolved.model.num_classes,
        "label_names": list(meta.get("classes", [])),
        "model_args": {**model_args, "num_classes": resolved.model.num_classes},
        "pretrained_cfg": {"input_size": [3, size, size], "fixed_input_size": True, "interpolation": "bicubic",
                           "crop_pct": 1.0, "crop_mode": "center", "mean": list(meta["mean"]),
                           "std": list(meta["std"]), "num_classes": resolved.model.num_classes,
                           "dataset": resolved.data.dataset},
    }


class Selection:
    """The evaluation that picks best/: validation top-1 when data.val_fraction is set, else test top-1 (the
    references' "best", a maximum over test evaluations). update() says whether an evaluation is a new best."""

    def __init__(self, on_validation: bool, saved: Optional[dict] = None):
        self.metric = "val_top1" if on_validation else "test_top1"
        saved = saved or {}
        self.best: float = saved.get("best", float("-inf"))
        self.best_step: Optional[int] = saved.get("best_step")
        self.test_at_best: Optional[float] = saved.get("test_at_best")

    def update(self, step: int, value: float, test_top1: float) -> bool:
        if value <= self.best:
            return False
        self.best, self.best_step, self.test_at_best = value, step, test_top1
        return True

    def state(self) -> dict:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step,
                "test_at_best": self.test_at_best}

    def summary(self, last_test_top1: Optional[float]) -> dict:
        return {"metric": self.metric, "best_step": self.best_step,
                "best": None if self.best_step is None else self.best,
                "test_top1_at_best": self.test_at_best, "test_top1_last": last_test_top1}
