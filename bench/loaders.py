"""Loader throughput, side by side in one process: the reference pipeline (torchvision DataLoader + PIL
transforms, workers = cores) against our ffcv, dali and resident loaders, each with the recipe's full
augmentation (AutoAugment CIFAR policy, pad-crop, flip, mixup/cutmix, erasing, translation perceptibility) and
with crop+flip only.

    python -m bench loaders [--source ../shared/data/cifar10-jpg.tar.gz] [--images 10000] [--batch 512]

Images per second over one epoch after a warm-up epoch (which pays FFCV's/DALI's compilation), on the device the
loader feeds (CUDA when present, else CPU).

Per batch, in steady state (the batches after the first of an epoch that follows a warm-up epoch), what each loader
asks of the device (bench.counting): kernel launches with the transform captured (data.capture_transform=auto: a
graph replay counts 1) and eager (=off), host-to-device copies, of them blocking ones, and host syncs. Counted on
CUDA when present; on a CPU machine on the 'meta' device (no data, CUDA's device rules, pinned memory emulated)
with the captured transform emulated: the launches a GPU would take from the host. `transform` is the recipe alone
on a batch already on the device (its images/s on the loaders' device).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import RESULTS, print_table, write_results

DEFAULT_SOURCE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar.gz"
FULL_RECIPE = dict(auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0, cutmix_alpha=1.0)
LOADERS = ("torchvision", "ffcv", "dali", "resident", "transform")
COUNTED_BATCHES = 8      # steady-state batches counted per loader and recipe


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


def build(kind: str, beton: Path, augment: bool, batch: int, device: torch.device, workers: int,
          capture: str = "auto"):
    """The loader the bench runs for `kind` (torchvision: the reference's PIL transforms in DataLoader workers)."""
    from engine.config import DataConfig
    from loaders.factory import build_loader
    from loaders.sidecar import read_sidecar
    from loaders.transforms.perceptibility import PerceptibilityTransform

    meta = read_sidecar(beton)
    data = DataConfig(dataset=meta["dataset"], train=str(beton), test=str(beton), loader=kind, batch_size=batch,
                      num_workers=workers, capture_transform=capture, **(FULL_RECIPE if augment else {}))
    loader, _ = build_loader(data, True, 0, device, batch_transforms=[PerceptibilityTransform()] if augment else ())
    if kind == "torchvision":   # the reference repos' pipeline: PIL transforms in DataLoader workers
        from loaders.torchvision_loader import TorchvisionLoader

        loader = TorchvisionLoader(data.train, loader.plan, loader.transform, device, num_workers=workers,
                                   style="pil")
    return loader


def _replays(transform) -> int:
    return sum(getattr(transform, name).replays for name in ("_recipe_graphs", "_finish_graphs")
               if hasattr(transform, name))


def count_device_work(kind: str, beton: Path, augment: bool, batch: int, workers: int) -> dict[str, float]:
    """Per steady-state batch: launches (captured transform, replays counted 1), launches_eager, uploads,
    blocking_copies, syncs; `counted_on` the device used (see the module docstring)."""
    from bench.counting import DeviceWork

    device = torch.device("cuda" if torch.cuda.is_available() else "meta")
    out: dict[str, float] = {"counted_on": device.type}
    for capture in ("auto" if device.type == "cuda" else "emulate", "off"):
        with DeviceWork():                                 # pinned memory emulated off a GPU, set-up uncounted
            if kind == "transform":
                loader = build("resident", beton, augment, batch, device, workers, capture)
                batches = lambda e: _transform_batches(loader, e)   # noqa: E731
            else:
                loader = build(kind, beton, augment, batch, device, workers, capture)
                batches = loader.epoch
            for _ in batches(0):
                pass
            epoch = batches(1)
            next(epoch)
            before = _replays(loader.transform)
            with DeviceWork() as work:
                n = 0
                for _ in epoch:
                    n += 1
                    if n == COUNTED_BATCHES:
                        break
            epoch.close()
        figures = work.per_batch(n)
        replays = (_replays(loader.transform) - before) / max(1, n)
        if capture == "off":
            out["launches_eager"] = figures["ops"] + replays
        else:
            out.update(launches=figures["ops"] + replays, uploads=figures["uploads"],
                       blocking_copies=figures["blocking_copies"], syncs=figures["syncs"])
        if hasattr(loader, "close"):
            loader.close()
    return out


def _transform_batches(loader, epoch: int):
    """The resident loader's batches with the gather left out: the transform on one device batch, again and again."""
    per = loader.plan.per_rank_batch(1)
    images, labels = loader.images[:per], loader.labels[:per]
    index = torch.arange(per, device=loader.device)
    repeats = torch.zeros(per, dtype=torch.int64, device=loader.device)
    for _ in range(len(loader)):
        yield loader.transform(images, labels, index, epoch, repeats)


def measure(kind: str, beton: Path, augment: bool, batch: int, device: torch.device, workers: int) -> float:
    """Images per second of one epoch after a warm-up epoch."""
    if kind == "transform":
        loader = build("resident", beton, augment, batch, device, workers)
        batches = lambda e: _transform_batches(loader, e)   # noqa: E731
    else:
        loader = build(kind, beton, augment, batch, device, workers)
        batches = loader.epoch
    for _ in batches(0):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, count = time.perf_counter(), 0
    for b in batches(1):
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
    ap.add_argument("--no-counts", action="store_true",
                    help="skip the per-batch launch / copy / sync counts (two more epochs per loader and recipe)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        betons = make_betons(args.source, args.images, Path(tmp))
        for kind in args.loaders.split(","):
            if kind not in LOADERS:
                ap.error(f"--loaders: unknown loader {kind!r} (choose from {', '.join(LOADERS)})")
            for augment in (True, False):
                beton = betons["jpg" if kind == "dali" else "raw"]
                rate = measure(kind, beton, augment, args.batch, device, args.workers)
                row = {"variant": f"{kind} ({'full recipe' if augment else 'crop+flip'})", "loader": kind,
                       "augment": "full" if augment else "crop+flip", "images_per_s": rate}
                if not args.no_counts:
                    row.update(count_device_work(kind, beton, augment, args.batch, args.workers))
                rows.append(row)
    base = {r["augment"]: r["images_per_s"] for r in rows if r["loader"] == "torchvision"}
    for r in rows:
        if r["augment"] in base:
            r["vs_reference"] = r["images_per_s"] / base[r["augment"]]
    columns = ["variant", "images_per_s", "vs_reference"]
    if not args.no_counts:
        columns += ["launches", "launches_eager", "uploads", "blocking_copies", "syncs", "counted_on"]
    print_table(rows, columns)
    record = not args.no_record
    write_results("loaders", rows, "images_per_s", "variant", "img/s", out_dir=args.out_dir,
                  record=record, extra={"images": args.images, "batch": args.batch,
                                        "workers": args.workers, "source": args.source})
    if record and not args.no_counts:
        from bench.report import record_lines

        record_lines(Path(args.out_dir) if args.out_dir else RESULTS,
                     "loaders", [(f"{r['variant']}, per batch on {r['counted_on']}",
                                  f"{r['launches']:.0f} launches ({r['launches_eager']:.0f} eager), "
                                  f"{r['uploads']:.0f} uploads, {r['blocking_copies']:.0f} blocking, "
                                  f"{r['syncs']:.0f} syncs") for r in rows],
                     " ".join(["python -m bench", *sys.argv[1:]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
