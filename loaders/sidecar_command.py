"""`smallvit sidecar FILE.beton`: write the JSON sidecar of a .beton made by FFCV's own writer, from the file itself.

Every loader and training run reads the sidecar (classes, counts, sizes, mean/std) instead of constants, so a
.beton written with `ffcv.writer.DatasetWriter` (fields 'image': RGBImageField and 'label': IntField) is refused
until it has one. This command decodes every image once (a progress bar on stderr), counts labels, sizes and the
exact per-channel pixel statistics of what the file holds, and writes FILE.beton.json atomically (a temporary file
renamed into place: an interrupted run leaves nothing). What the file cannot tell is taken from the options
(`--dataset`, `--split`, `--classes`) or from a sidecar beside it; JPEG quality and any resize at writing time are
unknown and recorded as null.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from loaders.sidecar import DatasetFileError, sidecar_path, write_json_atomic

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


def add_sidecar_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("path", metavar="FILE", help="a .beton file with fields 'image' and 'label' (FFCV's writer)")
    parser.add_argument("--dataset", default=None, metavar="NAME",
                        help="dataset name recorded in the sidecar; None: the name in a sidecar beside FILE, else "
                             "the folder's name (data/photos/train.beton -> photos)")
    parser.add_argument("--split", default=None, metavar="NAME", help="split name; None: the file's stem (train)")
    parser.add_argument("--classes", default=None, metavar="LIST",
                        help="class names in label order: comma-separated, or @FILE with one name per line; None: "
                             "those of a sidecar beside FILE that covers its labels, else '0', '1', ...")
    parser.add_argument("--force", action="store_true", help="overwrite an existing sidecar")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _neighbour(path: Path) -> Optional[dict]:
    """The first readable sidecar of another .beton in the same folder (sorted by name), or None."""
    for other in sorted(path.parent.glob("*.beton.json")):
        if other.name != sidecar_path(path).name:
            try:
                return {**json.loads(other.read_text()), "_path": str(other)}
            except (OSError, ValueError):
                continue
    return None


def _class_names(text: Optional[str], labels: np.ndarray, neighbour: Optional[dict]) -> tuple[list[str], str]:
    """-> (class names, where they came from)."""
    top = int(labels.max()) + 1 if len(labels) else 0
    if text:
        if text.startswith("@"):
            try:
                names = [line.strip() for line in Path(text[1:]).read_text().splitlines() if line.strip()]
            except OSError as exc:
                raise DatasetFileError(f"{text[1:]}: cannot read the class names ({exc.strerror})") from None
            where = text[1:]
        else:
            names, where = [c.strip() for c in text.split(",") if c.strip()], "--classes"
        if len(set(names)) != len(names):
            raise ValueError(f"--classes: a class is named twice in {where}")
        return names, where
    if neighbour and len(neighbour.get("classes", [])) >= top:
        return list(neighbour["classes"]), neighbour["_path"]
    return [str(k) for k in range(top)], f"the labels 0..{top - 1}"


def build_sidecar(path: Path, dataset: Optional[str], split: Optional[str], classes: Optional[str],
                  progress: bool) -> tuple[dict, str]:
    """Read and decode the whole .beton; -> (its sidecar, where the class names came from)."""
    from tqdm import tqdm

    from loaders.convert.detect import guess_name
    from loaders.convert.writer import WriteStats, check_labels, sidecar_meta
    from loaders.inspect import BetonFile

    t0 = time.perf_counter()
    beton = BetonFile(path)
    if beton.num_samples == 0:
        raise DatasetFileError(f"{path}: holds no samples")
    neighbour = _neighbour(path)
    names, names_from = _class_names(classes, beton.labels, neighbour)
    if not names:
        raise DatasetFileError(f"{path}: no classes")

    check_labels(beton.labels, len(names), SimpleNamespace(locate=lambda i: f"{path}[{i}]", name=path.name))
    stats = WriteStats(len(names))
    bar = tqdm(beton.images(), total=beton.num_samples, unit="img", unit_scale=True, desc=f"read {path.name}",
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        for i, image in bar:
            stats.add(image, int(beton.labels[i]))
    finally:
        bar.close()
    modes = {int(m) for m in np.unique(beton.modes)}
    mode = {frozenset({1}): "raw", frozenset({0}): "jpg"}.get(frozenset(modes), "mixed")
    name = dataset or (neighbour or {}).get("dataset") or guess_name(path.resolve().parent)
    meta = sidecar_meta(dataset=name, split=split or path.stem, classes=names, stats=stats, mode=mode,
                        jpeg_quality=None, max_resolution=None, beton=path, seconds=time.perf_counter() - t0,
                        source={"path": str(path), "made_by": "smallvit sidecar (read from the .beton itself)"},
                        skipped=[])
    meta["source"]["sha256"] = meta["sha256"]    # the source is the file itself
    return meta, names_from


def run_sidecar(args: argparse.Namespace) -> int:
    """-> 0 with the sidecar written, 2 with a one-line error (nothing written), 130 on Ctrl-C."""
    path = Path(args.path)
    try:
        if path.suffix != ".beton":
            raise DatasetFileError(f"{path}: not a .beton file")
        if not path.is_file():
            raise DatasetFileError(f"{path}: no such file")
        target = sidecar_path(path)
        if target.exists() and not args.force:
            raise FileExistsError(f"{target} exists (pass --force to overwrite)")
        meta, names_from = build_sidecar(path, args.dataset, args.split, args.classes, not args.no_progress)
        write_json_atomic(target, meta)
    except (DatasetFileError, FileExistsError, ValueError) as exc:
        print(f"smallvit: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("interrupted: nothing written", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {target}: dataset {meta['dataset']}, split {meta['split']}, {meta['num_images']} images, "
          f"{meta['num_classes']} classes (names from {names_from}), {meta['image']['mode']}, mean "
          + " ".join(f"{v:.4f}" for v in meta["mean"]) + ", std " + " ".join(f"{v:.4f}" for v in meta["std"]))
    return 0

