"""What the supervised loop (engine/train.py) and the pretraining loop (engine/pretrain.py) share around their
steps: the run folder, the non-finite report, the progress bar, the closing summary, and the launcher entry."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Optional

from engine import checkpoint
from engine.config import Config, ConfigError, load_config, to_dict
from engine.run_log import RunLog, environment, plot_curves
from engine.runtime import Runtime

log = logging.getLogger("smallvit")


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss or gradient under engine.fail_on_nonfinite; the message names the global step."""


def resume_step(state: dict, global_batch: int, folder: Path) -> int:
    """The step within the epoch to resume at: the checkpoint's global sample position (samples of the epoch
    consumed over all ranks) in batches of this run's global batch. The sample order does not depend on the world
    size (loaders/order.py), so a run resumed on another number of ranks sees every sample of the epoch once."""
    saved_batch = state.get("global_batch", global_batch)   # checkpoints before format 2 lack it: same batch
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
    import torch.distributed as dist

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
