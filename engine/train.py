"""Supervised training under DeepSpeed: build(), the step and the hooks that engine/loop.py's skeleton runs.

    deepspeed engine/train.py --config configs/cifar10_vit_scratch.yaml [key=value ...]   # any number of ranks
    smallvit train --config ... [key=value ...]                                           # one process, no launcher

Per step: batch from the loader (already augmented on the device) -> one forward over the images and every view the
auxiliary tasks ask for -> class loss + sum of the tasks' weighted losses -> DeepSpeed backward/step. Every random
draw inside a step is seeded from (seed, global step, rank), and the loader order from (seed, epoch), so a resumed
run continues exactly where the interrupted one was. With engine.graph_step the step runs on static buffers instead,
captured as one CUDA graph or emulated eagerly (engine/graphed_step.py), and its losses are read every log_every steps.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as a script (`deepspeed engine/train.py`): import the package, not engine/*.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from torch import nn

from engine import run_folder
from engine.config import Config, ConfigError
from engine.deepspeed_json import resolve_into_config
from engine.evaluate import evaluate
from engine.graphed_step import StaticStepRunner, engine_fallback_reason, log_fallback, plan_graph_step
from engine.loop import (Position, Run, StopFlag, close_run, launcher_main, log_line, open_run_folder,
                         position_state, report_nonfinite, resume, run_epochs, run_reporting_errors,
                         summary_entries)
from engine.models import create_model
from engine.models.options import model_kwargs
from engine.models.pos_embed import init_pos_embed
from engine.models.pretrained import load_finetune_weights
from engine.precision import compute_dtype
from engine.runtime import Runtime, deepspeed_config, deterministic_algorithms, init_runtime, step_seed
from engine.schedule import lr_at
from engine.supervised_step import SupervisedStep
from engine.train_module import TrainModule
from engine.tasks import batch_transforms, build_tasks, effective_epochs
from engine.tasks.ramps import current_weights, ramp_warnings
from engine.weight_decay import param_groups
from loaders.batch import Batch
from loaders.factory import build_loader, preflight
from loaders.holdout import holdout_for

log = logging.getLogger("smallvit")



def model_size_overrides(model_cfg) -> dict[str, int]:
    """model.depth / embed_dim / num_heads that are set (non-zero), as create_model keyword overrides."""
    return {k: getattr(model_cfg, k) for k in ("depth", "embed_dim", "num_heads") if getattr(model_cfg, k)}


def train(cfg: Config) -> dict:
    """Run the configured training; return the final summary (also written to out_dir/summary.json)."""
    with deterministic_algorithms(cfg.engine.deterministic):
        return _train(cfg)


@dataclass
class Setup:
    """What build() makes for a supervised run: the loaders, the model in its DeepSpeed engine and its step."""
    cfg: Config
    rt: Runtime
    dtype: torch.dtype
    train_loader: Any
    val_loader: Any
    test_loader: Any
    holdout: Any
    meta: dict
    num_classes: int
    resolved: Config
    hub_config: dict
    module: TrainModule
    engine: Any
    optimizer: torch.optim.Optimizer
    stepper: SupervisedStep
    forward_model: nn.Module
    graph_plan: Any
    steps_per_epoch: int


def build(cfg: Config) -> Setup:
    """Checks, runtime, loaders, model, tasks, DeepSpeed engine and default step, in that order (bad input fails
    before any process group, folder or file is made)."""
    run_folder.check_out_dir(cfg)   # a file at run.out_dir, a run already there: refused before any work
    run_folder.check_fresh(cfg)
    preflight(cfg.data)          # bad files fail here, before any process group, folder or file is made
    rt = init_runtime(cfg.engine.device)
    out_dir = Path(cfg.run.out_dir)
    dtype = compute_dtype(cfg.engine.precision, rt.device)   # one scheme on both step paths: engine/precision.py
    bf16 = dtype == torch.bfloat16
    if cfg.engine.precision == "bf16" and not bf16 and rt.is_main:
        log.info("engine.precision=bf16 needs a CUDA device with bf16; running fp32 on %s", rt.device)
    channels_last = cfg.engine.channels_last and rt.device.type == "cuda"

    # ---- data
    holdout = holdout_for(cfg.data.train, cfg.data.val_fraction, cfg.run.seed)   # None unless data.val_fraction
    train_loader, meta = build_loader(cfg.data, True, cfg.run.seed, rt.device, rt.rank, rt.world_size,
                                      torch.float32, channels_last, label_smoothing=cfg.optim.label_smoothing,
                                      batch_transforms=batch_transforms(cfg), subset=holdout and holdout.train)
    val_loader = holdout and build_loader(cfg.data, False, cfg.run.seed, rt.device, rt.rank, rt.world_size,
                                          torch.float32, channels_last, subset=holdout.val, path=cfg.data.train)[0]
    test_loader, _ = build_loader(cfg.data, False, cfg.run.seed, rt.device, rt.rank, rt.world_size,
                                  torch.float32, channels_last)
    num_classes = cfg.model.num_classes or meta["num_classes"]
    if num_classes != meta["num_classes"]:
        raise ConfigError(f"model.num_classes: {num_classes} but {cfg.data.train} has {meta['num_classes']} classes")

    # ---- model, tasks, DeepSpeed
    torch.manual_seed(cfg.run.seed)
    sizes = model_size_overrides(cfg.model)
    try:
        model = create_model(cfg.model.name, num_classes=num_classes, **model_kwargs(cfg.model))
    except TypeError as exc:
        raise ConfigError(f"model.{'/'.join(sizes)}: {cfg.model.name} does not take these sizes ({exc})") from None
    except ValueError as exc:   # an option the model does not define (e.g. model.init=d on swin)
        raise ConfigError(str(exc)) from None
    init_pos_embed(model, cfg.model.pos_embed_init)
    resolved = run_folder.resolved_config(cfg, meta, num_classes, model, "bf16" if bf16 else "fp32")
    hub_config = run_folder.hub_config(resolved, meta, model_kwargs(resolved.model, drop_path=0.0))
    tasks = build_tasks(cfg, model.embed_dim, model.grid_size)
    if cfg.model.finetune_from:   # by name, into the model and the task heads; report in out_dir/finetune_load.json
        load_finetune_weights(model, cfg.model, out_dir, rt.is_main, tasks=tasks)
    module = TrainModule(model, tasks, cfg.optim.label_smoothing)
    if channels_last:
        module = module.to(memory_format=torch.channels_last)
    import deepspeed

    groups = param_groups(module, cfg.optim.weight_decay, cfg.optim.no_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, fused=rt.device.type == "cuda")
    graph_plan = plan_graph_step(cfg, rt.world_size, rt.device, meta["num_images"])
    if graph_plan.reason:
        log_fallback(graph_plan.reason, rt.is_main)
    # both step paths keep fp32 weights in the torch AdamW and compute in bf16 under torch.autocast; DeepSpeed's
    # bf16 mode (module in bf16, bf16 gradient reduction, its own optimizer wrapper) is never used
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer,
                                           config=deepspeed_config(cfg, rt.world_size))
    if hasattr(engine.optimizer, "averaged_gradients"):   # ZeRO 1/2: never let DeepSpeed apply a non-finite step
        engine.optimizer.check_grad_overflow = True
    stepper = SupervisedStep(engine, optimizer, rt.device, dtype, fail_on_nonfinite=cfg.engine.fail_on_nonfinite,
                             zero_stage=cfg.engine.zero_stage, clip=cfg.optim.clip_grad,
                             accumulation_steps=cfg.optim.accumulation_steps, world_size=rt.world_size)
    forward_model = module.model
    if cfg.engine.compile:   # the training forward (tokens for the tasks) and the eval forward, sharing weights
        model.forward_with_tokens = torch.compile(model.forward_with_tokens)
        forward_model = torch.compile(model)

    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} is larger than the {meta['num_images']} "
                          f"training images (drop_last leaves no step)")
    return Setup(cfg, rt, dtype, train_loader, val_loader, test_loader, holdout, meta, num_classes, resolved,
                 hub_config, module, engine, optimizer, stepper, forward_model, graph_plan, steps_per_epoch)


class SupervisedLoop:
    """The supervised run's hooks for engine.loop.run_epochs: its step (static runner or default step), its window
    read at log points and before checkpoints, its test (and validation) evaluation, its checkpoint state."""

    def __init__(self, setup: Setup, runner: Optional[StaticStepRunner], selection: run_folder.Selection,
                 best_top1: float, run_log, global_step: int):
        self.s, self.runner, self.selection, self.best_top1, self.run_log = setup, runner, selection, best_top1, run_log
        cfg = self.cfg = setup.cfg
        self.rt = setup.rt
        self.total_steps = cfg.optim.epochs * setup.steps_per_epoch   # the LR horizon; the loop may stop earlier
        self.warmup_steps = int(round(cfg.optim.warmup_epochs * setup.steps_per_epoch))
        self.lr = lr_at(global_step, self.total_steps, self.warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
        self.last_eval: dict = {}
        self.shown = float("nan")   # the progress bar's loss: the last step's, or the last read window's mean

    def step(self, batch: Batch, pos: Position) -> float:
        cfg, s = self.cfg, self.s
        self.lr = lr = lr_at(pos.global_step, self.total_steps, self.warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
        seed = step_seed(cfg.run.seed, pos.global_step, self.rt.rank)
        epoch = pos.epoch + pos.step_in_epoch / s.steps_per_epoch
        if self.runner is not None:   # static buffers, LR and non-finite check on the device: no host sync
            self.runner.step(batch, lr, seed, epoch, pos.global_step)
        else:   # losses and the finite flag into device accumulators (engine/supervised_step.py)
            torch.manual_seed(seed)
            if not s.stepper.step(batch, lr, seed, epoch, pos.global_step,
                                  lambda what, value: self.nonfinite(pos, what, value)):
                pos.nonfinite_skipped += 1   # skipped: parameters and optimizer state unchanged
        return lr

    def nonfinite(self, pos: Position, what: str, value) -> None:
        report_nonfinite(self.cfg, self.rt, self.run_log, what, value, pos.global_step, pos.epoch, pos.step_in_epoch)

    def read_window(self, pos: Position) -> None:
        """The step's device accumulators -> a train record of the window's mean loss and parts, and the non-finite
        report of its device-skipped steps (which stops the run under engine.fail_on_nonfinite)."""
        report = (self.runner or self.s.stepper).read()
        if report.nonfinite:
            behind = pos.global_step - report.first_step   # steps since the first non-finite one, this one included
            value = "nan/inf" if report.nonfinite == 1 else f"nan/inf ({report.nonfinite} steps from here)"
            report_nonfinite(self.cfg, self.rt, self.run_log, report.first_what, value, report.first_step, pos.epoch,
                             pos.step_in_epoch - behind)
            pos.nonfinite_skipped += report.nonfinite
        if report.steps:
            self.shown = report.means["loss"]
            if self.run_log:
                at = pos.epoch + max(pos.step_in_epoch - 1, 0) / self.s.steps_per_epoch
                self.run_log.write({"kind": "train", "step": pos.global_step, "epoch": pos.epoch, "lr": self.lr,
                                    **report.means, **current_weights(self.s.module.tasks, at),
                                    "nonfinite_skipped": pos.nonfinite_skipped,
                                    **({"steps_averaged": report.steps} if self.runner is not None else {})})

    def evaluate(self, pos: Position, progress) -> bool:
        s, rt = self.s, self.rt
        self.last_eval = last = evaluate(s.forward_model, s.test_loader, rt, s.dtype)
        self.best_top1 = max(self.best_top1, last["top1"])
        val = s.val_loader and evaluate(s.forward_model, s.val_loader, rt, s.dtype)
        improved = self.selection.update(pos.global_step, val["top1"] if val else last["top1"], last["top1"])
        if self.run_log:
            self.run_log.write({"kind": "eval", "step": pos.global_step, "epoch": pos.epoch + 1, **last,
                                "best_top1": self.best_top1,
                                **({"val_top1": val["top1"], "val_loss": val["loss"]} if val else {})})
        val_text = f", validation top-1 {val['top1']:.2f}%" if val else ""
        log_line(progress, rt, f"epoch {pos.epoch + 1}/{effective_epochs(self.cfg)}: test top-1 {last['top1']:.2f}% "
                               f"(best {self.best_top1:.2f}%){val_text}, loss {last['loss']:.4f}")
        return improved

    def state(self, pos: Position) -> dict:
        cfg, s = self.cfg, self.s
        return {**position_state(pos, cfg, self.rt), "best_top1": self.best_top1, "model": cfg.model.name,
                "num_classes": s.num_classes, "selection": self.selection.state(), "dataset": s.meta["dataset"],
                "mean": list(s.meta["mean"]), "std": list(s.meta["std"]), **run_folder.state_entries(s.resolved)}


def static_runner(s: Setup) -> Optional[StaticStepRunner]:
    """The graphed step's runner when engine.graph_step chose it and the engine allows it, else None (logged)."""
    cfg, rt = s.cfg, s.rt
    if not s.graph_plan.active:
        return None
    reason = engine_fallback_reason(s.engine, s.optimizer)
    if reason:
        log_fallback(reason, rt.is_main)
        return None
    # after the resume: the runner installs its device LR in the optimizer that load_checkpoint filled
    runner = StaticStepRunner(s.engine.module, s.optimizer, s.graph_plan.mode, rt.device,
                              torch.bfloat16 if s.dtype == torch.bfloat16 else None, cfg.engine.fail_on_nonfinite,
                              clip=cfg.optim.clip_grad, engine=s.engine)
    s.stepper.remove()   # the runner checks the gradients on the device itself
    if rt.is_main:
        log.info("graphed step: %s (engine.graph_step=%s)", s.graph_plan.mode, cfg.engine.graph_step)
    return runner


def _train(cfg: Config) -> dict:
    cfg = resolve_into_config(cfg)   # a user's DeepSpeed JSON: its batch, accumulation, clip, stage, bf16 into cfg
    s = build(cfg)
    rt, out_dir, epochs = s.rt, Path(cfg.run.out_dir), effective_epochs(cfg)

    def check(saved: dict, folder: Path) -> None:
        if saved["model"] != cfg.model.name or saved["num_classes"] != s.num_classes:
            raise ConfigError(f"run.resume: {folder} holds {saved['model']} with {saved['num_classes']} classes, "
                              f"the config asks for {cfg.model.name} with {s.num_classes}")

    pos, state, saved = resume(cfg, rt, s.engine, out_dir, s.resolved, s.steps_per_epoch, check)
    selection = run_folder.Selection(s.holdout is not None, saved and saved.get("selection"))
    runner = static_runner(s)
    run_log = open_run_folder(s.resolved, rt, out_dir)
    hooks = SupervisedLoop(s, runner, selection, state["best_top1"] if state else 0.0, run_log, pos.global_step)
    max_steps = cfg.run.max_steps or epochs * s.steps_per_epoch
    if rt.is_main:
        for line in ramp_warnings(s.module.tasks, s.steps_per_epoch, min(max_steps, epochs * s.steps_per_epoch)):
            log.warning(line)
    run = Run(cfg, rt, s.engine, out_dir, s.train_loader, epochs, max_steps, StopFlag(), hooks.step,
              hooks.read_window, hooks.evaluate, hooks.read_window, hooks.state, lambda: hooks.shown,
              {"hub_config": s.hub_config, "keep_last": cfg.run.keep_last}, close=s.stepper.remove)
    exit_code, elapsed, seen = run_epochs(run, pos)
    last_eval = hooks.last_eval
    summary = {**summary_entries(pos, exit_code, elapsed, seen), "best_top1": hooks.best_top1, "last": last_eval,
               "best_top1_is": "the best over test evaluations",
               "selection": selection.summary(last_eval.get("top1"))}
    close_run(rt, out_dir, run_log, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    """`deepspeed engine/train.py --config FILE [key=value ...]` (DeepSpeed adds --local_rank)."""
    return launcher_main(argv, "smallvit training under DeepSpeed", run_training)


def run_training(cfg: Config) -> int:
    """Train and turn the known failures into one line and an exit code."""
    code, summary = run_reporting_errors(train, cfg)
    if code == 0 and summary.get("last"):
        chosen = summary["selection"]
        at_best = (f", {chosen['test_top1_at_best']:.2f}% at the best-validation checkpoint"
                   if chosen["metric"] == "val_top1" and chosen["test_top1_at_best"] is not None else "")
        print(f"final test top-1 {summary['last']['top1']:.2f}% (best over test evaluations "
              f"{summary['best_top1']:.2f}%{at_best}), {summary['images_per_second']:.0f} img/s, "
              f"{summary['seconds']:.0f} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
