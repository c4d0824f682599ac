"""Loader throughput, side by side in one process: the reference pipeline (torchvision DataLoader + PIL
transforms, workers = cores) against our ffcv, dali and resident loaders, each with the recipe's full
augmentation (AutoAugment CIFAR policy, pad-crop, flip, mixup/cutmix, erasing, translation perceptibility) and
with crop+flip only.

    python -m bench loaders [--source ../shared/data/cifar10-jpg.tar.gz] [--images 10000] [--batch 512]

Images per second over one epoch after a warm-up epoch (which pays FFCV's/DALI's compilation), on the device the
loader feeds (CUDA when present, else CPU).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import print_table, write_results

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar.gz"
FULL_RECIPE = dict(auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0, cutmix_alpha=1.0)
LOADERS = ("torchvision", "ffcv", "dali", "resident")


def make_betons(source: str, images: int, folder: Path) -> dict[str, Path]:
    """raw and JPEG .betons of the first `images` training images of `source` (or random images without one)."""
    from loaders.convert.arrays import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    if source and Path(source).exists():
        from loaders.convert.detect import open_dataset

        src = open_dataset(source, ["train"], progress=False).sources["train"]
        n = min(images, len(src))
        pick = np.random.default_rng(0).permutation(len(src))[:n]   # all classes, not the first folder's
        arrays = np.stack([src[int(i)][0] for i in pick])
        labels = np.array([src[int(i)][1] for i in pick])
        classes, name = src.classes, src.name
    else:
        rng = np.random.default_rng(0)
        arrays = rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, images)
        classes, name = [str(i) for i in range(10)], "random"
    out = {}
    for mode in ("raw", "jpg"):
        out[mode] = folder / f"{mode}.beton"
        write_beton(ArraySource(arrays, labels, classes, name, "train"), out[mode],
                    WriteOptions(mode=mode, num_workers=-1, progress=False))
    return out


def measure(kind: str, beton: Path, augment: bool, batch: int, device: torch.device, workers: int) -> float:
    """Images per second of one epoch after a warm-up epoch."""
    from engine.config import DataConfig, PerceptibilityConfig
    from loaders.factory import build_loader
    from loaders.sidecar import read_sidecar

    meta = read_sidecar(beton)
    data = DataConfig(dataset=meta["dataset"], train=str(beton), test=str(beton), loader=kind, batch_size=batch,
                      num_workers=workers, **(FULL_RECIPE if augment else {}))
    perceptibility = PerceptibilityConfig(enabled=True) if augment else None
    loader, _ = build_loader(data, True, 0, device, perceptibility=perceptibility)
    if kind == "torchvision":   # the reference repos' pipeline: PIL transforms in DataLoader workers
        from loaders.torchvision_loader import TorchvisionLoader

        loader = TorchvisionLoader(data.train, loader.plan, loader.transform, device, num_workers=workers,
                                   style="pil")
    for _ in loader.epoch(0):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, count = time.perf_counter(), 0
    for b in loader.epoch(1):
        count += len(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return count / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench loaders", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--source", default=str(DEFAULT_SOURCE), help="dataset to convert (random images if absent)")
    ap.add_argument("--images", type=int, default=4096, help="training images used")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="CPU workers (reference: all cores)")
    ap.add_argument("--loaders", default=",".join(LOADERS), help="comma list of loaders to run")
    ap.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    ap.add_argument("--no-record", action="store_true", help="do not add lines to bench/results/README.md")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        betons = make_betons(args.source, args.images, Path(tmp))
        for kind in args.loaders.split(","):
            for augment in (True, False):
                beton = betons["jpg" if kind == "dali" else "raw"]
                rate = measure(kind, beton, augment, args.batch, device, args.workers)
                rows.append({"variant": f"{kind} ({'full recipe' if augment else 'crop+flip'})", "loader": kind,
                             "augment": "full" if augment else "crop+flip", "images_per_s": rate})
    base = {r["augment"]: r["images_per_s"] for r in rows if r["loader"] == "torchvision"}
    for r in rows:
        if r["augment"] in base:
            r["vs_reference"] = r["images_per_s"] / base[r["augment"]]
    print_table(rows, ["variant", "images_per_s", "vs_reference"])
    write_results("loaders", rows, "images_per_s", "variant", "img/s", out_dir=args.out_dir,
                  record=not args.no_record, extra={"images": args.images, "batch": args.batch,
                                                     "workers": args.workers, "source": args.source})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
