"""Supervised training under DeepSpeed: the loop, written out top to bottom.

    deepspeed engine/train.py --config configs/cifar10_vit_drloc.yaml [key=value ...]   # any number of ranks
    smallvit train --config ... [key=value ...]                                          # one process, no launcher

Per step: batch from the loader (already augmented on the device) -> one forward over the images and every view the
auxiliary tasks ask for -> class loss + sum of the tasks' weighted losses -> DeepSpeed backward/step. Every random
draw inside a step is seeded from (seed, global step, rank), and the loader order from (seed, epoch), so a resumed
run continues exactly where the interrupted one was. With engine.graph_step the step runs on static buffers instead,
captured as one CUDA graph or emulated eagerly (engine/graphed_step.py), and its losses are read every log_every steps.
"""
from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (`deepspeed engine/train.py`): import the package, not engine/*.py
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
import torch.distributed as dist
from torch import nn

from engine import checkpoint, run_folder
from engine.config import Config, ConfigError
from engine.deepspeed_json import resolve_into_config
from engine.evaluate import evaluate
from engine.graphed_step import StaticStepRunner, engine_fallback_reason, log_fallback, plan_graph_step
from engine.loop import (EXIT_INTERRUPTED, EXIT_NONFINITE, NonFiniteLoss, close_run, launcher_main,  # noqa: F401
                         log_line, open_run_folder, progress_bar, report_nonfinite, restore_checkpoint,
                         run_reporting_errors)
from engine.models import create_model
from engine.models.options import model_kwargs
from engine.models.pos_embed import init_pos_embed
from engine.models.pretrained import load_finetune_weights
from engine.precision import compute_dtype
from engine.runtime import deepspeed_config, deterministic_algorithms, init_runtime, step_seed
from engine.schedule import lr_at
from engine.supervised_step import SupervisedStep
from engine.tasks import build_tasks, class_ce, effective_epochs
from engine.tasks.ramps import current_weights, ramp_warnings
from engine.weight_decay import param_groups
from loaders.batch import Batch
from loaders.factory import build_loader, preflight
from loaders.holdout import holdout_for

log = logging.getLogger("smallvit")



def model_size_overrides(model_cfg) -> dict[str, int]:
    """model.depth / embed_dim / num_heads that are set (non-zero), as create_model keyword overrides."""
    return {k: getattr(model_cfg, k) for k in ("depth", "embed_dim", "num_heads") if getattr(model_cfg, k)}


class TrainModule(nn.Module):
    """The model and its auxiliary tasks as one module, so DeepSpeed owns every trainable parameter."""

    def __init__(self, model: nn.Module, tasks: nn.ModuleList, label_smoothing: float):
        super().__init__()
        self.model = model
        self.tasks = tasks
        self.label_smoothing = label_smoothing

    def forward(self, batch: Batch, epoch: float, seed: int = 0):
        """-> (total loss scalar, {name: detached scalar} for the logs)."""
        views = [v for task in self.tasks for v in task.extra_views(batch)]
        images = torch.cat([batch.images, *views]) if views else batch.images
        outputs = self.model.forward_with_tokens(images).split(1 + len(views))
        cls_loss = class_ce(outputs[0].logits, batch.labels, batch.soft_labels, self.label_smoothing)
        total = cls_loss
        parts = {"cls_loss": cls_loss.detach()}
        for task in self.tasks:
            res = task.compute(outputs, batch, epoch, seed)
            total = total + res.loss
            parts[f"{task.name}_loss"] = res.raw
            parts.update({f"{task.name}_{k}": v for k, v in res.metrics.items()})
        return total, parts


def mean_over_ranks(values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Average scalar tensors over all ranks (one all-reduce) -> floats, for the logs."""
    names = list(values)
    stacked = torch.stack([values[n].detach().float().reshape(()) for n in names])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    return dict(zip(names, stacked.tolist()))


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it at each step boundary and writes a final checkpoint."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum, _frame) -> None:
        self.signal = signum


def train(cfg: Config) -> dict:
    """Run the configured training; return the final summary (also written to out_dir/summary.json)."""
    with deterministic_algorithms(cfg.engine.deterministic):
        return _train(cfg)


def _train(cfg: Config) -> dict:
    cfg = resolve_into_config(cfg)   # a user's DeepSpeed JSON: its batch, accumulation, clip, stage, bf16 into cfg
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
    perceptibility = cfg.tasks.perceptibility if cfg.tasks.perceptibility.enabled else None
    holdout = holdout_for(cfg.data.train, cfg.data.val_fraction, cfg.run.seed)   # None unless data.val_fraction
    train_loader, meta = build_loader(cfg.data, True, cfg.run.seed, rt.device, rt.rank, rt.world_size,
                                      torch.float32, channels_last, label_smoothing=cfg.optim.label_smoothing,
                                      perceptibility=perceptibility, subset=holdout and holdout.train)
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
    total_steps = cfg.optim.epochs * steps_per_epoch     # the LR horizon; the loop may stop earlier (stop_at_101)
    run_epochs = effective_epochs(cfg)
    warmup_steps = int(round(cfg.optim.warmup_epochs * steps_per_epoch))

    # ---- resume
    epoch, step_in_epoch, global_step, best_top1, nonfinite_skipped = 0, 0, 0, 0.0, 0
    if rt.is_main:
        checkpoint.remove_stale(out_dir)
    folder = checkpoint.resolve(out_dir, cfg.run.resume, announce=rt.is_main)
    selection = run_folder.Selection(holdout is not None)
    if folder is not None:
        saved = checkpoint.read_state(folder)
        if saved["model"] != cfg.model.name or saved["num_classes"] != num_classes:
            raise ConfigError(f"run.resume: {folder} holds {saved['model']} with {saved['num_classes']} classes, "
                              f"the config asks for {cfg.model.name} with {num_classes}")
        run_folder.check_resume(saved, resolved, folder)   # before DeepSpeed reads a byte of it
        selection = run_folder.Selection(holdout is not None, saved.get("selection"))
        state, epoch, step_in_epoch = restore_checkpoint(engine, folder, saved, cfg, rt, steps_per_epoch)
        global_step, best_top1 = state["global_step"], state["best_top1"]
        nonfinite_skipped = state.get("nonfinite_skipped", 0)

    runner = None
    if graph_plan.active:
        reason = engine_fallback_reason(engine, optimizer)
        if reason:
            log_fallback(reason, rt.is_main)
        else:   # after the resume: the runner installs its device LR in the optimizer that load_checkpoint filled
            runner = StaticStepRunner(engine.module, optimizer, graph_plan.mode, rt.device,
                                      torch.bfloat16 if bf16 else None, cfg.engine.fail_on_nonfinite,
                                      clip=cfg.optim.clip_grad, engine=engine)
            stepper.remove()   # the runner checks the gradients on the device itself
            if rt.is_main:
                log.info("graphed step: %s (engine.graph_step=%s)", graph_plan.mode, cfg.engine.graph_step)

    run_log = open_run_folder(resolved, rt, out_dir)
    shown_loss = float("nan")   # the progress bar's loss: the last step's, or the last read window's mean

    def read_window(lr: float) -> None:
        """The step's device accumulators (the static runner's or the default step's) -> a train record of the
        window's mean loss and parts, and the non-finite report of its device-skipped steps (which stops the run
        under engine.fail_on_nonfinite)."""
        nonlocal nonfinite_skipped, shown_loss
        report = (runner or stepper).read()
        if report.nonfinite:
            behind = global_step - report.first_step   # steps since the first non-finite one, this one included
            value = "nan/inf" if report.nonfinite == 1 else f"nan/inf ({report.nonfinite} steps from here)"
            report_nonfinite(cfg, rt, run_log, report.first_what, value, report.first_step, epoch,
                             step_in_epoch - behind)
            nonfinite_skipped += report.nonfinite
        if report.steps:
            shown_loss = report.means["loss"]
            if run_log:
                run_log.write({"kind": "train", "step": global_step, "epoch": epoch, "lr": lr, **report.means,
                               **current_weights(module.tasks, epoch + max(step_in_epoch - 1, 0) / steps_per_epoch),
                               "nonfinite_skipped": nonfinite_skipped,
                               **({"steps_averaged": report.steps} if runner is not None else {})})

    def save_state(best: bool = False) -> Path:
        read_window(lr)   # a non-finite step not yet reported stops the run before anything is saved
        return checkpoint.save(engine, out_dir, global_step, {
            "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step, "best_top1": best_top1,
            "model": cfg.model.name, "num_classes": num_classes, "world_size": rt.world_size,
            "global_batch": cfg.data.batch_size, "zero_stage": cfg.engine.zero_stage,
            "nonfinite_skipped": nonfinite_skipped, "selection": selection.state(),
            "dataset": meta["dataset"], "mean": list(meta["mean"]), "std": list(meta["std"]),
            **run_folder.state_entries(resolved)}, rt.is_main, hub_config=hub_config, keep_last=cfg.run.keep_last,
            best=best)

    def nonfinite(what: str, value) -> None:
        report_nonfinite(cfg, rt, run_log, what, value, global_step, epoch, step_in_epoch)

    stop = StopFlag()
    max_steps = cfg.run.max_steps or run_epochs * steps_per_epoch
    if rt.is_main:
        for line in ramp_warnings(module.tasks, steps_per_epoch, min(max_steps, run_epochs * steps_per_epoch)):
            log.warning(line)
    last_eval: dict = {}
    progress = progress_bar(cfg, rt, max_steps, global_step)
    stop.install()
    try:
        t_start, seen = time.perf_counter(), 0
        exit_code = 0
        lr = lr_at(global_step, total_steps, warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
        engine.train()
        while epoch < run_epochs and global_step < max_steps and exit_code == 0:
            for batch in train_loader.epoch(epoch, step_in_epoch):
                lr = lr_at(global_step, total_steps, warmup_steps, cfg.optim.lr, cfg.optim.min_lr)
                seed = step_seed(cfg.run.seed, global_step, rt.rank)
                if runner is not None:   # static buffers, LR and non-finite check on the device: no host sync
                    runner.step(batch, lr, seed, epoch + step_in_epoch / steps_per_epoch, global_step)
                else:   # losses and the finite flag into device accumulators (engine/supervised_step.py)
                    torch.manual_seed(seed)
                    if not stepper.step(batch, lr, seed, epoch + step_in_epoch / steps_per_epoch, global_step,
                                        nonfinite):
                        nonfinite_skipped += 1   # skipped: parameters and optimizer state unchanged
                global_step += 1
                step_in_epoch += 1
                seen += len(batch) * rt.world_size
                if global_step % cfg.run.log_every == 0 or step_in_epoch == steps_per_epoch:
                    read_window(lr)   # the window's mean loss: one host sync per run.log_every steps
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(epoch=epoch, loss=f"{shown_loss:.3f}", lr=f"{lr:.2e}",
                                         img_s=f"{seen / (time.perf_counter() - t_start):.0f}")
                if stop.signal is not None or (global_step >= max_steps and step_in_epoch < steps_per_epoch):
                    break   # mid-epoch stop; at an epoch's end the for-else below evaluates and checkpoints
                if (cfg.run.checkpoint_every_steps and global_step % cfg.run.checkpoint_every_steps == 0
                        and step_in_epoch < steps_per_epoch):
                    save_state()   # mid-epoch; an epoch's end has its own checkpoint rule below
            else:
                # the epoch ran to its end
                improved = False
                if (epoch + 1) % cfg.run.eval_every == 0 or epoch + 1 == run_epochs:
                    last_eval = evaluate(forward_model, test_loader, rt, dtype)
                    best_top1 = max(best_top1, last_eval["top1"])
                    val = val_loader and evaluate(forward_model, val_loader, rt, dtype)
                    improved = selection.update(global_step, val["top1"] if val else last_eval["top1"],
                                                last_eval["top1"])
                    if run_log:
                        run_log.write({"kind": "eval", "step": global_step, "epoch": epoch + 1, **last_eval,
                                       "best_top1": best_top1,
                                       **({"val_top1": val["top1"], "val_loss": val["loss"]} if val else {})})
                    val_text = f", validation top-1 {val['top1']:.2f}%" if val else ""
                    log_line(progress, rt, f"epoch {epoch + 1}/{run_epochs}: test top-1 {last_eval['top1']:.2f}% "
                                           f"(best {best_top1:.2f}%){val_text}, loss {last_eval['loss']:.4f}")
                epoch, step_in_epoch = epoch + 1, 0
                if epoch % cfg.run.checkpoint_every == 0 or epoch == run_epochs or improved:
                    save_state(best=improved)   # a new best is always checkpointed, so best/ can hold it
                continue
            # left the epoch early (a signal, or run.max_steps): checkpoint where we are
            save_state()
            if stop.signal is not None:
                exit_code = EXIT_INTERRUPTED
                if rt.is_main:
                    log.warning("signal %d: checkpoint written at global step %d; resume with run.resume=auto",
                                stop.signal, global_step)
            break
    finally:
        stop.restore()
        stepper.remove()
    if progress is not None:
        progress.close()
    elapsed = time.perf_counter() - t_start
    summary = {"epochs_done": epoch, "global_step": global_step, "best_top1": best_top1,
               "last": last_eval, "seconds": round(elapsed, 2), "images_per_second": round(seen / max(elapsed, 1e-9), 1),
               "exit_code": exit_code, "nonfinite_skipped": nonfinite_skipped,
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
