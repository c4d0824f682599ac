"""The `smallvit` command: convert, train, pretrain, eval, inspect, sidecar, bench, demo.

Each subcommand's --help explains every option with its default; `smallvit train --help` also lists every config
key of the schema (engine/config.py) with its type and default, settable as key=value overrides.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from engine.config import ConfigError, describe_options, load_config

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo_digits.yaml"


def _config_epilog() -> str:
    rows = describe_options()
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (set in the YAML or as key=value overrides; default shown):"]
    lines += [f"  {key:<{width}}  {default:<14} {tp}" for key, tp, default in rows]
    return "\n".join(lines)


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="", help="YAML recipe (configs/*.yaml, composed from the files its `bases:` "
                   "names, e.g. configs/base/*.yaml); empty = built-in defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=5e-4")


def _load(args) -> object:
    return load_config(args.config or None, args.overrides)


# ---------------------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    if args.list_models:
        from engine.models import list_models

        print("\n".join(list_models()))
        return 0
    from engine.train import run_training

    return run_training(_load(args))


def cmd_pretrain(args) -> int:
    from engine.pretrain import run_pretraining

    return run_pretraining(_load(args))


def cmd_demo(args) -> int:
    """Convert the embedded digits set (once) and train the demo recipe on it."""
    from loaders.convert.digits import digits_source
    from loaders.convert.writer import WriteOptions, write_beton

    out = Path(args.out)
    data_dir = out / "data"
    for split in ("train", "test"):
        target = data_dir / f"{split}.beton"
        if not target.exists():
            meta = write_beton(digits_source(split), target, WriteOptions(num_workers=args.workers))
            print(f"converted digits/{split}: {meta['num_images']} images -> {target} ({meta['bytes']} bytes)")
    overrides = [f"data.train={data_dir / 'train.beton'}", f"data.test={data_dir / 'test.beton'}",
                 f"run.out_dir={out / 'run'}", *args.overrides]
    from engine.train import run_training

    cfg = load_config(DEMO_CONFIG, overrides)
    return run_training(cfg)


def cmd_eval(args) -> int:
    from engine.evaluate import run_eval

    return run_eval(args)


def cmd_convert(args) -> int:
    from loaders.convert.command import run_convert

    return run_convert(args)


def cmd_sidecar(args) -> int:
    from loaders.sidecar_command import run_sidecar

    return run_sidecar(args)


def cmd_inspect(args) -> int:
    from engine.inspect_checkpoint import inspect_path

    return inspect_path(args)


def run_bench(args: list[str]) -> int:
    """`python -m bench ARGS` in a child process, its exit code returned. bench/ sits above engine/ (it times the
    engine's loaders, heads and step), so the engine runs it as a program instead of importing it."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "bench", *args])


def cmd_bench(args) -> int:
    return run_bench(args.bench_args)


# ------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smallvit", formatter_class=_Formatter,
        description="Train Vision Transformers on small image datasets fast: convert a dataset to .beton, train "
                    "with auxiliary self-supervised tasks under DeepSpeed, evaluate, "
                    "inspect files, and benchmark the data path and heads.")
    from engine import __version__

    parser.add_argument("--version", action="version", version=f"smallvit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("train", formatter_class=_Formatter, epilog=_config_epilog(),
                       help="train a model from a recipe (one process; use `deepspeed engine/train.py` for many)",
                       description="Train a model. Runs on one process without a launcher; for several GPUs or "
                                   "nodes launch `deepspeed engine/train.py --config FILE [key=value ...]`.")
    _add_config_args(p)
    p.add_argument("--list-models", action="store_true", help="print the registered model names and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain", formatter_class=_Formatter, epilog=_config_epilog(),
                       help="self-supervised DINO pretraining on the training set (then fine-tune with train)",
                       description="Self-supervised pretraining (METHODS.md B): student/teacher DINO on the "
                                   "multi-crop views of the training set, a k-NN probe on the teacher at each "
                                   "evaluation; the run's checkpoints export the teacher backbone, which a "
                                   "fine-tune recipe loads with model.finetune_from=<this run's out_dir>. One "
                                   "process here; for several GPUs or nodes launch "
                                   "`deepspeed engine/pretrain.py --config FILE [key=value ...]`.")
    _add_config_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", formatter_class=_Formatter, epilog=_config_epilog(),
                       help="convert the embedded digits set and train the demo recipe on it (no network)",
                       description=f"The embedded default: scikit-learn's 8x8 digits upscaled to 32x32 RGB, "
                                   f"converted with FFCV, the reference CIFAR ViT + its auxiliary task under "
                                   f"DeepSpeed. Recipe: {DEMO_CONFIG}.")
    p.add_argument("--out", default="runs/demo", help="folder for the converted data (data/) and the run (run/)")
    p.add_argument("--workers", type=int, default=2, help="conversion workers")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="overrides of the demo recipe")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("eval", formatter_class=_Formatter, help="evaluate a checkpoint on a test split",
                       description="Evaluate exported weights (a run folder or a checkpoint folder) on the "
                                   "test split named by the run's config (or --config/overrides).")
    p.add_argument("checkpoint", help="run folder (its latest checkpoint) or checkpoint folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (also run.progress=false)")
    _add_config_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("convert", formatter_class=_Formatter, help="convert a dataset to FFCV .beton files",
                       description="Convert a dataset (CIFAR archives, SVHN .mat, ImageFolder, Tiny-ImageNet, "
                                   ".npz, or 'digits') to .beton files with a JSON sidecar, atomically.")
    try:
        from loaders.convert.command import add_convert_arguments
    except ImportError:
        add_convert_arguments = None
    if add_convert_arguments is not None:
        add_convert_arguments(p)
    p.set_defaults(func=cmd_convert)

    from loaders.sidecar_command import __doc__ as sidecar_doc, add_sidecar_arguments

    p = sub.add_parser("sidecar", formatter_class=_Formatter, help="write the JSON sidecar of a .beton made by "
                       "FFCV's own writer", description=sidecar_doc)
    add_sidecar_arguments(p)
    p.set_defaults(func=cmd_sidecar)

    p = sub.add_parser("inspect", formatter_class=_Formatter, help="print what a .beton or checkpoint holds",
                       description="Print what a .beton holds (fields, count, class histogram; --verify decodes "
                                   "every sample) or what a checkpoint/run folder holds (step, config, weights).")
    p.add_argument("path", help=".beton file, checkpoint folder or run folder")
    p.add_argument("--verify", action="store_true", help="decode every sample and check it against the sidecar")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for --verify")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("bench", formatter_class=_Formatter, help="throughput benchmarks (see `smallvit bench -h`)",
                       description="Run the benchmarks in bench/: `smallvit bench loaders|heads|train|all [...]`.",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="arguments for `python -m bench`")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:   # everything after `bench` is the bench's own (its -h/--help included)
        return run_bench(argv[1:])
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # key=value overrides after an option (`eval RUN --no-progress data.test=...`): argparse leaves them over
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides = [*args.overrides, *rest]
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("smallvit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
