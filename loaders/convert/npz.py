"""numpy .npz splits: `images` uint8 (N, H, W, 3) (or (N, H, W) / (N, H, W, 1) grey, repeated to RGB) and
`labels` (N,) integers, optionally `classes` (names). Either one split per file (train.npz, test.npz, or any name
with --splits) or several in one file as `<split>_images` / `<split>_labels`.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from loaders.convert.arrays import ArraySource
from loaders.convert.trees import file_sha256
from loaders.sidecar import DatasetFileError


def _rgb(images: np.ndarray, where: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise DatasetFileError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DatasetFileError(f"{where}: images must be (N, H, W, 3) (or grey (N, H, W)), got {images.shape}")
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=3)
    return np.ascontiguousarray(images)


def _classes(arrays, labels: list[np.ndarray]) -> list[str]:
    if "classes" in arrays:
        return [str(c) for c in np.asarray(arrays["classes"]).tolist()]
    top = max((int(y.max()) for y in labels if len(y)), default=-1)
    return [str(i) for i in range(top + 1)]


def _split_arrays(arrays, prefix: str, where: str) -> tuple[np.ndarray, np.ndarray]:
    ik, lk = f"{prefix}images", f"{prefix}labels"
    for key in (ik, lk):
        if key not in arrays:
            raise DatasetFileError(f"{where}: lacks key '{key}' (has {sorted(arrays)})")
    images, labels = _rgb(np.asarray(arrays[ik]), f"{where}:{ik}"), np.asarray(arrays[lk]).reshape(-1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise DatasetFileError(f"{where}:{lk}: labels must be integers, got {labels.dtype}")
    if len(labels) != len(images):
        raise DatasetFileError(f"{where}: {len(images)} images but {len(labels)} labels")
    return images, labels.astype(np.int64)


def _open(path: Path):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetFileError(f"{path}: not a readable .npz ({type(exc).__name__}: {exc})") from None


def load_npz_file(path: Path, splits: list[str] | None, name: str) -> dict[str, ArraySource]:
    with _open(path) as arrays:
        keys = set(arrays.files)
        prefixed = sorted(k[:-len("_images")] for k in keys if k.endswith("_images"))
        if "images" in keys:
            split = (splits or [path.stem if path.stem in ("train", "test", "val", "valid") else "train"])
            if len(split) != 1:
                raise DatasetFileError(f"{path}: holds one split ('images'/'labels'); name it with one --splits")
            found = {split[0]: _split_arrays(arrays, "", str(path))}
        elif prefixed:
            wanted = splits or prefixed
            for s in wanted:
                if s not in prefixed:
                    raise DatasetFileError(f"{path}: has splits {prefixed}, not '{s}'")
            found = {s: _split_arrays(arrays, f"{s}_", str(path)) for s in wanted}
        else:
            raise DatasetFileError(f"{path}: lacks key 'images' (or '<split>_images'); has {sorted(keys)}")
        classes = _classes(arrays, [y for _, y in found.values()])
    checksum = file_sha256(path)
    return {s: ArraySource(x, y, classes, name, s, origin=str(path), checksum=checksum) for s, (x, y) in found.items()}


def load_npz(path: Path, splits: list[str] | None, name: str) -> dict[str, ArraySource]:
    """A .npz file, or a folder of <split>.npz files."""
    if path.is_file():
        return load_npz_file(path, splits, name)
    files = {p.stem: p for p in sorted(path.glob("*.npz"))}
    wanted = splits or list(files)
    out = {}
    for s in wanted:
        if s not in files:
            raise DatasetFileError(f"{path / (s + '.npz')}: not found (split '{s}')")
        out.update(load_npz_file(files[s], [s], name))
    classes = max((src.classes for src in out.values()), key=len)  # every split labels with the same list
    for src in out.values():
        if src.classes != classes[:len(src.classes)]:
            raise DatasetFileError(f"{src.origin}: its classes {src.classes} differ from {classes}")
        src.classes = list(classes)
    return out
