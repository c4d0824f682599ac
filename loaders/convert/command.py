"""`smallvit convert SOURCE --out DIR`: every split of a dataset to DIR/<split>.beton + DIR/<split>.beton.json.

All or nothing: every split is written to a temporary file first; when all of them succeeded they are renamed
into place together (with --force the old files go back if any rename fails), so DIR holds all the old splits or
all the new ones. An error (one line naming the file and sample) exits with code 2 and leaves DIR as it was.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

from loaders.sidecar import DatasetFileError

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
AUTO_RAW_MAX_SIDE = 64  # mode 'auto': raw pixels up to 64 px (CIFAR/SVHN/CINIC/Tiny-ImageNet), JPEG above
DEFAULT_JPEG_QUALITY = 90
TEST_SPLITS = ("test", "val", "valid")


def add_convert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `convert` options to `parser` (give it formatter_class=argparse.ArgumentDefaultsHelpFormatter)."""
    parser.add_argument("source", metavar="SOURCE",
                        help="a path (cifar-10/100 python archive or extracted batches folder, SVHN .mat or folder, "
                             "tiny-imagenet-200 folder or .zip, an ImageFolder folder or .tar.gz with "
                             "train/test|val|valid subfolders, .npz) or a dataset word: digits, cifar10, cifar100, "
                             "svhn, tinyimagenet (the official files, from --download-dir)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for <split>.beton(.json) "
                        "(required)")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="dataset name recorded in the sidecars; None: detected from the source")
    parser.add_argument("--splits", default=None, metavar="LIST",
                        help="comma-separated splits to convert, e.g. train,test; None: all labelled splits "
                             "found (SVHN's extra only when named)")
    parser.add_argument("--labels", choices=("fine", "coarse"), default="fine",
                        help="CIFAR-100 label set (coarse: the 20 superclasses)")
    parser.add_argument("--mode", choices=("auto", "raw", "jpg"), default="auto",
                        help=f"image storage: raw pixels, JPEG, or auto (raw up to {AUTO_RAW_MAX_SIDE} px, else jpg)")
    parser.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                        help=f"JPEG quality 1..100 of JPEG storage; None: {DEFAULT_JPEG_QUALITY}. Under --mode auto "
                             f"it asks for JPEG storage, also for images auto would store raw")
    parser.add_argument("--max-resolution", type=int, default=None, metavar="N",
                        help="shrink images whose longest side exceeds N pixels (aspect kept); None: never")
    parser.add_argument("--resize", type=int, default=None, metavar="SIDE",
                        help="image files: resize the shorter side to SIDE and center-crop SIDE x SIDE; "
                             "None: keep sizes")
    parser.add_argument("--per-class", type=int, default=None, metavar="N",
                        help="keep the first N images of each class of every split (source order; a small balanced "
                             "slice for quick experiments, recorded in the sidecar); None: all")
    parser.add_argument("--test-split", type=float, default=None, metavar="FRACTION",
                        help="for a source with one split (a flat ImageFolder: <class>/<image>): hold out this "
                             "fraction of every class as the test split (stratified, seeded by --split-seed); "
                             "None: write the one split as train")
    parser.add_argument("--split-seed", type=int, default=0, metavar="N",
                        help="seed of the --test-split draw (the same seed gives the same split)")
    parser.add_argument("--workers", type=int, default=-1, metavar="N", help="writer processes (-1: all cores)")
    parser.add_argument("--force", action="store_true", help="overwrite existing .beton files")
    parser.add_argument("--download", action="store_true",
                        help="fetch the official files for a dataset word (MD5-checked, resumable)")
    parser.add_argument("--download-dir", default=None, metavar="DIR",
                        help="where official files are looked for and downloaded to; None: OUT/downloads")
    parser.add_argument("--mirror", default=None, metavar="URL",
                        help="fetch official files from URL/<filename>; None: from their home sites")
    parser.add_argument("--skip-corrupt", action="store_true",
                        help="leave out images that fail to decode (listed at the end and in the sidecar)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def parse_splits(text: Optional[str]) -> Optional[list[str]]:
    if not text:
        return None
    splits = [s.strip() for s in text.split(",") if s.strip()]
    if len(set(splits)) != len(splits):
        raise ValueError(f"--splits {text!r} names a split twice")
    return splits


def choose_mode(requested: str, sources: dict, resize: Optional[int], max_resolution: Optional[int]) -> str:
    """'raw' or 'jpg'; 'auto' looks at the first decodable image of the first split (after --resize and
    --max-resolution). Images that fail to decode here are left for the writer to report (or skip)."""
    if requested != "auto":
        return requested
    first = next(iter(sources.values()))
    for i in range(min(len(first), 16)):
        try:
            image, _ = first[i]
        except Exception:  # noqa: BLE001 - the writer names the file when it meets it
            continue
        side = max(image.shape[:2])
        if max_resolution:
            side = min(side, max_resolution)
        return "raw" if side <= AUTO_RAW_MAX_SIDE else "jpg"
    return "raw"


def split_off_test(opened, fraction: float, seed: int) -> dict:
    """{'train', 'test'} from the one split of `opened` (refused when it has more, or a test split already)."""
    from loaders.convert.subset import hold_out_test

    if len(opened.sources) != 1 or set(opened.sources) & set(TEST_SPLITS):
        raise DatasetFileError(f"{opened.origin}: has the splits {', '.join(opened.sources)} already; --test-split "
                               f"is for a source with one split (a flat <class>/<image> folder)")
    (source,) = opened.sources.values()
    return hold_out_test(source, fraction, seed)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000.0
    return f"{n:.1f} GB"


def summary_lines(name: str, origin: str, metas: list[dict], seconds: float) -> list[str]:
    first = metas[0]["image"]
    size = f"{first['height']}x{first['width']}" if first["height"] else \
        f"{first['min_size'][0]}x{first['min_size'][1]}..{first['max_size'][0]}x{first['max_size'][1]}"
    lines = [f"converted {name} from {origin}: {first['mode']}"
             f"{' q' + str(first['jpeg_quality']) if first['mode'] == 'jpg' else ''}, {size}, "
             f"{metas[0]['num_classes']} classes, {seconds:.1f} s",
             f"  {'split':<8}{'images':>9}{'classes':>9}{'bytes':>11}{'img/s':>9}  mean (R G B)        std (R G B)"]
    for m in metas:
        rate = m["num_images"] / max(m["seconds"], 1e-9)
        present = sum(1 for c in m["class_counts"] if c)
        lines.append(f"  {m['split']:<8}{m['num_images']:>9}{present:>9}{_human_bytes(m['bytes']):>11}{rate:>9.0f}  "
                     + " ".join(f"{v:.3f}" for v in m["mean"]) + "  " + " ".join(f"{v:.3f}" for v in m["std"]))
    for m in metas:
        if m["skipped"]:
            lines.append(f"  skipped {len(m['skipped'])} corrupt image(s) in {m['split']}:")
            lines.extend(f"    {s['file']}: {s['reason']}" for s in m["skipped"])
    return lines


def run_convert(args: argparse.Namespace) -> int:
    """Convert; print a summary. -> 0, or 2 with a one-line error on stderr (nothing written), 130 on Ctrl-C."""
    from loaders.convert.detect import open_dataset
    from loaders.convert.writer import WriteOptions, check_target, commit_all, stage_beton

    staged = []
    try:
        if args.jpeg_quality is not None and not 1 <= args.jpeg_quality <= 100:
            raise ValueError(f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}")
        if args.jpeg_quality is not None and args.mode == "raw":
            raise ValueError(f"--jpeg-quality {args.jpeg_quality} with --mode raw: raw storage keeps the pixels "
                             f"(use --mode jpg or auto for JPEG)")
        for flag in ("max_resolution", "resize"):
            value = getattr(args, flag)
            if value is not None and value < 1:
                raise ValueError(f"--{flag.replace('_', '-')} must be a positive number of pixels, got {value}")
        if args.per_class is not None and args.per_class < 1:   # before the (possibly long) read of the source
            raise ValueError(f"--per-class must be a positive number of images, got {args.per_class}")
        if args.test_split is not None and not 0 < args.test_split < 1:
            raise ValueError(f"--test-split must be a fraction between 0 and 1, got {args.test_split}")
        if args.test_split is not None and args.splits:
            raise ValueError("--test-split makes train and test out of a source's one split: leave out --splits")
        out = Path(args.out)
        splits = parse_splits(args.splits)
        t0 = time.perf_counter()
        opened = open_dataset(args.source, splits, labels=args.labels, resize=args.resize, download=args.download,
                              download_dir=Path(args.download_dir) if args.download_dir else out / "downloads",
                              mirror=args.mirror, progress=not args.no_progress)
        classes = next(iter(opened.sources.values())).classes
        if len(classes) == 1:
            opened.warnings.append(f"{opened.origin}: one class only ('{classes[0]}'): a classifier has nothing to "
                                   f"tell apart (an ImageFolder holds one folder per class: <split>/<class>/<image>)")
        for warning in opened.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        name = args.dataset or opened.name
        notes = []
        if args.test_split is not None:
            opened.sources = split_off_test(opened, args.test_split, args.split_seed)
        elif not args.splits and not set(opened.sources) & set(TEST_SPLITS):
            notes.append(f"{opened.origin} has no test split: only {', '.join(opened.sources)} was written "
                         f"(--test-split 0.1 holds out a stratified 10% of every class as test)")
        if args.per_class is not None:
            from loaders.convert.subset import PerClassSubset

            opened.sources = {split: PerClassSubset(src, args.per_class) for split, src in opened.sources.items()}
        targets = {split: out / f"{split}.beton" for split in opened.sources}
        for target in targets.values():
            check_target(target, args.force)
        mode = choose_mode(args.mode, opened.sources, args.resize, args.max_resolution)
        if mode == "raw" and args.jpeg_quality is not None:   # only 'auto' gets here: the quality asks for JPEG
            mode = "jpg"
            print(f"note: --jpeg-quality {args.jpeg_quality} given, so these images are stored as JPEG (without it "
                  f"--mode auto stores images of up to {AUTO_RAW_MAX_SIDE} px as raw pixels)", file=sys.stderr)
        quality = DEFAULT_JPEG_QUALITY if args.jpeg_quality is None else args.jpeg_quality
        options = WriteOptions(mode=mode, jpeg_quality=quality, max_resolution=args.max_resolution,
                               num_workers=args.workers, force=args.force, progress=not args.no_progress,
                               skip_corrupt=args.skip_corrupt)
        for split, source in opened.sources.items():
            source.name = name
            staged.append(stage_beton(source, targets[split], options, desc=f"{name}/{split}"))
        metas = commit_all(staged)
        staged = []
        for line in summary_lines(name, opened.origin, metas, time.perf_counter() - t0):
            print(line)
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        return 0
    except (DatasetFileError, FileExistsError, ValueError) as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as exc:  # disk full, permissions: not the input's fault, still one line and nothing written
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for s in staged:
            s.discard()


def main(argv: Optional[list[str]] = None) -> int:
    """`python -m loaders.convert.command ...` (the same as `smallvit convert ...`)."""
    parser = argparse.ArgumentParser(prog="smallvit convert", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                     description=__doc__.splitlines()[0])
    add_convert_arguments(parser)
    return run_convert(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
