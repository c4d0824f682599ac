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
import time
from dataclasses import replace
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`deepspeed engine/pretrain.py`): import the package
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.distributed as dist
from torch import nn

from engine import checkpoint, run_folder
from engine.config import Config, ConfigError
from engine.grad_check import GradientCheck
from engine.loop import (EXIT_INTERRUPTED, close_run, launcher_main, log_line, open_run_folder, progress_bar,
                         report_nonfinite, restore_checkpoint, run_reporting_errors)
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
from engine.ssl.updates import clip_per_parameter, ema_update  # noqa: F401  (re-exported)
from engine.train import StopFlag, mean_over_ranks
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
    if cfg.tasks.drloc.enabled or cfg.tasks.perceptibility.enabled:
        raise ConfigError("tasks.*: auxiliary tasks belong to the supervised (fine-tune) stage, not to pretraining")


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


def _pretrain(cfg: Config) -> dict:
    run_folder.check_out_dir(cfg)
    run_folder.check_fresh(cfg)
    preflight(cfg.data)
    rt = init_runtime(cfg.engine.device)
    check_config(cfg, rt.world_size)
    out_dir = Path(cfg.run.out_dir)
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

    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    peak_lr = cfg.optim.lr * (cfg.data.batch_size / 256.0 if cfg.ssl.lr_per_256 else 1.0)

    # ---- resume
    epoch, step_in_epoch, global_step, best_knn, nonfinite_skipped = 0, 0, 0, 0.0, 0
    if rt.is_main:
        checkpoint.remove_stale(out_dir)
    folder = checkpoint.resolve(out_dir, cfg.run.resume, announce=rt.is_main)
    if folder is not None:
        saved = checkpoint.read_state(folder)
        if saved.get("stage") != STAGE or saved["model"] != cfg.model.name:
            raise ConfigError(f"run.resume: {folder} is a {saved.get('stage', 'supervised')} checkpoint of "
                              f"{saved['model']}, not a pretraining checkpoint of {cfg.model.name}")
        run_folder.check_resume(saved, resolved, folder)   # before DeepSpeed reads a byte of it
        state, epoch, step_in_epoch = restore_checkpoint(engine, folder, saved, cfg, rt, steps_per_epoch)
        teacher.load_state_dict(state["teacher"])
        dino_loss.center.copy_(state["center"])
        global_step, best_knn = state["global_step"], state["best_knn"]
        nonfinite_skipped = state.get("nonfinite_skipped", 0)

    run_log = open_run_folder(resolved, rt, out_dir)

    def read_nonfinite() -> None:
        """Device skip: report the first non-finite step since the last read (which stops the run)."""
        if dino_step.device_skip:
            bad, first, what = dino_step.read_nonfinite()
            if bad:
                report_nonfinite(cfg, rt, run_log, what, "nan/inf", first, epoch,
                                 step_in_epoch - (global_step - first))

    def save_state() -> Path:
        read_nonfinite()   # nothing non-finite is ever saved
        return checkpoint.save(engine, out_dir, global_step, {
            "stage": STAGE, "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
            "best_knn": best_knn, "model": cfg.model.name, "world_size": rt.world_size,
            "global_batch": cfg.data.batch_size, "zero_stage": cfg.engine.zero_stage,
            "nonfinite_skipped": nonfinite_skipped,
            "teacher": {k: v.detach().cpu() for k, v in teacher.state_dict().items()},
            "center": dino_loss.center.detach().cpu(), **run_folder.state_entries(resolved)}, rt.is_main,
            export=teacher.model, hub_config=hub_config, keep_last=cfg.run.keep_last)

    def nonfinite(what: str, value) -> None:
        report_nonfinite(cfg, rt, run_log, what, value, global_step, epoch, step_in_epoch)

    stop = StopFlag()
    max_steps = cfg.run.max_steps or cfg.optim.epochs * steps_per_epoch
    progress = progress_bar(cfg, rt, max_steps, global_step)
    warned_epoch = -1
    last_knn = None
    loss_value = float("nan")   # the progress bar's: the last log point's
    stop.install()
    try:
        t_start, seen, exit_code = time.perf_counter(), 0, 0
        engine.train()
        while epoch < cfg.optim.epochs and global_step < max_steps and exit_code == 0:
            for batch in train_loader.epoch(epoch, step_in_epoch):
                lr = cosine_at(global_step, total_steps, peak_lr, cfg.optim.min_lr, warmup_steps)
                wd = cosine_at(global_step, total_steps, cfg.optim.weight_decay, cfg.ssl.weight_decay_end)
                momentum = cosine_at(global_step, total_steps, cfg.ssl.momentum_teacher, 1.0)
                for i, group in enumerate(optimizer.param_groups):
                    group["lr"] = lr
                    if i == 0:
                        group["weight_decay"] = wd
                torch.manual_seed(step_seed(cfg.run.seed, global_step, rt.rank))
                applied = dino_step.step(batch.crops, epoch, momentum, epoch < cfg.ssl.freeze_last_layer,
                                         global_step, nonfinite)
                nonfinite_skipped += 0 if applied else 1
                global_step += 1
                step_in_epoch += 1
                seen += len(batch) * rt.world_size
                if global_step % cfg.run.log_every == 0 or step_in_epoch == steps_per_epoch:
                    read_nonfinite()
                    teacher_out, loss = dino_step.teacher_out, dino_step.loss
                    probs = dino_loss.teacher_probs(teacher_out, epoch)
                    logged = mean_over_ranks({"loss": loss.detach(), **collapse_stats(probs, dino_loss.center)})
                    logged.update(lr=lr, weight_decay=wd, momentum=momentum,
                                  teacher_temp=dino_loss.teacher_temperature(epoch))
                    warning = collapse_warning(logged) if epoch >= cfg.ssl.warmup_teacher_temp_epochs else ""
                    if warning and warned_epoch != epoch and rt.is_main:
                        log.warning("epoch %d step %d: %s", epoch, global_step, warning)
                        warned_epoch = epoch
                    loss_value = logged["loss"]
                    if run_log:
                        run_log.write({"kind": "train", "step": global_step, "epoch": epoch, **logged,
                                       "collapse": bool(warning), "nonfinite_skipped": nonfinite_skipped})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(epoch=epoch, loss=f"{loss_value:.3f}", lr=f"{lr:.2e}",
                                         img_s=f"{seen / (time.perf_counter() - t_start):.0f}")
                if stop.signal is not None or (global_step >= max_steps and step_in_epoch < steps_per_epoch):
                    break
            else:
                if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
                    if rt.is_main:
                        last_knn = knn_probe(teacher.model, cfg, rt, compute_dtype)
                        best_knn = max(best_knn, last_knn)
                        if run_log:
                            run_log.write({"kind": "eval", "step": global_step, "epoch": epoch + 1,
                                           "knn_top1": last_knn, "best_knn": best_knn})
                        log_line(progress, rt, f"epoch {epoch + 1}/{cfg.optim.epochs}: k-NN top-1 "
                                               f"{last_knn:.2f}% (best {best_knn:.2f}%)")
                    if dist.is_initialized():
                        dist.barrier()
                epoch, step_in_epoch = epoch + 1, 0
                if epoch % cfg.run.checkpoint_every == 0 or epoch == cfg.optim.epochs:
                    save_state()
                continue
            save_state()   # left the epoch early (a signal or run.max_steps)
            if stop.signal is not None:
                exit_code = EXIT_INTERRUPTED
                if rt.is_main:
                    log.warning("signal %d: checkpoint written at global step %d; resume with run.resume=auto",
                                stop.signal, global_step)
            break
    finally:
        stop.restore()
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - t_start
    summary = {"stage": STAGE, "epochs_done": epoch, "global_step": global_step, "knn_top1": last_knn,
               "best_knn": best_knn, "seconds": round(elapsed, 2),
               "images_per_second": round(seen / max(elapsed, 1e-9), 1), "exit_code": exit_code,
               "nonfinite_skipped": nonfinite_skipped}
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
