"""Load backbone weights by name (METHODS.md B, fine-tune stage): the self-supervised teacher's state dict into a
freshly built model, reporting every key that did not load.

The reference (B's finetune.py) pairs checkpoint and model keys by position, which silently misloads when the two
orders differ; here a tensor loads only into the parameter or buffer of the same name and shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

PREFIXES = ("module.", "backbone.")   # DataParallel/DDP and DINO's MultiCropWrapper add these


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)        # model keys that took a checkpoint tensor
    missing: list[str] = field(default_factory=list)       # model keys the checkpoint lacks (kept as initialised)
    unexpected: list[str] = field(default_factory=list)    # checkpoint keys the model lacks (e.g. the DINO head)
    mismatched: list[str] = field(default_factory=list)    # same name, different shape: "key: ckpt -> model"

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: {self.missing}; "
                f"unexpected {len(self.unexpected)}: {self.unexpected}; mismatched {len(self.mismatched)}: "
                f"{self.mismatched}")


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key.replace(prefix, "")
        out[key] = value
    return out


def read_state_dict(path: str | Path, key: str = "teacher") -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint file: entry `key` when the file holds a dict with it, else the file itself."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.pretrained: checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        blob = load_file(str(p))
    else:
        try:  # never unpickle arbitrary objects from a checkpoint
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(f"model.pretrained: {p} does not load as plain tensors ({type(exc).__name__})") from None
    if key and isinstance(blob, dict) and key in blob:
        blob = blob[key]
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError(f"model.pretrained: {p} holds no state dict (looked for entry '{key}')")
    return strip_prefixes(blob)


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> LoadReport:
    """Copy every same-name, same-shape tensor of `state` into `model`; return what did and did not load."""
    own = model.state_dict()
    report = LoadReport()
    usable, mismatched = {}, set()
    for key, value in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            mismatched.add(key)
            report.mismatched.append(f"{key}: {tuple(value.shape)} -> {tuple(own[key].shape)}")
        else:
            usable[key] = value
    model.load_state_dict(usable, strict=False)
    report.loaded = sorted(usable)
    report.missing = sorted(k for k in own if k not in usable and k not in mismatched)
    return report
