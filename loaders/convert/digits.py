"""The embedded default dataset: scikit-learn's 8x8 handwritten digits, upscaled to 32x32 RGB.

It ships inside scikit-learn (no network), so the demo and the tests always have real images. 1,797 images,
10 classes; the split is fixed (stratified, 20% test, seed 0): 1,437 train / 360 test.
Each 8x8 pixel (0..16) becomes a 4x4 block of grey value round(v * 255 / 16).
"""
from __future__ import annotations

import hashlib

import numpy as np

SIDE = 32
TEST_FRACTION = 0.2
SPLIT_SEED = 0


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,) int64) for split 'train' or 'test'."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"digits has splits 'train' and 'test', not {split!r}")
    bunch = load_digits()
    grey = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)           # (N, 8, 8)
    big = grey.repeat(SIDE // 8, axis=1).repeat(SIDE // 8, axis=2)            # (N, 32, 32)
    rgb = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=3))          # (N, 32, 32, 3)
    labels = bunch.target.astype(np.int64)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels)
    chosen = np.sort(train_idx if split == "train" else test_idx)
    return rgb[chosen], labels[chosen]


class ArraySource:
    """An in-memory split: images (N, H, W, 3) uint8 and labels (N,) as a writer source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, split: str,
                 origin: str = "", checksum: str | None = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"{origin or name}: images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise ValueError(f"{origin or name}: {len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.classes = list(classes)
        self.name = name
        self.split = split
        self.origin = origin or f"<{name}:{split}>"
        self._checksum = checksum

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])

    def source_checksum(self) -> str:
        if self._checksum is None:
            h = hashlib.sha256()
            h.update(np.ascontiguousarray(self.images).tobytes())
            h.update(self.labels.tobytes())
            self._checksum = h.hexdigest()
        return self._checksum


def digits_source(split: str) -> ArraySource:
    images, labels = digits_arrays(split)
    return ArraySource(images, labels, [str(d) for d in range(10)], "digits", split, origin="sklearn:load_digits")
