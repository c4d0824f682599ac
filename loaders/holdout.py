"""A validation set held out of the training split (`data.val_fraction`): which samples, the same on every rank.

Stratified: from each class, round(fraction * its count) samples (at least one where the class has two or more),
drawn by a permutation seeded by (seed, class), so every rank and every loader backend computes the same indices
from the .beton's labels alone. Training draws from the rest (loaders.order.EpochPlan.subset).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

_STREAM = 0x76616C   # the Philox stream of the hold-out draws, apart from the epoch orders' (seed, epoch)


@dataclass(frozen=True)
class Holdout:
    train: np.ndarray   # (N - M,) int64 sample indices left for training, ascending
    val: np.ndarray     # (M,) int64 held-out sample indices, ascending


def split_indices(labels: np.ndarray, fraction: float, seed: int) -> Holdout:
    """labels (N,) -> the stratified hold-out of `fraction` of each class (see the module docstring)."""
    labels = np.asarray(labels, dtype=np.int64)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        take = int(round(fraction * len(members)))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        else:
            take = 0
        rng = np.random.Generator(np.random.Philox(key=[seed & 0xFFFFFFFFFFFFFFFF, _STREAM + int(c)]))
        held.append(members[rng.permutation(len(members))[:take]])
    val = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(labels), dtype=bool)
    mask[val] = False
    return Holdout(train=np.flatnonzero(mask).astype(np.int64), val=val.astype(np.int64))


def holdout_for(train_path: str | Path, fraction: float, seed: int) -> Holdout | None:
    """The hold-out of a training .beton (labels read from its metadata, no decode); None when fraction is 0."""
    if fraction <= 0:
        return None
    from ffcv.reader import Reader

    from loaders.ffcv_loader import beton_labels

    return split_indices(beton_labels(Reader(str(train_path))), fraction, seed)
