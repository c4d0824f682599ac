"""One config schema for every smallvit command: dataclasses, loaded from YAML, with dotted CLI overrides.

    cfg = load_config("configs/cifar10_vit_scratch.yaml", ["optim.lr=5e-4", "model.drop_path=0.2"])

Every key is checked against the schema before any work starts: an unknown key, a value of the wrong type or
one outside its allowed choices raises `ConfigError` whose message names the dotted key (and the file).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from engine.errors import ConfigError  # noqa: F401  (imported from here everywhere else)
from engine.tasks import registry as task_registry


# --------------------------------------------------------------------------------------------------- schema
@dataclass
class DataConfig:
    """Where the data comes from and how it is fed."""
    dataset: str = ""                  # name the .beton sidecars must carry ('cifar10', ...); '' = theirs, unchecked.
                                       # A recipe's name goes with its own paths: overriding data.train or data.test
                                       # without data.dataset takes the name from the new files (config_from_dict)
    train: str = ""                    # path to the training .beton (its .json sidecar lies beside it)
    test: str = ""                     # path to the test .beton
    loader: Literal["auto", "ffcv", "resident", "dali", "torchvision"] = "auto"
    image_size: int = 32               # side in pixels the model takes
    batch_size: int = 128              # global batch (all ranks, one optimizer step, before accumulation split)
    eval_batch_size: int = 512
    num_workers: int = 2               # CPU decode workers (ffcv/dali/torchvision)
    order: Literal["random", "quasi_random"] = "random"  # training order, every loader alike: uniform permutations,
                                                        # or FFCV's quasi-random one (few .beton pages open at a
                                                        # time: for os_cache=false; loaders/order.py)
    os_cache: bool = True              # ffcv: memory-map the whole file (True) or process cache (False)
    resident_max_fraction: float = 0.5  # resident: use it when the set fits in this fraction of device memory
    drop_last: bool = True             # training: drop the last incomplete batch (each sample still seen <= once)
    repeats: int = 1                   # "repeated augmentation": one epoch = this many fresh permutations
    val_fraction: float = 0.0          # held out of the training split (seeded by run.seed, stratified by class)
                                       # as a validation set that picks best/; 0 = off, best/ by test top-1
    # augmentation (all batched, on the training device)
    crop_padding: int = 4              # pad-and-random-crop padding in pixels; 0 disables
    flip: bool = True
    auto_augment: Literal["none", "cifar10", "svhn", "imagenet", "rand"] = "none"
    # whose ops the three policies run: 'reference' = the PIL port B, D and A import (utils/autoaug.py: bicubic
    # shear, fill 128, rotation without sign, ...; loaders/transforms/autoaugment_reference.py), what their recipes
    # set; 'torchvision' = torchvision.transforms.AutoAugment's (nearest, fill 0). RandAugment is torchvision's only
    auto_augment_impl: Literal["torchvision", "reference"] = "torchvision"
    mixup_alpha: float = 0.0           # Mixup Beta(alpha, alpha); 0 disables
    cutmix_alpha: float = 0.0          # CutMix Beta(alpha, alpha); 0 disables
    mix_prob: float = 0.5              # probability that a batch is mixed at all (one of the two, chosen 50/50)
    erasing_prob: float = 0.0          # random erasing probability per image, after normalization
    # erasing fill: 'reference' = the dataset mean as fractions of 255 written into the normalized image (what the
    # reference repos do), 'const' = 0.0 (the mean after normalization, timm mode='const'), 'pixel' = N(0, 1) noise
    erasing_fill: Literal["reference", "const", "pixel"] = "reference"
    # the augmentation after the keys as one CUDA graph per batch shape (loaders/transforms/captured.py): 'auto' on
    # CUDA (bit-equal to eager, a handful of launches per batch), 'off' eager, 'emulate' its static buffers eagerly
    capture_transform: Literal["auto", "off", "emulate"] = "auto"
    rand_augment_ops: int = 2          # auto_augment=rand: ops per image (torchvision RandAugment num_ops)
    rand_augment_magnitude: int = 9    # auto_augment=rand: magnitude bin 0..30 (torchvision, 31 bins)
    # DINO multi-crop views (METHODS.md B) into Batch.crops: 2 global at full size + `local_crops` at half size
    multicrop: bool = False
    local_crops: int = 8
    global_crop_scale: tuple = (0.7, 1.0)  # RandomResizedCrop area fractions; (0.5, 1.0) for Tiny-ImageNet
    local_crop_scale: tuple = (0.2, 0.5)   # (0.2, 0.4) for Tiny-ImageNet

    def checks(self) -> list[tuple[str, bool, str]]:
        """Value checks types cannot express: [(dotted key, ok, why)], raised by validate()."""
        return [
            ("data.image_size", self.image_size > 0, "must be > 0"),
            ("data.batch_size", self.batch_size > 0, "must be > 0"),
            ("data.eval_batch_size", self.eval_batch_size > 0, "must be > 0"),
            ("data.num_workers", self.num_workers >= 0, "must be >= 0"),
            ("data.repeats", self.repeats >= 1, "must be >= 1"),
            ("data.crop_padding", self.crop_padding >= 0, "must be >= 0"),
            ("data.resident_max_fraction", 0 < self.resident_max_fraction <= 1, "must be in (0, 1]"),
            ("data.mix_prob", 0 <= self.mix_prob <= 1, "must be in [0, 1]"),
            ("data.erasing_prob", 0 <= self.erasing_prob <= 1, "must be in [0, 1]"),
            ("data.auto_augment_impl", not (self.auto_augment == "rand" and self.auto_augment_impl == "reference"),
             "the references' port has no RandAugment: data.auto_augment=rand needs data.auto_augment_impl="
             "torchvision"),
            ("data.rand_augment_ops", self.rand_augment_ops >= 1, "must be >= 1"),
            ("data.rand_augment_magnitude", 0 <= self.rand_augment_magnitude <= 30, "must be in 0..30"),
            ("data.local_crops", self.local_crops >= 0, "must be >= 0"),
            ("data.global_crop_scale", len(self.global_crop_scale) == 2
              and 0 < self.global_crop_scale[0] <= self.global_crop_scale[1] <= 1, "must be (lo, hi) in (0, 1]"),
            ("data.local_crop_scale", len(self.local_crop_scale) == 2
              and 0 < self.local_crop_scale[0] <= self.local_crop_scale[1] <= 1, "must be (lo, hi) in (0, 1]"),
            ("data.val_fraction", 0 <= self.val_fraction < 1, "must be in [0, 1) (0 = no validation split)"),
        ]


@dataclass
class ModelConfig:
    name: str = "vit_cifar"            # a registered model name (see `smallvit train --list-models`)
    num_classes: int = 0               # 0 = take it from the training set's sidecar
    drop_path: float = 0.1
    spt: bool = False                  # Shifted Patch Tokenization (METHODS.md D)
    lsa: bool = False                  # Locality Self-Attention (METHODS.md D)
    # size overrides of the registered model (0 = the registered default); small models for tests and fixtures
    depth: int = 0                     # transformer blocks
    embed_dim: int = 0                 # token width C
    num_heads: int = 0                 # attention heads (must divide the width)
    pos_embed_init: Literal["learned", "sincos"] = "learned"  # learned = the references' init; sincos: see
                                                               # engine/models/pos_embed.py (the CPU demo uses it)
    # where the references' networks of one family differ (engine/models/options.py); 'reference' / 0 = what the
    # registered model's reference network uses (vit_*, swin_*, cait_*: B's; cait_d_*: D's)
    qkv_bias: Literal["reference", True, False] = "reference"   # bias on q, k, v (B: true; D: false)
    norm_eps: float = 0.0              # eps of every LayerNorm of the blocks and the head norm (B: 1e-6; D: 1e-5)
    drop_path_schedule: Literal["reference", "linear", "constant"] = "reference"  # per-block drop-path rates:
                                       # linear 0 -> drop_path (B's ViT/Swin), or drop_path in every block (D; CaiT)
    init: Literal["reference", "timm", "b", "d"] = "reference"  # timm's own init, B's code's, or D's code's
    lsa_reference_diagonal: Literal["reference", True, False] = "reference"  # CaiT + LSA only: true = D's CaiT
                                       # code, whose diagonal "mask" writes -1e-9 (no mask); false = masked (-inf)
                                       # as METHODS.md D states LSA (cait_d_*: true, cait_*: false)
    # fine-tune stage of the self-supervised method (METHODS.md B): backbone weights loaded by name before training
    # (engine.models.pretrained.load_finetune_weights: every key not loaded reported in out_dir/finetune_load.json)
    finetune_from: str = ""            # a pretraining run folder (its latest checkpoint), a checkpoint folder (its
                                       # model.safetensors), a .safetensors or a .pth/.pt file; '' = from scratch
    finetune_key: str = "teacher"      # .pth/.pt: entry of the checkpoint dict holding the state dict ('' = the
                                       # file itself), as DINO's checkpoints keep 'teacher' and 'student'
    finetune_strict: bool = True       # refuse to start when a backbone key (anything but the classifier) is
                                       # missing or mismatched; nothing loaded at all is refused either way

    def checks(self) -> list[tuple[str, bool, str]]:
        """Value checks types cannot express: [(dotted key, ok, why)], raised by validate()."""
        return [
            ("model.num_classes", self.num_classes >= 0, "must be >= 0"),
            ("model.drop_path", 0 <= self.drop_path < 1, "must be in [0, 1)"),
            ("model.depth", self.depth >= 0, "must be >= 0 (0 = the model's default)"),
            ("model.embed_dim", self.embed_dim >= 0, "must be >= 0 (0 = the model's default)"),
            ("model.num_heads", self.num_heads >= 0, "must be >= 0 (0 = the model's default)"),
            ("model.norm_eps", 0 <= self.norm_eps < 1, "must be in [0, 1) (0 = the model's reference)"),
        ]


# The `tasks` section: one sub-section per registered auxiliary task (engine/tasks/registry.py), each the task's
# own Config dataclass (tasks.<name>.* in that task's module). Its class, TasksConfig, is made from the
# registry when first needed and again whenever the registry changes; the task modules load then, not here.
_tasks_schema: Optional[tuple[int, type]] = None


def tasks_config_class() -> type:
    """TasksConfig: a dataclass with one field per registered task (the registry's order), typed and defaulted by
    that task's Config."""
    global _tasks_schema
    version = task_registry.version()
    if _tasks_schema is None or _tasks_schema[0] != version:
        fields = [(name, cls.Config, field(default_factory=cls.Config))
                  for name, cls in task_registry.registered().items()]
        made = dataclasses.make_dataclass("TasksConfig", fields)
        made.__module__ = __name__
        made.__doc__ = "The auxiliary tasks, one section each (engine/tasks/registry.py)."
        _tasks_schema = (version, made)
    return _tasks_schema[1]


def __getattr__(name: str) -> Any:
    if name == "TasksConfig":   # the registry's current schema, by its usual name
        return tasks_config_class()
    raise AttributeError(f"module 'engine.config' has no attribute {name!r}")


@dataclass
class OptimConfig:
    epochs: int = 100
    lr: float = 1e-3                   # peak learning rate (AdamW)
    min_lr: float = 1e-6               # cosine floor
    weight_decay: float = 0.05         # AdamW's decoupled decay, on the parameters optim.no_decay leaves decaying
    # which parameters are exempt from decay (engine/weight_decay.py): 'none' = all decay (B's finetune.py, D's and
    # A's main), 'dino' = biases and 1-D parameters exempt (DINO; C's code on a ViT), 'timm' = those and what the
    # model's no_weight_decay() names (pos_embed, cls_token, Swin's relative-position tables)
    no_decay: Literal["none", "dino", "timm"] = "timm"
    warmup_epochs: float = 10.0        # linear warm-up, per iteration
    betas: tuple = (0.9, 0.999)
    clip_grad: float = 0.0             # max global grad norm; 0 disables
    accumulation_steps: int = 1        # micro-batches per optimizer step: data.batch_size is split into this many
                                       # chunks, each run forward+backward, one optimizer step (engine/supervised_step.py)
    label_smoothing: float = 0.1

    def checks(self) -> list[tuple[str, bool, str]]:
        """Value checks types cannot express: [(dotted key, ok, why)], raised by validate()."""
        return [
            ("optim.epochs", self.epochs >= 1, "must be >= 1"),
            ("optim.lr", self.lr > 0, "must be > 0"),
            ("optim.min_lr", 0 <= self.min_lr <= self.lr, "must be in [0, optim.lr]"),
            ("optim.weight_decay", self.weight_decay >= 0, "must be >= 0"),
            ("optim.warmup_epochs", 0 <= self.warmup_epochs <= self.epochs, "must be in [0, optim.epochs]"),
            ("optim.clip_grad", self.clip_grad >= 0, "must be >= 0"),
            ("optim.accumulation_steps", self.accumulation_steps >= 1, "must be >= 1"),
            ("optim.label_smoothing", 0 <= self.label_smoothing < 1, "must be in [0, 1)"),
        ]


@dataclass
class EngineConfig:
    """How the step runs."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16"] = "bf16"   # bf16 needs a device that supports it; the CPU path uses fp32
    zero_stage: Literal[0, 1, 2] = 0
    deepspeed_config: str = ""         # a user's own DeepSpeed JSON, merged over the generated one (rules in
                                       # engine/deepspeed_json.py and the README); also `--deepspeed_config FILE`
    compile: bool = False              # torch.compile the model
    channels_last: bool = True
    kernels: Literal["auto", "triton", "torch"] = "auto"
    fail_on_nonfinite: bool = True     # stop at a NaN/inf loss (False: skip the step and count it)
    deterministic: bool = False
    # the training step on static buffers (engine/graphed_step.py): 'on' captures it as one CUDA graph and replays
    # it per batch, 'auto' does so where it can, 'emulate' runs the same static-buffer step eagerly (any device, no
    # capture); a config that cannot be captured falls back to the DeepSpeed step with a one-line reason in the log
    graph_step: Literal["off", "auto", "on", "emulate"] = "off"


@dataclass
class RunConfig:
    """Where a run writes and how often."""
    out_dir: str = "runs/default"
    seed: int = 0
    eval_every: int = 1                # epochs between evaluations on the test split
    checkpoint_every: int = 1          # epochs between checkpoints (a final one is always written)
    log_every: int = 10                # steps between metric lines
    resume: str = ""                   # 'auto' (latest in out_dir), a checkpoint folder, or '' for a fresh run
    progress: bool = True              # progress bars
    max_steps: int = 0                 # stop after this many optimizer steps (0 = run all epochs); for tests/bench
    checkpoint_every_steps: int = 0    # also checkpoint every this many optimizer steps, mid-epoch too (0 = off)
    keep_last: int = 2                 # step checkpoints kept, newest first (0 = all); checkpoints/best/ is extra

    def checks(self) -> list[tuple[str, bool, str]]:
        """Value checks types cannot express: [(dotted key, ok, why)], raised by validate()."""
        return [
            ("run.eval_every", self.eval_every >= 1, "must be >= 1"),
            ("run.checkpoint_every", self.checkpoint_every >= 1, "must be >= 1"),
            ("run.log_every", self.log_every >= 1, "must be >= 1"),
            ("run.max_steps", self.max_steps >= 0, "must be >= 0"),
            ("run.checkpoint_every_steps", self.checkpoint_every_steps >= 0, "must be >= 0"),
            ("run.keep_last", self.keep_last >= 0, "must be >= 0 (0 = keep every checkpoint)"),
        ]


@dataclass
class SSLConfig:
    """DINO-style self-supervised pretraining (METHODS.md B), read by `smallvit pretrain` only. The optimizer keys
    come from `optim` (the ssl recipes set lr 1e-4 per 256 images, weight_decay 0.04 as the start of its schedule,
    clip_grad 3.0, warmup_epochs 30, epochs 200); views from data.multicrop / local_crops / *_crop_scale."""
    out_dim: int = 1024                # prototypes K (the weight-normed last layer's outputs)
    hidden_dim: int = 512
    bottleneck_dim: int = 256
    norm_last_layer: bool = True       # fix the weight norm's g at 1 (DINO's default)
    student_temp: float = 0.1
    warmup_teacher_temp: float = 0.04  # teacher temperature, linear to teacher_temp over warmup_teacher_temp_epochs
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 10
    center_momentum: float = 0.9
    momentum_teacher: float = 0.996    # EMA momentum, cosine to 1 over the run
    weight_decay_end: float = 0.4      # weight decay, cosine from optim.weight_decay to this
    freeze_last_layer: int = 1         # epochs in which the head's last layer gets no update
    lr_per_256: bool = True            # optim.lr is per 256 images: peak lr = optim.lr * global batch / 256 (DINO)
    clip_mode: Literal["per_param", "global"] = "per_param"  # DINO clips each parameter's gradient norm to
                                                              # optim.clip_grad; 'global' clips the total norm
    pos_embed_resize: Literal["interpolate", "truncate"] = "interpolate"  # local crops' absolute pos-embed:
                                       # DINO's bicubic resize (spec), or B's CaiT quirk, the first g*g rows
    knn_k: int = 20                    # k-NN probe on the teacher's features at each evaluation (DINO's eval_knn)
    knn_temperature: float = 0.07


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: Any = field(default_factory=lambda: tasks_config_class()())   # TasksConfig (see tasks_config_class)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ssl: SSLConfig = field(default_factory=SSLConfig)


# ------------------------------------------------------------------------------------------------- loading
def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and return it in canonical form, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"   # YAML 1.1 reads a bare on/off as true/false
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        raise ConfigError(f"{key}: {value!r} is not {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            return tuple(float(v) for v in value)
        raise ConfigError(f"{key}: expected a list of numbers, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - schema bug


def _hints(cls: type) -> dict[str, Any]:
    """The field types of a schema dataclass; Config's `tasks` is the registry's current TasksConfig."""
    hints = typing.get_type_hints(cls)
    if cls is Config:
        hints["tasks"] = tasks_config_class()
    return hints


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"unknown key '{where}' (valid keys here: {', '.join(sorted(names))})")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            kwargs[f.name] = _coerce(data[f.name], hints[f.name], f"{prefix}.{f.name}" if prefix else f.name)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=3e-4' -> ('optim.lr', 0.0003); the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}': expected key=value, e.g. optim.lr=3e-4")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads '3e-4' as a string (no dot); accept it as a float.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in "eE.") and value.strip() else value
        except ValueError:
            pass
    return key, value


def config_from_dict(tree: dict | None, overrides: list[str] | tuple[str, ...] = (), source: str = "") -> Config:
    """The checked Config of a YAML tree (read from `source`, named in its errors) and dotted overrides, applied in
    order. An error names its cause: the file for a key of the file, `override KEY=VALUE` for a command-line one."""
    tree = dict(tree or {})
    where = f"{source}: " if source else ""
    try:
        _build(Config, tree, "")
    except ConfigError as exc:
        raise ConfigError(f"{where}{exc}") from None
    given: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
        try:
            _build(Config, tree, "")
        except ConfigError as exc:
            raise ConfigError(f"override {text}: {exc}") from None
        given[key] = text
    if given.keys() & {"data.train", "data.test"} and "data.dataset" not in given and isinstance(tree.get("data"), dict):
        tree["data"] = {**tree["data"], "dataset": ""}   # the recipe named the dataset of its paths, not of these
    cfg = _build(Config, tree, "")
    try:
        validate(cfg)
    except ConfigError as exc:
        key = str(exc).split(":", 1)[0]
        raise ConfigError(f"override {given[key]}: {exc}" if key in given else f"{where}{exc}") from None
    return cfg


def _merge(under: dict, over: dict) -> dict:
    """`over` on top of `under`, section by section (nested mappings merge; any other value replaces)."""
    out = dict(under)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            value = _merge(out[key], value)
        elif value is None and isinstance(out.get(key), dict):
            continue                                      # an empty section adds nothing
        out[key] = value
    return out


def _read_recipe(p: Path, chain: tuple[Path, ...] = ()) -> dict:
    """The YAML tree of recipe `p` over its `bases:` (paths relative to `p`, applied in order, each resolved the
    same way), with `p`'s own keys on top. Each file's keys are checked on their own, so an unknown or mistyped key
    names the file that wrote it; `bases` itself is not a schema key and does not survive the merge."""
    if not p.is_file():
        raise ConfigError(f"{chain[-1]}: base not found: {p}" if chain else f"config file not found: {p}")
    if p.resolve() in {c.resolve() for c in chain}:
        raise ConfigError(f"{chain[-1]}: bases form a cycle: {' -> '.join(map(str, (*chain, p)))}")
    try:
        own = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(own, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of sections")
    bases = own.pop("bases", [])
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{p}: bases: must be a list of file paths (relative to this file), got {bases!r}")
    try:
        _build(Config, own, "")
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    tree: dict = {}
    for base in bases:
        tree = _merge(tree, _read_recipe(p.parent / base, (*chain, p)))
    return _merge(tree, own)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML recipe (or none: all defaults) over its bases and apply dotted overrides; raise ConfigError naming
    the key and where it was set (the file, or the command-line override)."""
    tree = _read_recipe(Path(path)) if path else {}
    return config_from_dict(tree, overrides, str(path) if path else "")


def validate(cfg: Config) -> None:
    """Value checks that types alone cannot express: each section's own rows (its `checks()`, each task's
    `check`), then the few that read across sections."""
    checks = [*cfg.data.checks(), *cfg.model.checks()]
    for name, task in task_registry.registered().items():   # each task checks its own section
        checks += task.check(getattr(cfg.tasks, name), cfg)
    checks += [*cfg.optim.checks(), *cfg.run.checks()]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why} (got {_lookup(cfg, key)!r})")
    if cfg.model.embed_dim and cfg.model.num_heads and cfg.model.embed_dim % cfg.model.num_heads:
        raise ConfigError(f"model.embed_dim: {cfg.model.embed_dim} is not divisible by model.num_heads "
                          f"{cfg.model.num_heads}")
    if cfg.model.lsa_reference_diagonal != "reference" and not cfg.model.name.startswith("cait"):
        raise ConfigError(f"model.lsa_reference_diagonal: D's diagonal quirk exists in CaiT's patch attention only "
                          f"(model.name is {cfg.model.name})")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"optim.betas: expected two numbers, got {cfg.optim.betas!r}")


def _lookup(cfg: Config, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (what a run folder stores as config.yaml)."""
    out = dataclasses.asdict(cfg)
    out["optim"]["betas"] = list(out["optim"]["betas"])
    return out


def describe_options(cls: type = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """[(dotted key, type, default)] for every leaf: what `smallvit train --help` lists."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_options(tp, key))
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            rows.append((key, _type_name(tp), repr(default)))
    return rows
