"""Self-supervised DINO pretraining on the training set itself (METHODS.md B), under DeepSpeed.

    smallvit pretrain --config configs/ssl_cifar10_vit.yaml [key=value ...]                 # one process
    deepspeed engine/pretrain.py --config configs/ssl_cifar10_vit.yaml [key=value ...]      # any number of ranks
    smallvit train --config configs/cifar10_vit_finetune.yaml      # then fine-tune: model.finetune_from = this run

Per step: the loader's multi-crop views (2 global + local crops, cut on the device) -> the EMA teacher sees the 2
global views, the student all of them (one backbone pass per resolution) -> DINO loss -> backward, DINO's
per-parameter gradient clipping, the head's last layer frozen in the first epoch(s) -> optimizer step -> teacher EMA
and centre update. LR, weight decay and EMA momentum follow DINO's per-step cosine schedules, the teacher
temperature its per-epoch warm-up; all are functions of the step, so a resumed run continues exactly.

Precision: DeepSpeed runs the student in fp32 (master weights) and the forward runs under bf16 autocast when
engine.precision=bf16, as DINO's AMP does; the teacher stays fp32 so its EMA of 0.996..1 does not round away.
Each evaluation runs a weighted k-NN probe on the teacher's features (train split -> test split). Every checkpoint
exports the teacher backbone (no DINO head) as model.safetensors: what `model.finetune_from` loads.
"""
from __future__ import annotations

import contextlib
import logging
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script (`deepspeed engine/pretrain.py`): import the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.distributed as dist
from torch import nn

from engine import run_folder
from engine.config import Config, ConfigError
from engine.grad_check import GradientCheck
from engine.loop import (Position, Run, StopFlag, close_run, launcher_main, log_line, mean_over_ranks,
                         open_run_folder, position_state, report_nonfinite, resume, run_epochs,
                         run_reporting_errors, summary_entries)
from engine.models import create_model
from engine.models.options import model_kwargs
from engine.models.pos_embed import init_pos_embed
from engine.precision import compute_dtype as precision_dtype
from engine.runtime import Runtime, deepspeed_config, deterministic_algorithms, init_runtime, step_seed
from engine.ssl.backbone import MultiCropBackbone, pooled_features
from engine.ssl.head import DINOHead
from engine.ssl.knn import extract_features, knn_accuracy
from engine.ssl.loss import DINOLoss, collapse_stats, collapse_warning
from engine.ssl.schedules import cosine_at
from engine.ssl.step import DINOStep
from engine.tasks.registry import enabled as enabled_tasks
from engine.weight_decay import param_groups
from loaders.factory import build_loader, preflight

log = logging.getLogger("smallvit")

STAGE = "pretrain"   # recorded in trainer_state.pt, so a supervised run cannot resume a pretraining checkpoint


class DINONetwork(nn.Module):
    """Backbone (run once per crop resolution) + DINO head: list of (B, 3, h_i, w_i) crops -> (sum B, K) logits."""

    def __init__(self, model: nn.Module, head: DINOHead, pos_embed_resize: str = "interpolate"):
        super().__init__()
        self.backbone = MultiCropBackbone(model, pos_embed_resize)
        self.head = head

    @property
    def model(self) -> nn.Module:
        """The plain registered model inside (what fine-tuning loads)."""
        return self.backbone.backbone

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        return self.head(self.backbone(crops))


def build_network(cfg: Config, drop_path: float) -> DINONetwork:
    model = create_model(cfg.model.name, num_classes=0, **model_kwargs(cfg.model, drop_path=drop_path))
    init_pos_embed(model, cfg.model.pos_embed_init)
    head = DINOHead(MultiCropBackbone(model).embed_dim, cfg.ssl.out_dim, cfg.ssl.hidden_dim, cfg.ssl.bottleneck_dim,
                    cfg.ssl.norm_last_layer)
    return DINONetwork(model, head, cfg.ssl.pos_embed_resize)


def check_config(cfg: Config, world_size: int) -> None:
    """What pretraining needs beyond the schema's checks; each error names the key."""
    if not cfg.data.multicrop:
        raise ConfigError("data.multicrop: pretraining needs the multi-crop views (set data.multicrop: true)")
    if cfg.data.mixup_alpha > 0 or cfg.data.cutmix_alpha > 0:
        raise ConfigError("data.mixup_alpha/cutmix_alpha: mixing labels means nothing to self-supervised pretraining")
    if cfg.engine.zero_stage != 0:
        raise ConfigError(f"engine.zero_stage: pretraining runs with 0 (got {cfg.engine.zero_stage}): DINO's "
                          f"per-parameter clipping and last-layer freeze act on whole gradients, and these small "
                          f"models need no ZeRO sharding")
    if cfg.engine.deepspeed_config:
        raise ConfigError("engine.deepspeed_config: pretraining generates its own DeepSpeed config (fp32 master "
                          "weights, clipping done by the loop)")
    on = [name for name, _ in enabled_tasks(cfg)]
    if on:
        raise ConfigError(f"tasks.*: auxiliary tasks belong to the supervised (fine-tune) stage, not to pretraining "
                          f"(enabled: {', '.join(f'tasks.{name}' for name in on)})")


@torch.no_grad()
def knn_probe(model: nn.Module, cfg: Config, rt: Runtime, dtype: torch.dtype) -> float:
    """k-NN top-1 (%) of `model`'s pooled features: the training split (evaluation transform) as the bank, the
    test split as queries. Runs on this rank alone over the whole sets."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast(rt.device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    bank_loader, meta = build_loader(replace(cfg.data, test=cfg.data.train), False, cfg.run.seed, rt.device, 0, 1)
    query_loader, _ = build_loader(cfg.data, False, cfg.run.seed, rt.device, 0, 1)

    def features(x: torch.Tensor) -> torch.Tensor:
        with autocast:
            return pooled_features(model, x)

    bank, bank_labels = extract_features(features, bank_loader)
    query, query_labels = extract_features(features, query_loader)
    model.train(was_training)
    return knn_accuracy(bank, bank_labels, query, query_labels, meta["num_classes"], cfg.ssl.knn_k,
                        cfg.ssl.knn_temperature)


def pretrain(cfg: Config) -> dict:
    """Run the configured pretraining; return the summary (also written to out_dir/summary.json)."""
    with deterministic_algorithms(cfg.engine.deterministic):
        return _pretrain(cfg)


@dataclass
class Setup:
    """What build() makes for a pretraining run: the loader, student (in DeepSpeed) and teacher, loss and step."""
    cfg: Config
    rt: Runtime
    compute_dtype: torch.dtype
    train_loader: Any
    meta: dict
    resolved: Config
    hub_config: dict
    teacher: DINONetwork
    dino_loss: DINOLoss
    engine: Any
    optimizer: torch.optim.Optimizer
    dino_step: DINOStep
    steps_per_epoch: int


def build(cfg: Config) -> Setup:
    """Checks, runtime, loader, student, teacher, loss, DeepSpeed engine and step, in that order."""
    run_folder.check_out_dir(cfg)
    run_folder.check_fresh(cfg)
    preflight(cfg.data)
    rt = init_runtime(cfg.engine.device)
    check_config(cfg, rt.world_size)
    compute_dtype = precision_dtype(cfg.engine.precision, rt.device)
    channels_last = cfg.engine.channels_last and rt.device.type == "cuda"

    train_loader, meta = build_loader(cfg.data, True, cfg.run.seed, rt.device, rt.rank, rt.world_size,
                                      torch.float32, channels_last)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {meta['num_images']} "
                          f"training images (drop_last leaves no step)")

    # ---- student (trained by DeepSpeed), teacher (EMA, fp32, no drop-path), loss with its centre
    torch.manual_seed(cfg.run.seed)
    student = build_network(cfg, cfg.model.drop_path)
    teacher = build_network(cfg, 0.0)
    teacher.load_state_dict(student.state_dict())
    precision_used = "bf16" if compute_dtype == torch.bfloat16 else "fp32"
    resolved = run_folder.resolved_config(cfg, meta, 0, student.model, precision_used)
    hub_config = run_folder.hub_config(resolved, meta, model_kwargs(resolved.model, drop_path=0.0))
    teacher.requires_grad_(False)
    teacher.to(rt.device)
    dino_loss = DINOLoss(cfg.ssl.out_dim, 2, cfg.ssl.student_temp, cfg.ssl.warmup_teacher_temp,
                         cfg.ssl.teacher_temp, cfg.ssl.warmup_teacher_temp_epochs,
                         cfg.ssl.center_momentum).to(rt.device)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    import deepspeed

    groups = param_groups(student, cfg.optim.weight_decay, cfg.optim.no_decay)   # the schedule drives group 0
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=rt.device.type == "cuda")
    ds_config = deepspeed_config(cfg, rt.world_size, False)
    ds_config["gradient_clipping"] = cfg.optim.clip_grad if cfg.ssl.clip_mode == "global" else 0.0
    engine, _, _, _ = deepspeed.initialize(model=student, optimizer=optimizer, config=ds_config)
    last_layer = student.head.last_layer_parameters()
    grad_check = GradientCheck(student)
    clip = cfg.optim.clip_grad if cfg.ssl.clip_mode == "per_param" else 0.0
    dino_step = DINOStep(engine, optimizer, teacher, dino_loss, last_layer, rt.device, compute_dtype,
                         fail_on_nonfinite=cfg.engine.fail_on_nonfinite, clip_per_param=clip, grad_check=grad_check)
    if dino_step.device_skip:
        grad_check.remove()   # the flag is decided on the device
    return Setup(cfg, rt, compute_dtype, train_loader, meta, resolved, hub_config, teacher, dino_loss, engine,
                 optimizer, dino_step, steps_per_epoch)


class PretrainLoop:
    """The pretraining run's hooks for engine.loop.run_epochs: DINO's scheduled step, its log point (loss and
    collapse statistics), the k-NN probe at evaluations, the checkpoint state (teacher and centre included)."""

    def __init__(self, setup: Setup, best_knn: float, run_log):
        self.s, self.cfg, self.rt, self.best_knn, self.run_log = setup, setup.cfg, setup.rt, best_knn, run_log
        cfg = setup.cfg
        self.total_steps = cfg.optim.epochs * setup.steps_per_epoch
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * setup.steps_per_epoch))
        self.peak_lr = cfg.optim.lr * (cfg.data.batch_size / 256.0 if cfg.ssl.lr_per_256 else 1.0)
        self.warned_epoch = -1
        self.last_knn = None
        self.loss_value = float("nan")   # the progress bar's: the last log point's
        self.lr = self.wd = self.momentum = 0.0

    def step(self, batch, pos: Position) -> float:
        cfg, s, step = self.cfg, self.s, pos.global_step
        self.lr = cosine_at(step, self.total_steps, self.peak_lr, cfg.optim.min_lr, self.warmup_steps)
        self.wd = cosine_at(step, self.total_steps, cfg.optim.weight_decay, cfg.ssl.weight_decay_end)
        self.momentum = cosine_at(step, self.total_steps, cfg.ssl.momentum_teacher, 1.0)
        for i, group in enumerate(s.optimizer.param_groups):
            group["lr"] = self.lr
            if i == 0:
                group["weight_decay"] = self.wd
        torch.manual_seed(step_seed(cfg.run.seed, step, self.rt.rank))
        applied = s.dino_step.step(batch.crops, pos.epoch, self.momentum, pos.epoch < cfg.ssl.freeze_last_layer,
                                   step, lambda what, value: report_nonfinite(cfg, self.rt, self.run_log, what, value,
                                                                              step, pos.epoch, pos.step_in_epoch))
        pos.nonfinite_skipped += 0 if applied else 1
        return self.lr

    def read_nonfinite(self, pos: Position) -> None:
        """Device skip: report the first non-finite step since the last read (which stops the run)."""
        if self.s.dino_step.device_skip:
            bad, first, what = self.s.dino_step.read_nonfinite()
            if bad:
                report_nonfinite(self.cfg, self.rt, self.run_log, what, "nan/inf", first, pos.epoch,
                                 pos.step_in_epoch - (pos.global_step - first))

    def log_point(self, pos: Position) -> None:
        cfg, s, epoch = self.cfg, self.s, pos.epoch
        self.read_nonfinite(pos)
        probs = s.dino_loss.teacher_probs(s.dino_step.teacher_out, epoch)
        logged = mean_over_ranks({"loss": s.dino_step.loss.detach(), **collapse_stats(probs, s.dino_loss.center)})
        logged.update(lr=self.lr, weight_decay=self.wd, momentum=self.momentum,
                      teacher_temp=s.dino_loss.teacher_temperature(epoch))
        warning = collapse_warning(logged) if epoch >= cfg.ssl.warmup_teacher_temp_epochs else ""
        if warning and self.warned_epoch != epoch and self.rt.is_main:
            log.warning("epoch %d step %d: %s", epoch, pos.global_step, warning)
            self.warned_epoch = epoch
        self.loss_value = logged["loss"]
        if self.run_log:
            self.run_log.write({"kind": "train", "step": pos.global_step, "epoch": epoch, **logged,
                                "collapse": bool(warning), "nonfinite_skipped": pos.nonfinite_skipped})

    def evaluate(self, pos: Position, progress) -> bool:
        """The k-NN probe on the main rank (the others wait); never a new best for best/."""
        cfg, rt = self.cfg, self.rt
        if rt.is_main:
            self.last_knn = knn_probe(self.s.teacher.model, cfg, rt, self.s.compute_dtype)
            self.best_knn = max(self.best_knn, self.last_knn)
            if self.run_log:
                self.run_log.write({"kind": "eval", "step": pos.global_step, "epoch": pos.epoch + 1,
                                    "knn_top1": self.last_knn, "best_knn": self.best_knn})
            log_line(progress, rt, f"epoch {pos.epoch + 1}/{cfg.optim.epochs}: k-NN top-1 "
                                   f"{self.last_knn:.2f}% (best {self.best_knn:.2f}%)")
        if dist.is_initialized():
            dist.barrier()
        return False

    def state(self, pos: Position) -> dict:
        cfg, s = self.cfg, self.s
        return {"stage": STAGE, **position_state(pos, cfg, self.rt), "best_knn": self.best_knn,
                "model": cfg.model.name, "teacher": {k: v.detach().cpu() for k, v in s.teacher.state_dict().items()},
                "center": s.dino_loss.center.detach().cpu(), **run_folder.state_entries(s.resolved)}


def _pretrain(cfg: Config) -> dict:
    s = build(cfg)
    rt, out_dir = s.rt, Path(cfg.run.out_dir)

    def check(saved: dict, folder: Path) -> None:
        if saved.get("stage") != STAGE or saved["model"] != cfg.model.name:
            raise ConfigError(f"run.resume: {folder} is a {saved.get('stage', 'supervised')} checkpoint of "
                              f"{saved['model']}, not a pretraining checkpoint of {cfg.model.name}")

    pos, state, _ = resume(cfg, rt, s.engine, out_dir, s.resolved, s.steps_per_epoch, check)
    if state is not None:
        s.teacher.load_state_dict(state["teacher"])
        s.dino_loss.center.copy_(state["center"])
    run_log = open_run_folder(s.resolved, rt, out_dir)
    hooks = PretrainLoop(s, state["best_knn"] if state else 0.0, run_log)
    run = Run(cfg, rt, s.engine, out_dir, s.train_loader, cfg.optim.epochs,
              cfg.run.max_steps or cfg.optim.epochs * s.steps_per_epoch, StopFlag(), hooks.step, hooks.log_point,
              hooks.evaluate, hooks.read_nonfinite, hooks.state, lambda: hooks.loss_value,
              {"export": s.teacher.model, "hub_config": s.hub_config, "keep_last": cfg.run.keep_last},
              mid_epoch_checkpoints=False)
    exit_code, elapsed, seen = run_epochs(run, pos)
    summary = {"stage": STAGE, **summary_entries(pos, exit_code, elapsed, seen), "knn_top1": hooks.last_knn,
               "best_knn": hooks.best_knn}
    close_run(rt, out_dir, run_log, summary)
    return summary


def run_pretraining(cfg: Config) -> int:
    """Pretrain and turn the known failures into one line and an exit code."""
    code, summary = run_reporting_errors(pretrain, cfg)
    if code == 0 and summary["knn_top1"] is not None:
        print(f"final k-NN top-1 {summary['knn_top1']:.2f}% (best {summary['best_knn']:.2f}%), "
              f"{summary['images_per_second']:.0f} img/s, {summary['seconds']:.0f} s; fine-tune with "
              f"model.finetune_from={cfg.run.out_dir}")
    return code


def main(argv: list[str] | None = None) -> int:
    """`deepspeed engine/pretrain.py --config FILE [key=value ...]` (DeepSpeed adds --local_rank)."""
    return launcher_main(argv, "smallvit self-supervised (DINO) pretraining under DeepSpeed", run_pretraining)


if __name__ == "__main__":
    sys.exit(main())
