"""`smallvit eval`: test-split accuracy of exported weights, without DeepSpeed."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from engine import checkpoint
from engine.config import ConfigError, load_config
from engine.models import create_model
from engine.models.options import model_kwargs
from engine.runtime import Runtime


def find_run_config(folder: Path) -> Path | None:
    """The config.yaml of the run a checkpoint folder belongs to (…/run/checkpoints/step_X -> …/run)."""
    for candidate in (folder / "config.yaml", folder.parent.parent / "config.yaml"):
        if candidate.is_file():
            return candidate
    return None


def load_exported(model: torch.nn.Module, path: Path) -> None:
    """Load model.safetensors strictly; raise ValueError naming the file and the mismatched keys."""
    state = checkpoint.read_export(path)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")


def run_eval(args) -> int:
    from loaders.factory import build_loader
    from loaders.sidecar import DatasetFileError

    from engine.train import evaluate

    try:
        folder = checkpoint.find(args.checkpoint)
        config_path = args.config or find_run_config(folder)
        if not config_path:
            raise ConfigError(f"{folder}: no config.yaml beside the checkpoint; pass --config")
        cfg = load_config(config_path, args.overrides)
        state = checkpoint.read_state(folder)
        device = torch.device("cuda" if torch.cuda.is_available() and cfg.engine.device != "cpu" else "cpu")
        loader, meta = build_loader(cfg.data, False, cfg.run.seed, device)
        model = create_model(cfg.model.name, num_classes=state["num_classes"],
                             **model_kwargs(cfg.model, drop_path=0.0)).to(device)
        load_exported(model, folder / checkpoint.EXPORT_FILE)
        result = evaluate(model, loader, Runtime(0, 1, 0, device), torch.float32)
    except (ConfigError, DatasetFileError, FileNotFoundError, ValueError) as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"checkpoint": str(folder), "global_step": state["global_step"], **result}))
    return 0
