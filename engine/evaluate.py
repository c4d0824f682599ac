"""Test-split accuracy: the in-training evaluation, and `smallvit eval` of exported weights without DeepSpeed.

`smallvit eval RUN` rebuilds exactly the run's model (its config's model keys, sizes included), refuses a test split
whose class count differs from the checkpoint's, and normalises the test split with the run's training statistics
(recorded in trainer_state.pt; a run from before they were recorded falls back to its config's training sidecar).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine import checkpoint
from engine.config import ConfigError, load_config
from engine.models import create_model
from engine.models.options import model_kwargs
from engine.runtime import Runtime

TOP5_MIN_CLASSES = 6   # top-5 of a set of 5 classes or fewer is 100% by construction: not computed, not reported


@torch.no_grad()
def evaluate(model: nn.Module, loader, rt: Runtime, dtype: torch.dtype, progress: bool = False) -> dict:
    """Top-1 and (with more than 5 classes) top-5 in percent, mean CE loss and the image count over the whole
    test split, summed on the device across ranks and read once. `progress`: a bar over the batches (main rank).
    Raises RuntimeError when the ranks together did not see each test image of the loader's plan exactly once."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=rt.device)   # loss sum, top1, top5, count
    autocast = torch.autocast(rt.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    batches = loader.epoch(0)
    if progress and rt.is_main:
        from tqdm import tqdm

        batches = tqdm(batches, total=len(loader), unit="batch", desc="eval", dynamic_ncols=True, leave=False,
                       file=sys.stderr)
    classes = getattr(model, "num_classes", 0)
    for batch in batches:
        with autocast:
            logits = model(batch.images).float()
        classes = logits.shape[1]
        sums[0] += F.cross_entropy(logits, batch.labels, reduction="sum").double()
        top = logits.topk(min(5, classes), dim=1).indices
        hits = top == batch.labels[:, None]
        sums[1] += hits[:, 0].sum()
        sums[2] += hits.any(1).sum()
        sums[3] += len(batch)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
    model.train()
    loss_sum, top1, top5, count = sums.tolist()   # one read of the device totals
    expected = getattr(getattr(loader, "plan", None), "size", None)   # the plan's subset (validation) or split
    if expected is not None and int(count) != expected:
        raise RuntimeError(f"evaluation saw {int(count)} images over {rt.world_size} ranks, the split has "
                           f"{expected}")
    n = max(count, 1.0)
    result = {"loss": loss_sum / n, "top1": 100.0 * top1 / n}
    if classes >= TOP5_MIN_CLASSES:
        result["top5"] = 100.0 * top5 / n
    result["count"] = int(count)
    return result


def find_run_config(folder: Path) -> Path | None:
    """The config.yaml of the run a checkpoint folder belongs to (…/run/checkpoints/step_X -> …/run)."""
    for candidate in (folder / "config.yaml", folder.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def find_checkpoint(path: str | Path) -> Path:
    """The checkpoint `smallvit eval PATH` names: a run folder (its latest checkpoint) or a checkpoint folder.
    Raises FileNotFoundError naming PATH as the user typed it when it holds no exported checkpoint."""
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{path}: no such run folder or checkpoint folder")
    latest = folder / "checkpoints" / "latest"
    if latest.is_file():
        folder = folder / "checkpoints" / latest.read_text().strip()
    missing = [name for name in (checkpoint.STATE_FILE, checkpoint.EXPORT_FILE) if not (folder / name).is_file()]
    if missing:
        where = "" if folder == Path(path) else f" (its latest checkpoint {folder})"
        raise FileNotFoundError(f"{path}: not a complete smallvit checkpoint{where}: {' and '.join(missing)} "
                                f"missing (a run folder or a checkpoints/step_* folder)")
    return folder


def load_exported(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors strictly; raise ValueError naming the file and the mismatched keys."""
    state = checkpoint.read_export(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def run_statistics(state: dict, data) -> tuple[list, list]:
    """The (mean, std) the run trained with: recorded in its trainer state, else its training split's sidecar."""
    if "mean" in state and "std" in state:
        return list(state["mean"]), list(state["std"])
    from loaders.factory import training_statistics

    return training_statistics(data)


def checkpoint_dataset(state: dict, data) -> str:
    """The dataset name a checkpoint was trained on: recorded in its state, else its config's training sidecar."""
    if state.get("dataset"):
        return state["dataset"]
    from loaders.sidecar import DatasetFileError, read_sidecar

    try:
        return read_sidecar(data.train)["dataset"] if data.train else data.dataset or "unknown"
    except DatasetFileError:
        return data.dataset or "unknown"


def check_classes(state: dict, folder: Path, test_meta: dict, data) -> None:
    """Refuse a test split whose class count is not the checkpoint's (either way round), naming both."""
    if state["num_classes"] != test_meta["num_classes"]:
        raise ConfigError(f"{folder}: the checkpoint has {state['num_classes']} classes (dataset "
                          f"'{checkpoint_dataset(state, data)}') but the test split {data.test} has "
                          f"{test_meta['num_classes']} (dataset '{test_meta['dataset']}')")


def run_eval(args) -> int:
    from loaders.factory import build_loader
    from loaders.sidecar import DatasetFileError, read_sidecar

    try:
        folder = find_checkpoint(args.checkpoint)
        config_path = args.config or find_run_config(folder)
        if not config_path:
            raise ConfigError(f"{folder}: no config.yaml beside the checkpoint; pass --config")
        cfg = load_config(config_path, args.overrides)
        state = checkpoint.read_state(folder)
        if not cfg.data.test:
            raise DatasetFileError("data.test: no test split named (the run's config or data.test=...)")
        check_classes(state, folder, read_sidecar(cfg.data.test), cfg.data)
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.engine.device != "cpu" else "cpu")
        loader, _ = build_loader(cfg.data, False, cfg.run.seed, device, stats=run_statistics(state, cfg.data))
        model = create_model(cfg.model.name, num_classes=state["num_classes"],
                             **model_kwargs(cfg.model, drop_path=0.0)).to(device)
        load_exported(model, folder / checkpoint.EXPORT_FILE)
        progress = cfg.run.progress and not getattr(args, "no_progress", False)
        result = evaluate(model, loader, Runtime(0, 1, 0, device), torch.float32, progress=progress)
    except (ConfigError, DatasetFileError, FileNotFoundError, ValueError) as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(folder), "global_step": state["global_step"], **result}))
    return 0
