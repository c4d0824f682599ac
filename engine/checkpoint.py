"""Checkpoints: DeepSpeed's save/load inside an atomic folder rename, our trainer state, and a plain export.

    out_dir/checkpoints/
      step_00000420/            one complete checkpoint (renamed into place only when every rank finished)
        ds/                     DeepSpeed's files (module, optimizer, per-rank ZeRO shards)
        trainer_state.pt        epoch, step in epoch, global step, best accuracy, config digest (weights_only-safe)
        model.safetensors       the model's weights, loadable without DeepSpeed (timm names for timm models)
      latest                    the name of the newest complete checkpoint (written atomically, last)

A crash at any point leaves either the previous checkpoint named by `latest` or the new one, never a partial one
at a final path; stale `.tmp-*` folders from a killed run are removed at the next start. A failed write (disk
full) raises CheckpointError on every rank, naming the folder, after removing its temporary folder.

The trainer state records the world size, the global batch and the ZeRO stage it was written with: a run may
resume on another number of ranks (the sample order depends only on the global batch) when the optimizer state
is whole in the checkpoint (ZeRO stage 0); ZeRO 1/2 shard it per rank, and check_world_size refuses the change.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from loaders.atomic import fsync_dir, write_text_atomic

STATE_FILE = "trainer_state.pt"
EXPORT_FILE = "model.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); the message names the folder and says
    which checkpoint `latest` still names. Nothing partial is left at a final path."""


def _all_ok(ok: bool) -> bool:
    """Collective: True when `ok` holds on every rank (also a barrier), so one rank's failure stops all ranks
    instead of leaving them waiting at the next barrier."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() == 0.0


def checkpoint_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def remove_stale(out_dir: str | Path) -> None:
    """At start (rank 0): delete what a killed save left (`.tmp-*` folders, `.latest.tmp-*` files), and put back a
    checkpoint a killed re-save of the same step had moved aside (`.old-*`) when its replacement never landed."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return
    for aside in root.glob(".old-*"):
        final = root / aside.name[len(".old-"):]
        if final.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def latest_name(out_dir: str | Path) -> Optional[str]:
    pointer = checkpoint_root(out_dir) / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def save(engine, out_dir: str | Path, global_step: int, state: dict[str, Any], is_main: bool,
         export: Optional[torch.nn.Module] = None) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. `export` is the module written to
    model.safetensors (default: the trained model, engine.module.model; pretraining exports the teacher).

    Raises CheckpointError on every rank when any rank fails to write (ENOSPC, EACCES, ...): the temporary folder
    is removed and the previous checkpoint, still named by `latest`, is untouched.
    """
    root = checkpoint_root(out_dir)
    name = f"step_{global_step:08d}"
    tmp = root / f".tmp-{name}"
    final = root / name
    error: Optional[OSError] = None
    try:
        if is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
    except OSError as exc:
        error = exc
    if _all_ok(error is None):
        try:
            engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        except OSError as exc:
            error = exc
    if _all_ok(error is None) and is_main:
        try:
            torch.save(state, tmp / STATE_FILE)
            export_weights(engine.module.model if export is None else export, tmp / EXPORT_FILE)
            _fsync_tree(tmp)
            _publish(tmp, final, root)
            write_text_atomic(root / "latest", name + "\n")
        except OSError as exc:
            error = exc
    if not _all_ok(error is None):
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_name(out_dir)
        why = f"{error.strerror or error}" if error is not None else "another rank failed to write"
        raise CheckpointError(f"{root}: could not write checkpoint {name} ({why}); nothing partial was left, "
                              f"latest still names {previous or 'no checkpoint'}")
    return final


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """Rename the complete temporary folder to its final name. A checkpoint already there (a resumed run saving
    the same step again) is moved aside first and deleted after; remove_stale puts it back if we die between."""
    aside = root / f".old-{final.name}"
    if final.exists():
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(final, aside)
    os.replace(tmp, final)
    fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(d)


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


def check_world_size(state: dict[str, Any], folder: Path, world_size: int) -> None:
    """Refuse to resume a ZeRO 1/2 checkpoint on another number of ranks: its optimizer state is sharded per rank
    (stage 0 keeps it whole, and any world size resumes it). Raises ValueError naming the folder."""
    saved = state.get("world_size", world_size)
    stage = state.get("zero_stage", 0)
    if saved != world_size and stage:
        raise ValueError(f"run.resume: {folder} was written by {saved} ranks under ZeRO stage {stage}, whose "
                         f"optimizer state is split per rank; resume it on {saved} ranks (this run has "
                         f"{world_size}), or train with engine.zero_stage=0 to change the world size")


def read_state(folder: Path) -> dict[str, Any]:
    return torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)


def safe_globals() -> list:
    """The only non-tensor classes DeepSpeed pickles into its checkpoint files (ZeRO 1/2 optimizer shards): plain
    data holders, allowlisted so those files load with torch.load(weights_only=True) like all of ours."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _weights_only(engine):
    """Make DeepSpeed read its files with weights_only=True (its engine hard-codes False): no pickled code runs."""
    ckpt_engine = engine.checkpoint_engine
    real_load = ckpt_engine.load

    def load(path, map_location=None, *args, **kwargs):
        return torch.load(path, map_location=map_location, weights_only=True)

    ckpt_engine.load = load
    try:
        with torch.serialization.safe_globals(safe_globals()):
            yield
    finally:
        ckpt_engine.load = real_load


def load(engine, folder: Path) -> dict[str, Any]:
    """Collective: restore DeepSpeed's module/optimizer state and return our trainer state. Every file is read with
    torch.load(weights_only=True) (DeepSpeed's too, see safe_globals)."""
    with _weights_only(engine):
        load_path, _ = engine.load_checkpoint(str(folder), tag="ds", load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
    if load_path is None:
        raise FileNotFoundError(f"{folder}: DeepSpeed found no checkpoint to load")
    return read_state(folder)
