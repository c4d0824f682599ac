"""A per-class subset of any writer source: the first N samples of each class, in the source's own order.

    smallvit convert ../shared/data/cifar10-jpg.tar.gz --out data/cifar10_1k --per-class 1000

Small, balanced, reproducible slices of a real dataset for quick experiments (a CPU self-supervised run, a smoke
test of a recipe): the same files and labels every time, recorded in the sidecar (`source.subset`) with a checksum
that covers the choice.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from loaders.sidecar import DatasetFileError


def first_per_class(labels: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
    """(N,) int labels -> sorted indices of the first `per_class` samples of every class (fewer where a class has
    fewer)."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    for c in range(num_classes):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return np.flatnonzero(keep)


class PerClassSubset:
    """Writer source over `source` keeping the first `per_class` samples of each class (same interface: len,
    getitem -> (image (H, W, 3) uint8, label), locate, source_checksum, name/split/classes/labels/origin)."""

    def __init__(self, source: Any, per_class: int):
        if per_class < 1:
            raise ValueError(f"--per-class must be a positive number of images, got {per_class}")
        labels = getattr(source, "labels", None)
        if labels is None:
            raise DatasetFileError(f"{getattr(source, 'origin', source.name)}: this format gives no labels before "
                                   f"decoding, so --per-class cannot choose a subset")
        self.source = source
        self.per_class = per_class
        self.indices = first_per_class(labels, len(source.classes), per_class)
        self.labels = np.asarray(labels, dtype=np.int64)[self.indices]
        self.source_info = {**getattr(source, "source_info", {}),
                            "subset": f"first {per_class} images per class in source order "
                                      f"({len(self.indices)} of {len(source)})"}

    # the writer sets `name` on the source it is given; keep the wrapped one in step
    @property
    def name(self) -> str:
        return self.source.name

    @name.setter
    def name(self, value: str) -> None:
        self.source.name = value

    @property
    def split(self) -> str:
        return self.source.split

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def origin(self) -> str:
        return getattr(self.source, "origin", "") or self.source.name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.source[int(self.indices[i])]

    def locate(self, i: int) -> str:
        return self.source.locate(int(self.indices[i]))

    def source_checksum(self) -> str:
        h = hashlib.sha256(self.source.source_checksum().encode())
        h.update(self.indices.astype(np.int64).tobytes())
        return h.hexdigest()
