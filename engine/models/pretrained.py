"""The fine-tune stage of the self-supervised method (METHODS.md B): start a supervised run from the pretraining
run's EMA-teacher backbone, loaded by parameter name, with every key that did not load reported.

    model.finetune_from: runs/ssl_cifar10_vit           # a pretraining run folder: its latest checkpoint
                         runs/ssl_cifar10_vit/checkpoints/step_00039000    # a checkpoint folder
                         teacher.safetensors           # a weights file
                         dino_checkpoint.pth           # a torch file holding {finetune_key: state dict, ...}
                         checkpoint.pth                # a reference repository's checkpoint (A, B, C, D)

A tensor loads only into the parameter or buffer of the same name (after stripping DataParallel's `module.` and
DINO's `backbone.` prefixes) and shape, never by position as B's finetune.py does (docs/design.md); an absolute
position embedding of another grid is resized with DINO's bicubic interpolation and reported as such.

A reference repository's checkpoint loads the same way after its keys are renamed by the documented maps of
engine/models/reference_names.py (D's ViT and CaiT, B's CaiT patch embedding) and of each task's
AuxTask.reference_rules (C's and A's auxiliary-task heads;
every renamed key is in the report). The auxiliary tasks' heads load too when the run has those tasks
(`<task name>.<its state-dict key>`); a head the checkpoint lacks keeps its initialisation and
is reported, never refused. A torch file that is a dict of entries is read at `model.finetune_key` (default
'teacher'), else at the references' own entries 'model_state_dict' (A, D), 'model' (C), 'state_dict'.

The pretraining exports the teacher backbone only (built with num_classes=0), so the classifier's keys are expected
missing. Anything else missing or mismatched is a backbone that did not load: the run refuses to start unless
`model.finetune_strict: false`; nothing loaded at all is refused always. The report goes to the log and to
out_dir/finetune_load.json.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.pos_embed import interpolate_pos_embed
from engine.models.reference_names import translate_key

KEY = "model.finetune_from"
PREFIXES = ("module.", "backbone.")   # DataParallel/DDP and DINO's MultiCropWrapper add these
REPORT_FILE = "finetune_load.json"
POSITION_EMBEDDINGS = ("pos_embed", "absolute_pos_embed")   # ViT/CaiT (1, P + k*k, C); Swin ape (1, k, k, C)
CONTAINER_KEYS = ("model_state_dict", "model", "state_dict")   # where A/D, C and others keep the weights

log = logging.getLogger("smallvit")


@dataclass
class LoadReport:
    source: str = ""                                       # the weights file read
    loaded: list[str] = field(default_factory=list)        # model keys that took a checkpoint tensor
    missing: list[str] = field(default_factory=list)       # model keys the checkpoint lacks (kept as initialised)
    unexpected: list[str] = field(default_factory=list)    # checkpoint keys the model lacks (e.g. the DINO head)
    mismatched: list[str] = field(default_factory=list)    # same name, different shape: "key: ckpt -> model"
    interpolated: list[str] = field(default_factory=list)  # position embeddings resized: "key: ckpt -> model"
    classifier: list[str] = field(default_factory=list)    # the model's classifier keys (expected missing)
    heads_missing: list[str] = field(default_factory=list)     # auxiliary-head keys the checkpoint lacks, and
    heads_mismatched: list[str] = field(default_factory=list)  # those of another shape: kept as initialised, and
                                                               # never a reason to refuse
    renamed: list[str] = field(default_factory=list)       # reference keys renamed: "theirs -> ours"
    references: list[str] = field(default_factory=list)    # whose name maps renamed them ('A', 'B', 'C', 'D')

    @property
    def backbone_missing(self) -> list[str]:
        """Missing keys that are not the classifier's: backbone weights the checkpoint did not provide."""
        return [k for k in self.missing if k not in self.classifier]

    @property
    def backbone_mismatched(self) -> list[str]:
        """Shape mismatches outside the classifier (a classifier of another class count is expected)."""
        return [m for m in self.mismatched if m.split(": ", 1)[0] not in self.classifier]

    def summary(self) -> str:
        text = (f"loaded {len(self.loaded)} tensors; missing {len(self.missing)}: {self.missing}; "
                f"unexpected {len(self.unexpected)}: {self.unexpected}; mismatched {len(self.mismatched)}: "
                f"{self.mismatched}")
        if self.interpolated:
            text += f"; interpolated {len(self.interpolated)}: {self.interpolated}"
        if self.references:
            text += f"; {len(self.renamed)} keys renamed by the name maps of reference {', '.join(self.references)}"
        if self.heads_missing or self.heads_mismatched:
            text += (f"; auxiliary heads kept as initialised: {len(self.heads_missing)} missing, "
                     f"{len(self.heads_mismatched)} mismatched")
        return text

    def not_loaded(self) -> list[dict[str, str]]:
        """Every key that did not load, with its reason: 'missing' (classifier or backbone), 'unexpected',
        or 'shape (ckpt) -> (model)'."""
        rows = [{"key": k, "reason": "missing (classifier: expected)" if k in self.classifier else "missing"}
                for k in self.missing]
        rows += [{"key": k, "reason": "missing (auxiliary head: kept as initialised)"} for k in self.heads_missing]
        rows += [{"key": t.split(": ", 1)[0], "reason": f"shape {t.split(': ', 1)[1]} (auxiliary head: kept as "
                  f"initialised)"} for t in self.heads_mismatched]
        rows += [{"key": k, "reason": "unexpected"} for k in self.unexpected]
        for text in self.mismatched:
            key, shapes = text.split(": ", 1)
            rows.append({"key": key, "reason": f"shape {shapes}"})
        return rows

    def to_json(self) -> dict:
        return {**asdict(self), "not_loaded": self.not_loaded(), "backbone_missing": self.backbone_missing,
                "backbone_mismatched": self.backbone_mismatched}


# --------------------------------------------------------------------------------------------------- reading
def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading `module.` / `backbone.` (in any order, repeated) from every key."""
    out = {}
    for key, value in state.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def resolve_weights_file(source: str | Path) -> Path:
    """The weights file `model.finetune_from` names: a .safetensors/.pth/.pt file as is; a checkpoint folder or a
    run folder (its latest checkpoint, engine.checkpoint.find) -> the checkpoint's model.safetensors."""
    from engine import checkpoint

    p = Path(source)
    if p.is_file():
        return p
    if not p.exists():
        raise ConfigError(f"{KEY}: {p} does not exist (a run folder, a checkpoint folder, or a .safetensors/.pth "
                          f"file)")
    try:
        folder = checkpoint.find(p)
    except FileNotFoundError:
        raise ConfigError(f"{KEY}: {p} is a folder without a complete smallvit checkpoint (expected a run folder "
                          f"with checkpoints/latest, or a checkpoint folder)") from None
    weights = folder / checkpoint.EXPORT_FILE
    if not weights.is_file():
        raise ConfigError(f"{KEY}: checkpoint {folder} has no {checkpoint.EXPORT_FILE}")
    return weights


def _is_state_dict(blob) -> bool:
    return isinstance(blob, dict) and bool(blob) and all(isinstance(v, torch.Tensor) for v in blob.values())


def read_state_dict(path: str | Path, key: str = "teacher") -> dict[str, torch.Tensor]:
    """The state dict in a weights file: entry `key` when the file holds a dict with it, else the file itself when
    it is a state dict, else its first entry of CONTAINER_KEYS (the reference repositories' checkpoint dicts);
    prefixes stripped. Torch files load with weights_only (never unpickle objects). Raises ConfigError naming
    model.finetune_from and the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{KEY}: checkpoint not found: {p}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            blob = load_file(str(p))
        except Exception as exc:
            raise ConfigError(f"{KEY}: {p} is not a readable safetensors file ({type(exc).__name__})") from None
    else:
        try:
            blob = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ConfigError(f"{KEY}: {p} does not load as plain tensors ({type(exc).__name__})") from None
    if key and isinstance(blob, dict) and key in blob:
        blob = blob[key]
    elif isinstance(blob, dict) and not _is_state_dict(blob):
        blob = next((blob[k] for k in CONTAINER_KEYS if _is_state_dict(blob.get(k))), blob)
    if not _is_state_dict(blob):
        raise ConfigError(f"{KEY}: {p} holds no state dict (looked for entry 'model.finetune_key: {key}')")
    return strip_prefixes(blob)


# --------------------------------------------------------------------------------------------------- loading
def classifier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's classifier (timm's get_classifier: ViT/CaiT `head`, Swin `head.fc`)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    if head is None:
        return []
    names = [name for name, module in model.named_modules() if module is head]
    return sorted(f"{names[0]}.{k}" for k in head.state_dict()) if names else []


def _resize_position_embedding(key: str, value: torch.Tensor, target: torch.Tensor, model: nn.Module
                               ) -> Optional[torch.Tensor]:
    """`value` resized to `target`'s grid (DINO interpolation), or None when the shapes differ in another way."""
    if key.rsplit(".", 1)[-1] not in POSITION_EMBEDDINGS or value.dim() != target.dim() or value.shape[-1] != \
            target.shape[-1] or value.shape[0] != 1:
        return None
    dim = target.shape[-1]
    if target.dim() == 4:                                        # Swin ape (1, k, k, C): no prefix rows
        if value.shape[1] != value.shape[2] or target.shape[1] != target.shape[2]:
            return None
        flat = interpolate_pos_embed(value.reshape(1, -1, dim).float(), target.shape[1], 0)
        return flat.reshape(target.shape).to(value.dtype)
    if target.dim() != 3:
        return None
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None or grid[0] != grid[1]:
        return None
    prefix = target.shape[1] - grid[0] * grid[1]
    k = math.isqrt(max(value.shape[1] - prefix, 0))
    if prefix < 0 or k == 0 or k * k != value.shape[1] - prefix:
        return None
    return interpolate_pos_embed(value.float(), grid[0], prefix).to(value.dtype)


def _with_heads(model: nn.Module, heads: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The model's state dict plus each head's under '<name>.' (what the reference maps rename into)."""
    own = dict(model.state_dict())
    for name, head in heads.items():
        own.update({f"{name}.{k}": v for k, v in head.state_dict().items()})
    return own


def load_backbone_weights(model: nn.Module, state: dict[str, torch.Tensor], interpolate_pos: bool = True,
                          heads: Optional[dict[str, nn.Module]] = None) -> LoadReport:
    """Copy every same-name, same-shape tensor of `state` (reference names translated first) into `model` and the
    auxiliary `heads` ({task name: module}; their keys '<name>.<key>'); position embeddings of another grid resized
    when `interpolate_pos`; return what did and did not load."""
    heads = heads or {}
    own = _with_heads(model, heads)
    head_rules = [rule for head in heads.values() for rule in getattr(head, "reference_rules", ())]
    report = LoadReport(classifier=classifier_keys(model))
    usable, mismatched = {}, set()
    for theirs, value in state.items():
        key, rule = translate_key(theirs, head_rules)
        if key not in own:
            report.unexpected.append(theirs)
            continue
        if rule is not None:
            report.renamed.append(f"{theirs} -> {key}")
            if rule.reference not in report.references:
                report.references.append(rule.reference)
            if rule.transform is not None and own[key].shape != value.shape:
                laid_out = rule.transform(value, own[key])
                value = value if laid_out is None else laid_out
        if own[key].shape != value.shape:
            resized = _resize_position_embedding(key, value, own[key], model) if interpolate_pos else None
            shapes = f"{tuple(value.shape)} -> {tuple(own[key].shape)}"
            if resized is None:
                mismatched.add(key)
                in_head = key.split(".", 1)[0] in heads
                (report.heads_mismatched if in_head else report.mismatched).append(f"{key}: {shapes}")
                continue
            report.interpolated.append(f"{key}: {shapes}")
            value = resized
        usable[key] = value
    model.load_state_dict({k: v for k, v in usable.items() if k.split(".", 1)[0] not in heads}, strict=False)
    for name, head in heads.items():
        prefix = f"{name}."
        head.load_state_dict({k[len(prefix):]: v for k, v in usable.items() if k.startswith(prefix)}, strict=False)
    report.loaded = sorted(usable)
    not_loaded = sorted(k for k in own if k not in usable and k not in mismatched)
    report.missing = [k for k in not_loaded if k.split(".", 1)[0] not in heads]
    report.heads_missing = [k for k in not_loaded if k.split(".", 1)[0] in heads]
    for names in (report.unexpected, report.mismatched, report.heads_mismatched, report.references):
        names.sort()
    return report


def _first(keys: list[str], n: int = 6) -> str:
    """The first n keys for an error message, with how many more there are."""
    return str(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_finetune_weights(model: nn.Module, cfg, out_dir: str | Path | None = None,  # cfg: the ModelConfig
                          is_main: bool = True, tasks: Optional[nn.ModuleList] = None) -> LoadReport:
    """The fine-tune start: resolve `cfg.finetune_from`, load by name into the model and the auxiliary tasks'
    heads (`tasks`: engine.tasks.build_tasks' list, or None), log the report and write it to
    out_dir/finetune_load.json (main rank), then refuse (ConfigError naming model.finetune_from and the file) when
    no weight loaded, or, with `cfg.finetune_strict`, when any backbone key is missing or mismatched."""
    weights = resolve_weights_file(cfg.finetune_from)
    heads = {task.name: task for task in tasks} if tasks is not None else None
    report = load_backbone_weights(model, read_state_dict(weights, cfg.finetune_key), heads=heads)
    report.source = str(weights)
    if is_main:
        log.info("%s %s (%s): %s", KEY, cfg.finetune_from, weights, report.summary())
        for row in report.not_loaded():
            log.info("  not loaded: %s (%s)", row["key"], row["reason"])
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / REPORT_FILE).write_text(json.dumps(report.to_json(), indent=2))
    if not report.loaded:
        raise ConfigError(f"{KEY}: no weight of {weights} fits {cfg.name} (names or shapes differ everywhere: "
                          f"{len(report.missing)} missing {_first(report.missing)}, {len(report.unexpected)} "
                          f"unexpected {_first(report.unexpected)}, {len(report.mismatched)} mismatched "
                          f"{_first(report.mismatched)})")
    if (report.backbone_missing or report.backbone_mismatched) and cfg.finetune_strict:
        where = f"; all in {Path(out_dir) / REPORT_FILE}" if out_dir is not None else ""
        raise ConfigError(f"{KEY}: the backbone of {cfg.name} did not fully load from {weights}: "
                          f"{len(report.backbone_missing)} missing {_first(report.backbone_missing)}, "
                          f"{len(report.backbone_mismatched)} mismatched {_first(report.backbone_mismatched)}{where} "
                          f"(model.finetune_strict=false "
                          f"starts anyway, keeping those weights as initialised)")
    return report
