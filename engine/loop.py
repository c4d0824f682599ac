"""The one loop skeleton that supervised training (engine/train.py) and DINO pretraining (engine/pretrain.py) run:
resume, the epoch/step loop with its stop signals, timing, evaluation cadence and checkpoints (`run_epochs`), the
run folder, the non-finite report, the progress bar, the closing summary, and the launcher entry. Each loop builds
a `Run` (its step, log point, evaluation and checkpoint state) and neither imports the other."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from engine import checkpoint, run_folder
from engine.config import Config, ConfigError, load_config, to_dict
from engine.run_log import RunLog, environment, plot_curves
from engine.runtime import Runtime

log = logging.getLogger("smallvit")


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss or gradient under engine.fail_on_nonfinite; the message names the global step."""


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


@dataclass
class Position:
    """Where the loop is: epochs done, steps done in the current epoch, optimizer steps done in all, steps skipped
    as non-finite; saved in every checkpoint and read back on resume."""
    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    nonfinite_skipped: int = 0


@dataclass
class Run:
    """What a loop gives the skeleton. step(batch, pos) runs one optimizer step (counting a host-skipped step in
    pos.nonfinite_skipped) and returns its LR; log_point(pos) writes a train record (every run.log_every steps and at
    an epoch's end); evaluate(pos, progress) -> whether it is a new best, at the evaluation cadence; before_save(pos)
    runs before every checkpoint; state(pos) the trainer state a checkpoint holds (`pos` included); shown_loss() the
    progress bar's loss; save_options checkpoint.save's keywords (hub_config, keep_last, export)."""
    cfg: Config
    rt: Runtime
    engine: Any
    out_dir: Path
    train_loader: Any
    run_epochs: int
    max_steps: int
    stop: StopFlag
    step: Callable[[Any, Position], float]
    log_point: Callable[[Position], None]
    evaluate: Callable[[Position, Any], bool]
    before_save: Callable[[Position], None]
    state: Callable[[Position], dict]
    shown_loss: Callable[[], float]
    save_options: dict = field(default_factory=dict)
    mid_epoch_checkpoints: bool = True   # run.checkpoint_every_steps applies
    close: Callable[[], None] = lambda: None   # after the loop, also on failure


def position_state(pos: Position, cfg: Config, rt: Runtime) -> dict:
    """The trainer-state entries every checkpoint holds: where the loop is, and the world it ran in (what resume
    checks: world size, global batch, ZeRO stage)."""
    return {"epoch": pos.epoch, "step_in_epoch": pos.step_in_epoch, "global_step": pos.global_step,
            "world_size": rt.world_size, "global_batch": cfg.data.batch_size, "zero_stage": cfg.engine.zero_stage,
            "nonfinite_skipped": pos.nonfinite_skipped}


def summary_entries(pos: Position, exit_code: int, seconds: float, images: int) -> dict:
    """The summary.json entries every run writes: how far it got, how fast, how it ended."""
    return {"epochs_done": pos.epoch, "global_step": pos.global_step, "seconds": round(seconds, 2),
            "images_per_second": round(images / max(seconds, 1e-9), 1), "exit_code": exit_code,
            "nonfinite_skipped": pos.nonfinite_skipped}


def resume(cfg: Config, rt: Runtime, engine, out_dir: Path, resolved: Config, steps_per_epoch: int,
           check: Callable[[dict, Path], None]) -> tuple[Position, Optional[dict], Optional[dict]]:
    """Collective: clear stale partial checkpoints, find run.resume's checkpoint and, when there is one, check it
    (`check(saved state, folder)` refuses another kind of run; then the resolved config) and load it.
    -> (position to continue at, the loaded trainer state or None, the saved state read before loading or None)."""
    if rt.is_main:
        checkpoint.remove_stale(out_dir)
    folder = checkpoint.resolve(out_dir, cfg.run.resume, announce=rt.is_main)
    if folder is None:
        return Position(), None, None
    saved = checkpoint.read_state(folder)
    check(saved, folder)
    run_folder.check_resume(saved, resolved, folder)   # before DeepSpeed reads a byte of it
    state, epoch, step_in_epoch = restore_checkpoint(engine, folder, saved, cfg, rt, steps_per_epoch)
    return Position(epoch, step_in_epoch, state["global_step"], state.get("nonfinite_skipped", 0)), state, saved


def save(run: Run, pos: Position, best: bool = False) -> Path:
    """A checkpoint of the run at `pos` (after run.before_save, which may stop the run first)."""
    run.before_save(pos)
    return checkpoint.save(run.engine, run.out_dir, pos.global_step, run.state(pos), run.rt.is_main,
                           **run.save_options, best=best)


@dataclass
class Throughput:
    """Images seen over all ranks since `start` (time.perf_counter seconds)."""
    start: float
    images: int = 0

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def run_epochs(run: Run, pos: Position) -> tuple[int, float, int]:
    """The epochs from `pos` until run_epochs or run.max_steps or a stop signal -> (exit code, seconds, images
    seen over all ranks). Mid-epoch stops checkpoint where they are; an epoch's end evaluates at run.eval_every
    and checkpoints at run.checkpoint_every, the last epoch and every new best."""
    progress = progress_bar(run.cfg, run.rt, run.max_steps, pos.global_step)
    run.stop.install()
    try:
        seen, exit_code = Throughput(time.perf_counter()), 0
        run.engine.train()
        while pos.epoch < run.run_epochs and pos.global_step < run.max_steps:
            if not steps_of_epoch(run, pos, progress, seen):
                save(run, pos)   # left the epoch early (a signal, or run.max_steps): checkpoint where we are
                if run.stop.signal is not None:
                    exit_code = EXIT_INTERRUPTED
                    if run.rt.is_main:
                        log.warning("signal %d: checkpoint written at global step %d; resume with run.resume=auto",
                                    run.stop.signal, pos.global_step)
                break
            end_epoch(run, pos, progress)
    finally:
        run.stop.restore()
        run.close()
    if progress is not None:
        progress.close()
    return exit_code, seen.seconds(), seen.images


def steps_of_epoch(run: Run, pos: Position, progress, seen: Throughput) -> bool:
    """The remaining steps of epoch pos.epoch, with their log points and mid-epoch checkpoints -> True when the
    epoch ran to its end, False when a stop signal or run.max_steps ended it early."""
    cfg, loader = run.cfg, run.train_loader
    steps_per_epoch = len(loader)
    for batch in loader.epoch(pos.epoch, pos.step_in_epoch):
        lr = run.step(batch, pos)
        pos.global_step += 1
        pos.step_in_epoch += 1
        seen.images += len(batch) * run.rt.world_size
        if pos.global_step % cfg.run.log_every == 0 or pos.step_in_epoch == steps_per_epoch:
            run.log_point(pos)   # one host sync per run.log_every steps
        if progress is not None:
            progress.update(1)
            progress.set_postfix(epoch=pos.epoch, loss=f"{run.shown_loss():.3f}", lr=f"{lr:.2e}",
                                 img_s=f"{seen.images / seen.seconds():.0f}")
        if run.stop.signal is not None or (pos.global_step >= run.max_steps and pos.step_in_epoch < steps_per_epoch):
            return False
        if (run.mid_epoch_checkpoints and cfg.run.checkpoint_every_steps
                and pos.global_step % cfg.run.checkpoint_every_steps == 0 and pos.step_in_epoch < steps_per_epoch):
            save(run, pos)   # mid-epoch; an epoch's end has its own checkpoint rule (end_epoch)
    return True


def end_epoch(run: Run, pos: Position, progress) -> None:
    """After an epoch's last step: evaluate at run.eval_every and at the last epoch, move pos to the next epoch,
    checkpoint at run.checkpoint_every, the last epoch and every new best (so checkpoints/best can hold it)."""
    cfg = run.cfg
    improved = False
    if (pos.epoch + 1) % cfg.run.eval_every == 0 or pos.epoch + 1 == run.run_epochs:
        improved = run.evaluate(pos, progress)
    pos.epoch, pos.step_in_epoch = pos.epoch + 1, 0
    if pos.epoch % cfg.run.checkpoint_every == 0 or pos.epoch == run.run_epochs or improved:
        save(run, pos, best=improved)


def resume_step(state: dict, global_batch: int, folder: Path) -> int:
    """The step within the epoch to resume at: the checkpoint's global sample position (samples of the epoch
    consumed over all ranks) in batches of this run's global batch. The sample order does not depend on the world
    size (loaders/order.py), so a run resumed on another number of ranks sees every sample of the epoch once."""
    saved_batch = state.get("global_batch", global_batch)   # a state without it was saved at this batch
    consumed = state["step_in_epoch"] * saved_batch
    if consumed % global_batch:
        raise ConfigError(f"data.batch_size: {global_batch} does not divide the {consumed} samples of the epoch "
                          f"that {folder} had consumed (its global batch was {saved_batch})")
    return consumed // global_batch


def restore_checkpoint(engine, folder: Path, saved: dict, cfg: Config, rt: Runtime,
                       steps_per_epoch: int) -> tuple[dict, int, int]:
    """Collective: load `folder` (whose trainer state `saved` the caller has checked is its kind of run) into the
    DeepSpeed engine -> (trainer state, epoch, step in epoch to continue at). Refuses a world size the checkpoint
    cannot be resumed on; an epoch that was complete continues at the next one."""
    checkpoint.check_world_size(saved, folder, rt.world_size)
    state = checkpoint.load(engine, folder)
    epoch, step_in_epoch = state["epoch"], resume_step(state, cfg.data.batch_size, folder)
    if step_in_epoch >= steps_per_epoch:
        epoch, step_in_epoch = epoch + 1, 0
    if rt.is_main:
        log.info("resumed from %s at epoch %d step %d (global step %d)", folder, epoch, step_in_epoch,
                 state["global_step"])
    return state, epoch, step_in_epoch


def open_run_folder(cfg: Config, rt: Runtime, out_dir: Path) -> Optional[RunLog]:
    """Main rank: create out_dir with the resolved config.yaml and environment.json; return its RunLog (None on
    the other ranks)."""
    if not rt.is_main:
        return None
    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    (out_dir / "environment.json").write_text(json.dumps({**environment(), "world_size": rt.world_size,
                                                           "device": str(rt.device)}, indent=2))
    return RunLog(out_dir)


def report_nonfinite(cfg: Config, rt: Runtime, run_log: Optional[RunLog], what: str, value, global_step: int,
                     epoch: int, step_in_epoch: int) -> None:
    """A non-finite loss or gradient in the step after `global_step`: log it, then raise NonFiniteLoss
    (engine.fail_on_nonfinite, the default) or return so the caller skips the step and counts it."""
    action = "stopped" if cfg.engine.fail_on_nonfinite else "skipped"
    step = global_step + 1   # numbered as the metrics number it: the count of steps including this one
    if run_log:
        run_log.write({"kind": "nonfinite", "step": step, "epoch": epoch, "what": what, "value": str(value),
                       "action": action})
    if cfg.engine.fail_on_nonfinite:
        raise NonFiniteLoss(f"non-finite {what} {value} at step {step} (epoch {epoch}, step "
                            f"{step_in_epoch + 1} of the epoch); nothing was saved for this step")
    if rt.is_main:
        log.warning("non-finite %s %s at step %d: step skipped", what, value, step)


def progress_bar(cfg: Config, rt: Runtime, total: int, initial: int):
    """A tqdm bar over optimizer steps on the main rank when run.progress, else None."""
    if not (rt.is_main and cfg.run.progress):
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stdout)


def log_line(progress, rt: Runtime, message: str) -> None:
    """A per-epoch result line through logging on the main rank, whether or not a progress bar is shown (with one,
    the console handlers write above it instead of through it)."""
    if not rt.is_main:
        return
    if progress is None:
        log.info(message)
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        log.info(message)


def close_run(rt: Runtime, out_dir: Path, run_log: Optional[RunLog], summary: dict) -> None:
    """Main rank: write summary.json, close the logs, draw curves.png."""
    if not rt.is_main:
        return
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    run_log.close()
    if (out_dir / "metrics.jsonl").is_file():
        plot_curves(out_dir / "metrics.jsonl", out_dir / "curves.png")


def launcher_main(argv: Optional[list[str]], description: str, run: Callable[[Config], int]) -> int:
    """The `deepspeed engine/<loop>.py --config FILE [key=value ...]` entry (DeepSpeed adds --local_rank). DeepSpeed's
    own flags (deepspeed.add_config_arguments: --deepspeed, --deepspeed_config FILE) are accepted: the file is
    engine.deepspeed_config, merged over the generated config (engine/deepspeed_json.py)."""
    import deepspeed

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default="", help="YAML recipe (default: built-in defaults)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=5e-4")
    deepspeed.add_config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = load_config(args.config or None, args.overrides)
        cfg = with_deepspeed_flag(cfg, args.deepspeed_config)
    except ConfigError as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return 2
    try:
        return run(cfg)
    finally:
        close_process_group()


def with_deepspeed_flag(cfg: Config, path: Optional[str]) -> Config:
    """cfg with `--deepspeed_config PATH` as engine.deepspeed_config; a different file set in the config too is
    refused naming both."""
    if not path:
        return cfg
    if cfg.engine.deepspeed_config and cfg.engine.deepspeed_config != path:
        raise ConfigError(f"--deepspeed_config {path} and engine.deepspeed_config {cfg.engine.deepspeed_config} "
                          f"name two files; give one")
    return dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, deepspeed_config=path))


def close_process_group() -> None:
    """Destroy the process group before the interpreter exits. Left to interpreter teardown, gloo's worker threads
    can be destroyed while joinable and abort a rank with "terminate called without an active exception" (exit -6)
    after its run has finished and written everything. No barrier: after a failure on one rank, others would hang."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


EXIT_INTERRUPTED = 143   # SIGTERM/Ctrl-C: a final checkpoint was written; rerun with run.resume=auto
EXIT_NONFINITE = 3       # a NaN/inf loss or gradient stopped the run (engine.fail_on_nonfinite)


def run_reporting_errors(loop: Callable[[Config], dict], cfg: Config) -> tuple[int, Optional[dict]]:
    """Run a loop; turn its known failures into one `smallvit: error:` line and an exit code:
    2 bad config or input, 1 a checkpoint that could not be written, 3 a non-finite step. -> (code, summary)."""
    from loaders.sidecar import DatasetFileError

    try:
        summary = loop(cfg)
    except (ConfigError, DatasetFileError, FileNotFoundError, NotImplementedError, ValueError) as exc:
        code, message = 2, str(exc)
    except checkpoint.CheckpointError as exc:
        code, message = 1, str(exc)
    except NonFiniteLoss as exc:
        code, message = EXIT_NONFINITE, str(exc)
    else:
        return summary["exit_code"], summary
    print(f"smallvit: error: {message}", file=sys.stderr)
    return code, None
