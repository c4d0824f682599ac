"""Conversion speed: images/s of `smallvit convert` for CIFAR-10 on this machine, raw pixels vs JPEG.

    python -m bench.convert_speed [--source PATH] [--out-dir D] [--out-json F] [--workers N] [--limit N]

Four variants over both splits (60,000 images), each through the real writer (loaders.convert.writer.stage_beton,
FFCV's DatasetWriter with all cores, statistics included, nothing committed):
    files  -> raw / jpg   the CIFAR-10 JPEG copy (ImageFolder in a tar.gz): every image decoded by PIL in the workers
    arrays -> raw / jpg   the same pixels already in memory: the path of the python pickle batches, SVHN .mat, .npz
The tar.gz is read into memory once before timing (reported separately as "archive read").
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cifar10-jpg.tar.gz"


def _limit(source, n: int | None):
    """The first n samples of a split (for quick runs), as the same kind of source."""
    if not n or n >= len(source):
        return source
    from loaders.convert.arrays import ArraySource
    from loaders.convert.images import FileImageSource

    if isinstance(source, ArraySource):
        return ArraySource(source.images[:n], source.labels[:n], source.classes, source.name, source.split,
                           origin=source.origin)
    return FileImageSource(source.tree, source.members[:n], source.labels[:n], source.classes, source.name,
                           source.split, origin=source.origin)


def time_variant(sources: dict, mode: str, workers: int, folder: Path, quality: int = 90) -> dict:
    from loaders.convert.writer import WriteOptions, stage_beton

    options = WriteOptions(mode=mode, jpeg_quality=quality, num_workers=workers, force=True, progress=False)
    images, nbytes, t0 = 0, 0, time.perf_counter()
    for split, source in sources.items():
        staged = stage_beton(source, folder / f"{split}.beton", options)
        images += staged.meta["num_images"]
        nbytes += staged.meta["bytes"]
        staged.discard()
    seconds = time.perf_counter() - t0
    return {"images": images, "seconds": round(seconds, 2), "images_per_s": images / seconds, "bytes": nbytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.convert_speed", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", default=str(DEFAULT_SOURCE),
                        help="the CIFAR-10 JPEG ImageFolder (.tar.gz or folder)")
    parser.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    parser.add_argument("--out-json", default=None,
                        help="also copy the JSON here (it always goes to <out-dir>/convert_<device>.json)")
    parser.add_argument("--workers", type=int, default=-1, help="writer processes (-1: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="first N images per split only (quick check)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the jpg variants")
    parser.add_argument("--no-record", action="store_true", help="do not add lines to bench/results/README.md")
    args = parser.parse_args(argv)

    source = Path(args.source)
    if not source.exists():
        print(f"error: {source}: not found (the CIFAR-10 JPEG copy; see ../shared/data/README.md)", file=sys.stderr)
        return 2
    from bench.report import print_table, write_results
    from loaders.convert.arrays import ArraySource
    from loaders.convert.detect import open_dataset
    from loaders.ffcv_loader import read_all

    workers = args.workers if args.workers > 0 else (os.cpu_count() or 1)
    t0 = time.perf_counter()
    opened = open_dataset(str(source), ["train", "test"])
    read_s = time.perf_counter() - t0
    files = {s: _limit(src, args.limit) for s, src in opened.sources.items()}
    rows = []
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        folder = Path(tmp)
        # Warm-up: first-use compilation (numba in FFCV's field code) and imports in the parent, not timed.
        time_variant({"train": _limit(files["train"], 64)}, "jpg", workers, folder, args.quality)
        for mode in ("raw", "jpg"):
            r = time_variant(files, mode, workers, folder, args.quality)
            rows.append({"variant": f"files -> {mode}", **r})
            print(f"  {rows[-1]['variant']}: {r['images_per_s']:,.0f} img/s", file=sys.stderr)
        # The decoded pixels in memory, read back from a raw conversion (exactly what the files decode to).
        from loaders.convert.writer import WriteOptions, write_beton

        arrays = {}
        for split, src in files.items():
            write_beton(src, folder / f"{split}.beton", WriteOptions(num_workers=workers, force=True, progress=False))
            x, y = read_all(folder / f"{split}.beton")
            pixels = np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
            arrays[split] = ArraySource(pixels, y.numpy(), src.classes, src.name, split,
                                        origin=f"{source} (decoded, in memory)")
        for mode in ("raw", "jpg"):
            r = time_variant(arrays, mode, workers, folder, args.quality)
            rows.append({"variant": f"arrays -> {mode}", **r})
            print(f"  {rows[-1]['variant']}: {r['images_per_s']:,.0f} img/s", file=sys.stderr)
    for r in rows:
        r["MB"] = r.pop("bytes") / 1e6
        r["workers"] = workers
    print(f"CIFAR-10 conversion on this machine ({workers} writer processes, {os.cpu_count()} cores); "
          f"archive read into memory once: {read_s:.1f} s")
    print_table(rows, ["variant", "images", "seconds", "images_per_s", "MB", "workers"])
    command = "python -m bench.convert_speed" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    paths = write_results("convert", rows, "images_per_s", "variant", "img/s", out_dir=args.out_dir,
                          command=command.strip(), record=not args.no_record,
                          extra={"source": str(source), "archive_read_s": round(read_s, 2), "limit": args.limit,
                                 "jpeg_quality": args.quality})
    if args.out_json:
        shutil.copy(paths["json"], args.out_json)
    print(f"wrote {paths['json']}" + (f" and {args.out_json}" if args.out_json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
