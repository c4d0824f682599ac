"""Checkpoints: DeepSpeed's save/load inside an atomic folder rename, our trainer state, and a plain export.

    out_dir/checkpoints/
      step_00000420/            one complete checkpoint (renamed into place only when every rank finished)
        ds/                     DeepSpeed's files (module, optimizer, per-rank ZeRO shards)
        trainer_state.pt        epoch, step in epoch, global step, best accuracy, config digest (weights_only-safe)
        model.safetensors       the model's weights, loadable without DeepSpeed (timm names for timm models)
      latest                    the name of the newest complete checkpoint (written atomically, last)

A crash at any point leaves either the previous checkpoint named by `latest` or the new one, never a partial one
at a final path; stale `.tmp-*` folders from a killed run are removed at the next start.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

STATE_FILE = "trainer_state.pt"
EXPORT_FILE = "model.safetensors"


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def remove_stale(out_dir: str | Path) -> None:
    root = checkpoint_root(out_dir)
    if root.is_dir():
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)


def save(engine, out_dir: str | Path, global_step: int, state: dict[str, Any], is_main: bool,
         export: Optional[torch.nn.Module] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. `export` is the module written to
    model.safetensors (default: the trained model, engine.module.model; pretraining exports the teacher)."""
    root = checkpoint_root(out_dir)
    name = f"step_{global_step:08d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    _barrier()
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    _barrier()
    if is_main:
        torch.save(state, tmp / STATE_FILE)
        export_weights(engine.module.model if export is None else export, tmp / EXPORT_FILE)
        _fsync_tree(tmp)
        if final.exists():  # a rerun of the same step (resume + save): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(root / "latest", name + "\n")
    _barrier()
    return final


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())


def export_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})


def resolve(out_dir: str | Path, resume: str) -> Optional[Path]:
    """The checkpoint folder `run.resume` names: 'auto' = latest in out_dir (None if there is none)."""
    if not resume:
        return None
    if resume == "auto":
        pointer = checkpoint_root(out_dir) / "latest"
        if not pointer.is_file():
            return None
        folder = checkpoint_root(out_dir) / pointer.read_text().strip()
    else:
        folder = Path(resume)
        if (folder / "checkpoints" / "latest").is_file():       # a run folder
            folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    if not (folder / STATE_FILE).is_file() or not (folder / "ds").is_dir():
        raise FileNotFoundError(f"run.resume: {folder} is not a complete smallvit checkpoint")
    return folder


def find(path: str | Path) -> Path:
    """The checkpoint a user names: a run folder (its latest checkpoint) or a checkpoint folder.
    Raises FileNotFoundError naming the path when it holds no complete checkpoint."""
    folder = resolve(".", str(path))
    if folder is None:
        raise FileNotFoundError(f"{path}: no complete smallvit checkpoint")
    return folder


def read_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def load(engine, folder: Path) -> dict[str, Any]:
    """Collective: restore DeepSpeed's module/optimizer state and return our trainer state."""
    load_path, _ = engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise FileNotFoundError(f"{folder}: DeepSpeed found no checkpoint to load")
    return read_state(folder)
