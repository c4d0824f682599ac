"""SVHN from the official MATLAB files: {train,test,extra}_32x32.mat with X (32, 32, 3, N) uint8 and y (N, 1).

y holds 1..10 and 10 means the digit 0, so label = y % 10 and class i is the digit i.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from loaders.convert.arrays import ArraySource
from loaders.convert.trees import file_sha256
from loaders.sidecar import DatasetFileError

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat", "extra": "extra_32x32.mat"}
DEFAULT_SPLITS = ["train", "test"]


def svhn_split_of(path: Path) -> str:
    """'train' / 'test' / 'extra' from a .mat file name (train_32x32.mat, my_test.mat, ...)."""
    stem = path.stem.lower()
    for split in SVHN_FILES:
        if stem.startswith(split) or stem.split("_")[0] == split:
            return split
    return "train"


def load_svhn_mat(path: Path, split: str) -> ArraySource:
    from scipy.io import loadmat

    try:
        mat = loadmat(str(path))
    except NotImplementedError:
        raise DatasetFileError(f"{path}: MATLAB v7.3 (HDF5) file; the official SVHN files are v5 — "
                               f"re-save with -v7 or fetch the official file") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises ValueError, TypeError, OSError on bad files
        raise DatasetFileError(f"{path}: not a readable .mat file ({type(exc).__name__}: {exc})") from None
    for key in ("X", "y"):
        if key not in mat:
            have = sorted(k for k in mat if not k.startswith("__"))
            raise DatasetFileError(f"{path}: lacks key '{key}' (has {have}); expected SVHN's X (32, 32, 3, N) "
                                   f"and y (N, 1)")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[2] != 3:
        raise DatasetFileError(f"{path}: X must be uint8 (H, W, 3, N), got {x.dtype} {x.shape}")
    if len(y) != x.shape[3]:
        raise DatasetFileError(f"{path}: X holds {x.shape[3]} images but y {len(y)} labels")
    bad = np.nonzero((y < 1) | (y > 10))[0]
    if len(bad):
        i = int(bad[0])
        raise DatasetFileError(f"{path}[{i}]: label y={int(y[i])} of sample {i} is outside 1..10 "
                               f"(SVHN writes digit 0 as 10)")
    images = np.ascontiguousarray(x.transpose(3, 0, 1, 2))
    return ArraySource(images, (y % 10).astype(np.int64), [str(d) for d in range(10)], "svhn", split,
                       origin=str(path), checksum=file_sha256(path))


def svhn_files(folder: Path) -> dict[str, Path]:
    return {s: folder / f for s, f in SVHN_FILES.items() if (folder / f).is_file()}


def load_svhn(path: Path, splits: list[str] | None) -> dict[str, ArraySource]:
    """One .mat file (its split from the name) or a folder of the official files."""
    if path.is_file():
        split = svhn_split_of(path)
        if splits and splits != [split]:
            raise DatasetFileError(f"{path}: one .mat file holds one split ('{split}'), not {splits}")
        return {split: load_svhn_mat(path, split)}
    found = svhn_files(path)
    splits = splits or [s for s in DEFAULT_SPLITS if s in found]
    out = {}
    for split in splits:
        if split not in SVHN_FILES:
            raise DatasetFileError(f"{path}: svhn has splits {list(SVHN_FILES)}, not '{split}'")
        if split not in found:
            raise DatasetFileError(f"{path / SVHN_FILES[split]}: not found (split '{split}')")
        out[split] = load_svhn_mat(found[split], split)
    return out
