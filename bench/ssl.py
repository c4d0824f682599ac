"""Self-supervised pretraining, measured (METHODS.md B): does DINO on the small set beat random init, and does
fine-tuning from it beat training from scratch on the same fine-tune budget?

    python -m bench ssl --pretrain-config configs/ssl_cifar10_vit.yaml \\
        --finetune-config configs/cifar10_vit_finetune.yaml --pretrain-epochs 30 --finetune-epochs 30 \\
        --set data.train=data/cifar10/train.beton --set data.test=data/cifar10/test.beton

Rows, side by side from one run: the k-NN probe (k 20, T 0.07) of the randomly initialised backbone and of the
DINO teacher at every evaluation; with --finetune-epochs, the best test top-1 of the fine-tune recipe from the
pretrained teacher and from scratch (model.finetune_from empty), same epochs, same everything else. The DINO loss
per epoch (mean of the logged steps) is printed first and last and kept in the JSON's curves; each run's curves.png
is copied beside the JSON as ssl_<device>_<run>_curves.png. Writes
bench/results/ssl_<device>.json (with every run's curves and summary) and .png, and a README line per row.
`--set KEY=VALUE` applies to every stage; `--pretrain-set` / `--finetune-set` to one.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from bench.report import print_table, write_results


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench ssl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pretrain-config", required=True, help="an ssl recipe (configs/ssl_*.yaml)")
    p.add_argument("--finetune-config", default="", help="a fine-tune recipe; empty: no fine-tune/scratch rows")
    p.add_argument("--pretrain-epochs", type=int, default=0, help="override optim.epochs of pretraining (0: keep)")
    p.add_argument("--finetune-epochs", type=int, default=0, help="override optim.epochs of fine-tune and scratch")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every stage")
    p.add_argument("--pretrain-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--finetune-set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--work-dir", default="runs/bench_ssl", help="where the runs are written")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    p.add_argument("--no-record", action="store_true", help="do not add lines to bench/results/README.md")
    return p.parse_args(argv)


def _evals(run_dir: Path, key: str) -> list[dict]:
    from engine.run_log import read_metrics

    return [{"epoch": r["epoch"], key: r[key]} for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "eval" and key in r]


def _loss_by_epoch(run_dir: Path) -> list[dict]:
    """Mean of the logged pretraining losses per epoch: [{"epoch": e, "loss": mean}] (epochs from 0)."""
    from engine.run_log import read_metrics

    sums: dict[int, list[float]] = {}
    for r in read_metrics(run_dir / "metrics.jsonl"):
        if r["kind"] == "train" and "loss" in r:
            sums.setdefault(r["epoch"], []).append(r["loss"])
    return [{"epoch": e, "loss": sum(v) / len(v)} for e, v in sorted(sums.items())]


def main(argv: list[str] | None = None) -> int:
    from engine.config import load_config
    from engine.pretrain import build_network, knn_probe, pretrain
    from engine.runtime import init_runtime

    args = _parse(argv)
    work = Path(args.work_dir)
    common = [*args.set, f"engine.device={args.device}"]
    pre_over = [*common, *args.pretrain_set, f"run.out_dir={work / 'pretrain'}"]
    if args.pretrain_epochs:
        # the recipes' warm-up shares, kept for a shortened schedule: 30 of 200 epochs (pretraining)
        pre_over += [f"optim.epochs={args.pretrain_epochs}", f"optim.warmup_epochs={0.15 * args.pretrain_epochs}"]
    pre_cfg = load_config(args.pretrain_config, pre_over)
    rows: list[dict] = []

    # random init: the teacher network pretraining starts from (same seed, same build)
    rt = init_runtime(pre_cfg.engine.device)
    torch.manual_seed(pre_cfg.run.seed)
    dtype = torch.bfloat16 if pre_cfg.engine.precision == "bf16" and rt.device.type == "cuda" else torch.float32
    start = build_network(pre_cfg, 0.0).to(rt.device)
    rows.append({"variant": "k-NN, random init", "top1": knn_probe(start.model, pre_cfg, rt, dtype), "epochs": 0})
    del start

    summary = pretrain(pre_cfg)
    if summary["exit_code"] != 0:   # interrupted: no comparison to make from a partial run
        print(f"pretraining stopped early (exit {summary['exit_code']}); resume it with "
              f"--pretrain-set run.resume=auto", file=sys.stderr)
        return summary["exit_code"]
    for r in _evals(work / "pretrain", "knn_top1"):
        rows.append({"variant": f"k-NN, DINO epoch {r['epoch']}", "top1": r["knn_top1"], "epochs": r["epoch"]})
    runs = {"pretrain": summary}

    if args.finetune_config:
        from engine.train import train

        ft_common = [*common, *args.finetune_set]
        if args.finetune_epochs:
            # 10 of 100 epochs (the supervised recipe)
            ft_common += [f"optim.epochs={args.finetune_epochs}", f"optim.warmup_epochs={0.1 * args.finetune_epochs}"]
        for name, extra in (("fine-tune from DINO", [f"model.finetune_from={work / 'pretrain'}"]),
                            ("scratch", ["model.finetune_from="])):
            out = work / name.split()[0]
            cfg = load_config(args.finetune_config, [*ft_common, *extra, f"run.out_dir={out}"])
            result = train(cfg)
            runs[name] = result
            rows.append({"variant": f"{name}, best test top-1", "top1": result["best_top1"],
                         "epochs": result["epochs_done"]})

    print_table(rows, ["variant", "epochs", "top1"])
    losses = _loss_by_epoch(work / "pretrain")
    if losses:
        print(f"DINO loss (mean of the logged steps): epoch {losses[0]['epoch']} {losses[0]['loss']:.4f} -> "
              f"epoch {losses[-1]['epoch']} {losses[-1]['loss']:.4f}")
    curves = {"pretrain_knn": _evals(work / "pretrain", "knn_top1"), "pretrain_loss": losses}
    for name in ("fine-tune", "scratch"):
        if (work / name / "metrics.jsonl").is_file():
            curves[name] = _evals(work / name, "top1")
    command = " ".join(["python -m bench ssl", *(argv if argv is not None else sys.argv[2:])])
    paths = write_results("ssl", rows, "top1", "variant", "%", Path(args.out_dir) if args.out_dir else None,
                          command=command, record=not args.no_record,
                          extra={"curves": curves, "summaries": json.loads(json.dumps(runs, default=str))})
    import shutil

    device_tag = paths["json"].stem.rsplit("_", 1)[-1]
    for name in ("pretrain", "fine-tune", "scratch"):   # each run's loss/accuracy curves beside the table
        if (work / name / "curves.png").is_file():
            shutil.copyfile(work / name / "curves.png", paths["json"].parent / f"ssl_{device_tag}_{name}_curves.png")
    print(f"wrote {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
