"""The one .beton writer: FFCV's DatasetWriter behind an atomic rename, plus the JSON sidecar.

A source is any object with
    __len__() -> N
    __getitem__(i) -> (image: uint8 ndarray (H, W, 3), label: int)
    classes: list[str]                     # label i names classes[i]
    name: str                              # dataset name recorded in the sidecar ('cifar10', ...)
    split: str                             # 'train' / 'test' / ...
    source_checksum() -> str               # sha256 of what it read (files or arrays)
and optionally `images` (N, H, W, 3) uint8 ndarray and `labels` (N,) when the whole split is in memory, which makes
the statistics pass vectorized.

Nothing is ever half-written at the final path: the .beton goes to a hidden temporary file in the same folder and
is renamed only after FFCV finished and the sidecar was computed; any exception (Ctrl-C included) removes it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import numpy as np

from loaders.sidecar import SIDECAR_FORMAT, DatasetFileError, sidecar_path, write_json_atomic


class ImageSource(Protocol):
    classes: list[str]
    name: str
    split: str

    def __len__(self) -> int: ...
    def __getitem__(self, i: int) -> tuple[np.ndarray, int]: ...
    def source_checksum(self) -> str: ...


@dataclass
class WriteOptions:
    mode: str = "raw"                      # 'raw' pixels or 'jpg'
    jpeg_quality: int = 90
    max_resolution: Optional[int] = None   # longest side in pixels; larger images are resized down by FFCV
    num_workers: int = -1                  # -1 = all cores
    chunksize: int = 256
    force: bool = False                    # overwrite an existing .beton
    progress: bool = True


def channel_stats(source: Any, progress: bool = False) -> tuple[list[float], list[float], list[int]]:
    """Per-channel mean and std (fractions of 255) and the class histogram of a source.

    Uses float64 running sums, so the result does not depend on the order or chunking of the data.
    """
    n_classes = len(source.classes)
    counts = np.zeros(n_classes, dtype=np.int64)
    total = np.zeros(3, dtype=np.float64)
    total_sq = np.zeros(3, dtype=np.float64)
    pixels = 0
    images = getattr(source, "images", None)
    if isinstance(images, np.ndarray):
        labels = np.asarray(source.labels, dtype=np.int64)
        for start in range(0, len(images), 4096):
            chunk = images[start:start + 4096].astype(np.float64).reshape(-1, 3)
            total += chunk.sum(0)
            total_sq += (chunk * chunk).sum(0)
            pixels += chunk.shape[0]
        _check_labels(labels, n_classes, source)
        counts += np.bincount(labels, minlength=n_classes)
    else:
        for i in range(len(source)):
            image, label = source[i]
            flat = np.asarray(image, dtype=np.float64).reshape(-1, 3)
            total += flat.sum(0)
            total_sq += (flat * flat).sum(0)
            pixels += flat.shape[0]
            _check_labels(np.array([label]), n_classes, source, offset=i)
            counts[label] += 1
    mean = total / max(pixels, 1)
    var = np.maximum(total_sq / max(pixels, 1) - mean * mean, 0.0)
    return (mean / 255.0).tolist(), (np.sqrt(var) / 255.0).tolist(), counts.tolist()


def _check_labels(labels: np.ndarray, n_classes: int, source: Any, offset: int = 0) -> None:
    bad = np.nonzero((labels < 0) | (labels >= n_classes))[0]
    if len(bad):
        i = int(bad[0]) + offset
        raise DatasetFileError(f"{getattr(source, 'origin', source.name)}: label {int(labels[bad[0]])} of sample {i} "
                               f"is outside 0..{n_classes - 1}")


def _ffcv_fields(options: WriteOptions) -> dict:
    from ffcv.fields import IntField, RGBImageField

    image_kwargs: dict[str, Any] = {"write_mode": options.mode}
    if options.max_resolution:
        image_kwargs["max_resolution"] = options.max_resolution
    if options.mode == "jpg":
        image_kwargs["jpeg_quality"] = options.jpeg_quality
    return {"image": RGBImageField(**image_kwargs), "label": IntField()}


def write_beton(source: ImageSource, path: str | os.PathLike, options: WriteOptions | None = None) -> dict:
    """Write `source` to `path` (.beton) and its sidecar; return the sidecar dict.

    Raises FileExistsError when `path` exists and options.force is False, DatasetFileError for bad data.
    """
    from ffcv.writer import DatasetWriter

    options = options or WriteOptions()
    if options.mode not in ("raw", "jpg"):
        raise ValueError(f"image mode must be 'raw' or 'jpg', got {options.mode!r}")
    path = Path(path)
    if path.exists() and not options.force:
        raise FileExistsError(f"{path} exists (pass --force to overwrite)")
    if len(source) == 0:
        raise DatasetFileError(f"{getattr(source, 'origin', source.name)}: no images found")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)

    t0 = time.perf_counter()
    mean, std, counts = channel_stats(source)
    first, _ = source[0]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    workers = options.num_workers if options.num_workers > 0 else (os.cpu_count() or 1)
    try:
        writer = DatasetWriter(str(tmp), _ffcv_fields(options), num_workers=workers)
        writer.from_indexed_dataset(source, chunksize=options.chunksize, shuffle_indices=False)
        meta = {
            "format": SIDECAR_FORMAT,
            "dataset": source.name,
            "split": source.split,
            "classes": list(source.classes),
            "num_classes": len(source.classes),
            "num_images": len(source),
            "class_counts": counts,
            "image": {"mode": options.mode, "height": int(first.shape[0]), "width": int(first.shape[1]),
                      "jpeg_quality": options.jpeg_quality if options.mode == "jpg" else None,
                      "max_resolution": options.max_resolution},
            "mean": mean,
            "std": std,
            "source": {"path": str(getattr(source, "origin", "")), "sha256": source.source_checksum()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "bytes": tmp.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # Sidecar first, then the data file: a .beton at its final path always has its sidecar beside it.
        write_json_atomic(sidecar_path(path), meta)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return meta


def _remove_stale_temporaries(path: Path) -> None:
    """Remove temporaries an earlier, killed conversion left beside `path`."""
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid() or not _pid_alive(pid):
            stale.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
