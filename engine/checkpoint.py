"""Checkpoints: DeepSpeed's save/load inside an atomic folder rename, our trainer state, and a plain export.

    out_dir/checkpoints/
      step_00000420/            one complete checkpoint (renamed into place only when every rank finished)
        ds/                     DeepSpeed's files (module, optimizer, per-rank ZeRO shards)
        trainer_state.pt        epoch, step in epoch, global step, best accuracy, the run's resolved config and
                                its digest (engine/run_folder.py; weights_only-safe)
        model.safetensors       the model's weights, loadable without DeepSpeed (timm names for timm models)
        config.json             timm's hub layout: timm.create_model('local-dir:<folder>', pretrained=True)
      best/                     hard links to the files of the checkpoint of the best selection metric
      latest                    the name of the newest complete checkpoint (written atomically, last)

Only the newest `run.keep_last` step folders are kept (0: all), pruned after `latest` moved on, never the one it
names; `best/` is replaced by rename like a step folder, so both stay complete at every instant.

A crash leaves the previous checkpoint or the new one, never a partial one (docs/design.md); stale `.tmp-*`
folders are removed at the next start; a failed write raises CheckpointError on every rank, naming the folder.
A resume on another number of ranks needs ZeRO 0 (whole optimizer state): check_world_size refuses it otherwise.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from loaders.atomic import fsync_dir, write_text_atomic

STATE_FILE = "trainer_state.pt"
EXPORT_FILE = "model.safetensors"
HUB_CONFIG_FILE = "config.json"
BEST = "best"

log = logging.getLogger("smallvit")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, permissions, ...); the message names the folder and says
    which checkpoint `latest` still names. Nothing partial is left at a final path."""


class CorruptCheckpoint(ValueError):
    """A checkpoint file that exists but cannot be read (random bytes, truncated); the message names the file."""


def _reason(exc: BaseException) -> str:
    """A short why for a file that failed to load: torch's own text relays advice (weights_only=False) that would
    run pickled code, so only its first clause is kept, and never that advice."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    if "weights_only" in text or "Weights only" in text or not text:
        return f"not a readable PyTorch file ({type(exc).__name__})"
    return f"{type(exc).__name__}: {text.split('. ')[0][:120]}"


def load_torch_file(path: Path) -> Any:
    """torch.load(weights_only=True) of one checkpoint file (DeepSpeed's data holders allowed, see safe_globals);
    raises CorruptCheckpoint naming `path` when it is not a readable PyTorch file."""
    try:
        with torch.serialization.safe_globals(safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing from the checkpoint") from None
    except Exception as exc:   # UnpicklingError, RuntimeError (zip), EOFError, ...: the file is damaged
        raise CorruptCheckpoint(f"{path}: corrupt checkpoint file, {_reason(exc)}") from None


def read_export(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a model.safetensors; raises CorruptCheckpoint naming the file when it cannot be read."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint")
    try:
        return load_file(str(path))
    except Exception as exc:   # SafetensorError (header too large, truncated, ...)
        raise CorruptCheckpoint(f"{path}: corrupt safetensors file ({str(exc).splitlines()[0][:120]})") from None


def export_shapes(path: Path) -> dict[str, list[int]]:
    """{tensor name: shape} from a model.safetensors header (no tensor read); CorruptCheckpoint naming the file."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: missing from the checkpoint")
    try:
        with safe_open(str(path), "pt") as fh:
            return {k: list(fh.get_slice(k).get_shape()) for k in fh.keys()}
    except Exception as exc:
        raise CorruptCheckpoint(f"{path}: corrupt safetensors file ({str(exc).splitlines()[0][:120]})") from None


def verify(folder: Path, deepspeed_files: bool = True) -> None:
    """Read every file of a checkpoint folder (trainer state, DeepSpeed's files when `deepspeed_files`, the export's
    header); raise CorruptCheckpoint / FileNotFoundError naming the first file that cannot be read."""
    read_state(folder)
    if deepspeed_files:
        for path in sorted((folder / "ds").rglob("*.pt")):
            load_torch_file(path)
    export_shapes(folder / EXPORT_FILE)


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
         export: Optional[torch.nn.Module] = None, hub_config: Optional[dict] = None, keep_last: int = 0,
         best: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint folder. `export` is the module written to
    model.safetensors (default: the trained model, engine.module.model; pretraining exports the teacher), and
    `hub_config` its config.json. `best`: this checkpoint also becomes best/. Then all but the newest `keep_last`
    step folders are deleted (0 keeps all).

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
            if hub_config is not None:
                (tmp / HUB_CONFIG_FILE).write_text(json.dumps(hub_config, indent=2))
            _fsync_tree(tmp)
            _publish(tmp, final, root)
            write_text_atomic(root / "latest", name + "\n")
            if best:
                publish_best(final, root)
            prune(root, keep_last)
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


def publish_best(folder: Path, root: Path) -> None:
    """Make root/best a complete copy of checkpoint `folder`: hard links (no second copy of the bytes; a copy where
    the filesystem has none) built in a temporary folder, then renamed into place like any checkpoint."""
    tmp = root / f".tmp-{BEST}"
    if tmp.exists():
        shutil.rmtree(tmp)
    for src in folder.rglob("*"):
        dst = tmp / src.relative_to(folder)
        if src.is_dir():
            dst.mkdir(parents=True, exist_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    fsync_dir(tmp)
    _publish(tmp, root / BEST, root)


def step_folders(root: Path) -> list[Path]:
    """The step_* checkpoint folders under `root`, oldest (lowest step) first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` step folders (0: keep all), never the one `latest` names. best/ holds
    its own links, so deleting the step folder it came from leaves it whole."""
    if keep_last <= 0:
        return
    pointer = root / "latest"
    named = pointer.read_text().strip() if pointer.is_file() else None
    for folder in step_folders(root)[:-keep_last]:
        if folder.name != named:
            shutil.rmtree(folder, ignore_errors=True)


def _fsync_tree(folder: Path) -> None:
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        fsync_dir(d)


def export_weights(model: torch.nn.Module, path: Path) -> None:
    """model.safetensors, readable as any file the user writes (0666 less the umask; safetensors itself makes 0600)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def resolve(out_dir: str | Path, resume: str, announce: bool = True) -> Optional[Path]:
    """The checkpoint folder `run.resume` names, every file of it read once (verify): 'auto' = latest in out_dir
    (None if there is none), falling back to the newest older step folder that reads whole when latest's does not
    (a warning names the unreadable file when `announce`); a named folder must read whole itself.
    Raises CorruptCheckpoint / FileNotFoundError naming the file."""
    if not resume:
        return None
    if resume == "auto":
        root = checkpoint_root(out_dir)
        pointer = root / "latest"
        if not pointer.is_file():
            return None
        named = root / pointer.read_text().strip()
        candidates = [named] + [f for f in reversed(step_folders(root)) if f != named]
        first_error: Optional[Exception] = None
        for folder in candidates:
            try:
                _check_complete(folder, "run.resume")
                verify(folder)
            except (CorruptCheckpoint, FileNotFoundError) as exc:
                first_error = first_error or exc
                if announce:
                    log.warning("run.resume=auto: skipping checkpoint %s (%s)", folder.name, exc)
                continue
            if folder != named and announce:
                log.warning("run.resume=auto: resuming from %s, the newest checkpoint that reads whole", folder)
            return folder
        raise first_error   # type: ignore[misc]
    folder = Path(resume)
    if (folder / "checkpoints" / "latest").is_file():       # a run folder
        folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    _check_complete(folder, "run.resume")
    verify(folder)
    return folder


def _check_complete(folder: Path, key: str) -> None:
    if not (folder / STATE_FILE).is_file() or not (folder / "ds").is_dir():
        raise FileNotFoundError(f"{key}: {folder} is not a complete smallvit checkpoint")


def find(path: str | Path) -> Path:
    """The checkpoint a user names (eval, inspect): a run folder (its latest checkpoint) or a checkpoint folder,
    its trainer state and export header read. Raises FileNotFoundError naming the path when it holds no complete
    checkpoint, CorruptCheckpoint naming the file that cannot be read."""
    folder = Path(path)
    if (folder / "checkpoints" / "latest").is_file():
        folder = folder / "checkpoints" / (folder / "checkpoints" / "latest").read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path}: no complete smallvit checkpoint")
    verify(folder, deepspeed_files=False)
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
    """trainer_state.pt; raises CorruptCheckpoint naming it when it is unreadable or not our trainer state."""
    path = Path(folder) / STATE_FILE
    state = load_torch_file(path)
    if not isinstance(state, dict) or "global_step" not in state:
        raise CorruptCheckpoint(f"{path}: not a smallvit trainer state")
    return state


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
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as exc:
            raise CorruptCheckpoint(f"{path}: corrupt checkpoint file, {_reason(exc)}") from None

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
