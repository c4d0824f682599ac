"""The JSON sidecar written beside every .beton: what loaders and training read instead of hard-coded constants.

    train.beton  ->  train.beton.json
    {
      "format": 1, "dataset": "cifar10", "split": "train",
      "classes": ["airplane", ...], "num_classes": 10, "num_images": 50000,
      "class_counts": [5000, ...],
      "image": {"mode": "raw", "height": 32, "width": 32, "jpeg_quality": null, "max_resolution": null,
                "min_size": [32, 32], "max_size": [32, 32]},     # height/width are null when sizes vary
      "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.243, 0.261],   # per channel, fractions of 255
      "source": {"path": "...", "sha256": "...", ...},                   # + format facts (labels: fine/coarse)
      "skipped": [{"index": 17, "file": "...", "reason": "..."}],        # --skip-corrupt leftovers, usually []
      "created": "2026-11-24T23:59:00Z", "bytes": 153600000, "seconds": 12.3,
      "head_sha256": "...",                                              # see head_digest; checked on open
      "sha256": "..."                      # the whole .beton (independent of the writer count); inspect --verify
    }
mean/std are exact (integer pixel histograms) over the pixels as stored, after any --resize/--max-resolution;
in JPEG mode they describe the pixels before encoding. `smallvit sidecar FILE.beton` writes one for a .beton that
FFCV's own writer made (loaders/sidecar_command.py), from the decoded file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loaders.atomic import write_text_atomic

SIDECAR_FORMAT = 1
REQUIRED_KEYS = ("dataset", "split", "classes", "num_classes", "num_images", "class_counts", "image", "mean", "std")


class DatasetFileError(ValueError):
    """A dataset file (source, .beton or sidecar) that cannot be used; the message names the file."""


def sidecar_path(beton: str | os.PathLike) -> Path:
    p = Path(beton)
    return p.with_name(p.name + ".json")


def read_sidecar(beton: str | os.PathLike) -> dict[str, Any]:
    """Load and check the sidecar of `beton`; raise DatasetFileError naming the file when it is missing or bad."""
    path = sidecar_path(beton)
    if not Path(beton).is_file():
        raise DatasetFileError(f"{beton}: no such dataset file")
    if not path.is_file():
        raise DatasetFileError(f"{path}: sidecar missing (convert the dataset with `smallvit convert`, or write one "
                               f"for a .beton from FFCV's own writer with `smallvit sidecar {beton}`)")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetFileError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        raise DatasetFileError(f"{path}: sidecar lacks keys {missing}")
    size = Path(beton).stat().st_size
    if isinstance(meta.get("bytes"), int) and size != meta["bytes"]:
        # a truncated (or appended-to) file: FFCV would read past its end or serve a short epoch
        raise DatasetFileError(f"{beton}: {size} bytes but its sidecar says {meta['bytes']} (truncated or "
                               f"modified after conversion; convert it again)")
    if isinstance(meta.get("head_sha256"), str) and head_digest(beton) != meta["head_sha256"]:
        # FFCV trusts its header, sample table and page table blindly: a damaged byte there can abort the process
        raise DatasetFileError(f"{beton}: its header or sample/page tables differ from the conversion's "
                               f"(head_sha256 mismatch: the file is damaged; convert it again)")
    return meta


HEAD_BYTES, TAIL_BYTES = 4 << 20, 1 << 20


def head_digest(beton: str | os.PathLike) -> str:
    """SHA-256 of the structure FFCV reads before any pixel: the first 4 MiB (header, field descriptors, the
    per-sample table of a set up to ~100k samples) and the last 1 MiB (the page allocation table). Milliseconds
    to compute; recorded by the writer as the sidecar's "head_sha256" and checked on every open."""
    import hashlib

    size = Path(beton).stat().st_size
    h = hashlib.sha256()
    with open(beton, "rb") as fh:
        h.update(fh.read(min(size, HEAD_BYTES)))
        fh.seek(max(0, size - TAIL_BYTES))
        h.update(fh.read())
    return h.hexdigest()


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary file in the same folder, fsync, then rename over `path` (loaders/atomic.py)."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
