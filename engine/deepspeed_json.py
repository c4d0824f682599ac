"""A user's DeepSpeed JSON (engine.deepspeed_config / `--deepspeed_config`) merged with the config we generate.

The rules, in order:
  - `optimizer` and `scheduler` are refused, naming the key: the loop builds its own AdamW over its parameter
    groups from optim.* and sets the LR of every step itself (warm-up + cosine by step, which resume restores);
    a DeepSpeed optimizer or scheduler would be silently overridden by it, or fight it. fp16 / amp are refused
    too: the one reduced-precision scheme is bf16 autocast over fp32 master weights (engine/precision.py).
  - Keys that our config also describes are resolved into the run config before anything runs, so the loader, the
    schedule and the resolved config.yaml all see one value:
        train_batch_size              data.batch_size
        gradient_accumulation_steps   optim.accumulation_steps
        gradient_clipping             optim.clip_grad
        zero_optimization.stage       engine.zero_stage
        bf16.enabled                  engine.precision (true = bf16)
    Where our key is at its schema default the JSON's value is taken; where both are set and differ the run is
    refused naming both. train_micro_batch_size_per_gpu must equal data.batch_size / (ranks * accumulation).
  - Every other key of the JSON is merged over the generated config (nested sections key by key), so a user can
    tune what we do not set (ZeRO bucket sizes, communication_data_type, ...).
"""
from __future__ import annotations

import copy
import dataclasses
import json

from engine.config import Config, ConfigError, EngineConfig, OptimConfig, DataConfig

# JSON path -> (section, field, schema default, JSON value -> our value)
MAPPED = {
    ("train_batch_size",): ("data", "batch_size", DataConfig.batch_size, int),
    ("gradient_accumulation_steps",): ("optim", "accumulation_steps", OptimConfig.accumulation_steps, int),
    ("gradient_clipping",): ("optim", "clip_grad", OptimConfig.clip_grad, float),
    ("zero_optimization", "stage"): ("engine", "zero_stage", EngineConfig.zero_stage, int),
    ("bf16", "enabled"): ("engine", "precision", EngineConfig.precision, lambda on: "bf16" if on else "fp32"),
}
REFUSED = {
    "optimizer": "the loop builds its own AdamW from optim.* (lr, betas, weight_decay, its no-decay groups); set "
                 "those keys instead",
    "scheduler": "the loop sets every step's LR itself (optim.lr, optim.min_lr, optim.warmup_epochs: warm-up + "
                 "cosine by step, restored on resume); set those keys instead",
}


def read_user_json(path: str) -> dict:
    """The JSON object in `path`; ConfigError naming engine.deepspeed_config and the file otherwise."""
    try:
        with open(path) as fh:
            user = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"engine.deepspeed_config: cannot read {path} ({exc})") from None
    if not isinstance(user, dict):
        raise ConfigError(f"engine.deepspeed_config: {path} must hold a JSON object")
    return user


def _get(tree: dict, path: tuple[str, ...]):
    node = tree
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def resolve_into_config(cfg: Config) -> Config:
    """cfg with the user JSON's mapped keys resolved into it (module docstring); cfg itself when there is no JSON.
    Raises ConfigError naming the key(s) at fault."""
    path = cfg.engine.deepspeed_config
    if not path:
        return cfg
    user = read_user_json(path)
    for key, why in REFUSED.items():
        if key in user:
            raise ConfigError(f"engine.deepspeed_config: {path} sets '{key}', which this loop does not honour: {why}")
    for key in ("fp16", "amp"):
        if _get(user, (key, "enabled")):
            raise ConfigError(f"engine.deepspeed_config: {path} enables '{key}'; the only reduced precision is "
                              f"engine.precision=bf16 (bf16 autocast over fp32 master weights)")
    sections = {name: getattr(cfg, name) for name in ("data", "optim", "engine")}
    changes: dict[str, dict] = {name: {} for name in sections}
    for json_path, (section, name, default, convert) in MAPPED.items():
        raw = _get(user, json_path)
        if raw is None:
            continue
        try:
            value = convert(raw)
        except (TypeError, ValueError):
            raise ConfigError(f"engine.deepspeed_config: {path}: '{'.'.join(json_path)}' is {raw!r}") from None
        ours = getattr(sections[section], name)
        if ours == value:
            continue
        if ours != default:
            raise ConfigError(f"engine.deepspeed_config: {path} sets '{'.'.join(json_path)}' to {raw!r} but "
                              f"{section}.{name} is {ours!r}; set one of them (or both alike)")
        changes[section][name] = value
    if not any(changes.values()):
        return cfg
    return dataclasses.replace(cfg, **{s: dataclasses.replace(sections[s], **c) for s, c in changes.items() if c})


def merge(ours: dict, user: dict) -> dict:
    """`user` over `ours`, nested dicts key by key (a copy; neither input changes)."""
    out = copy.deepcopy(ours)
    for key, value in user.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def merged_config(cfg: Config, ours: dict, world_size: int) -> dict:
    """Our generated DeepSpeed config with the user's JSON merged over it. cfg must already be resolved
    (resolve_into_config), so the mapped keys agree; what stays DeepSpeed's alone is checked here."""
    user = read_user_json(cfg.engine.deepspeed_config)
    resolved = resolve_into_config(cfg)
    if resolved is not cfg and dataclasses.asdict(resolved) != dataclasses.asdict(cfg):
        raise ConfigError("engine.deepspeed_config: the run config was not resolved against the JSON "
                          "(engine.deepspeed_json.resolve_into_config)")
    micro = user.get("train_micro_batch_size_per_gpu")
    if micro is not None and micro != ours["train_micro_batch_size_per_gpu"]:
        raise ConfigError(f"engine.deepspeed_config: {cfg.engine.deepspeed_config} sets "
                          f"'train_micro_batch_size_per_gpu' to {micro!r} but data.batch_size "
                          f"{cfg.data.batch_size} / ({world_size} ranks x optim.accumulation_steps "
                          f"{cfg.optim.accumulation_steps}) is {ours['train_micro_batch_size_per_gpu']}")
    out = merge(ours, user)
    # the mapped keys take our (resolved) values: same numbers, and bf16 stays torch autocast's, not DeepSpeed's
    for json_path in MAPPED:
        node_ours, node_out = ours, out
        for part in json_path[:-1]:
            node_ours, node_out = node_ours[part], node_out[part]
        node_out[json_path[-1]] = node_ours[json_path[-1]]
    return out
