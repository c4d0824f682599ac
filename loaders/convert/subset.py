"""Subsets of any writer source chosen by class: a per-class slice, and a held-out test split.

    smallvit convert ../shared/data/cifar10-jpg.tar.gz --out data/cifar10_1k --per-class 1000
    smallvit convert photos/ --out data/photos --test-split 0.2      # photos/<class>/*.jpg: no test split inside

--per-class N keeps the first N samples of each class in the source's own order: small, balanced, reproducible
slices for quick experiments (a CPU self-supervised run, a smoke test of a recipe). --test-split F holds out
round(F x n) of each class's n samples, drawn with a seeded generator (--split-seed), as the test split of a source
that has none. Both are the same files and labels every time, recorded in the sidecar (`source.subset`,
`source.held_out`) with a checksum that covers the choice.
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


def labels_before_decoding(source: Any, option: str) -> np.ndarray:
    """The (N,) int64 labels a source knows without decoding; DatasetFileError naming `option` when it has none."""
    labels = getattr(source, "labels", None)
    if labels is None:
        raise DatasetFileError(f"{getattr(source, 'origin', source.name)}: this format gives no labels before "
                               f"decoding, so {option} cannot choose by class")
    return np.asarray(labels, dtype=np.int64)


def stratified_holdout(labels: np.ndarray, num_classes: int, fraction: float, seed: int) -> np.ndarray:
    """(N,) int labels -> sorted indices of a held-out split: round(fraction * n) of each class's n samples, drawn
    with numpy's default_rng(seed), at least one and never all of a class of two or more (a class of one stays
    out of it)."""
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        n = len(members)
        k = min(max(int(round(fraction * n)), 1), n - 1) if n >= 2 else 0
        held.append(rng.permutation(members)[:k])
    return np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)


class IndexedSubset:
    """Writer source over source[indices] (same interface: len, getitem -> (image (H, W, 3) uint8, label), locate,
    source_checksum, name/split/classes/labels/origin/source_info), optionally under another split name; `note`
    goes into the sidecar's source facts under `key` and the checksum covers the choice of indices."""

    def __init__(self, source: Any, indices: np.ndarray, split: str | None = None, key: str = "subset",
                 note: str = ""):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.labels = labels_before_decoding(source, "a subset")[self.indices]
        self._split = split
        self.source_info = {**getattr(source, "source_info", {}), **({key: note} if note else {})}

    # the writer sets `name` on the source it is given; keep the wrapped one in step
    @property
    def name(self) -> str:
        return self.source.name

    @name.setter
    def name(self, value: str) -> None:
        self.source.name = value

    @property
    def split(self) -> str:
        return self._split or self.source.split

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


class PerClassSubset(IndexedSubset):
    """The first `per_class` samples of each class of `source`, in the source's own order."""

    def __init__(self, source: Any, per_class: int):
        if per_class < 1:
            raise ValueError(f"--per-class must be a positive number of images, got {per_class}")
        indices = first_per_class(labels_before_decoding(source, "--per-class"), len(source.classes), per_class)
        super().__init__(source, indices, note=f"first {per_class} images per class in source order "
                                               f"({len(indices)} of {len(source)})")


def hold_out_test(source: Any, fraction: float, seed: int) -> dict[str, IndexedSubset]:
    """{'train': the rest, 'test': a stratified `fraction` of every class} of a one-split source."""
    if not 0 < fraction < 1:
        raise ValueError(f"--test-split must be a fraction between 0 and 1, got {fraction}")
    test = stratified_holdout(labels_before_decoding(source, "--test-split"), len(source.classes), fraction, seed)
    train = np.setdiff1d(np.arange(len(source)), test)
    note = (f"split in two by --test-split {fraction:g} --split-seed {seed}: test = {len(test)} images "
            f"(round({fraction:g} x each class), drawn at random), train = the other {len(train)}")
    return {"train": IndexedSubset(source, train, "train", "held_out", note),
            "test": IndexedSubset(source, test, "test", "held_out", note)}
