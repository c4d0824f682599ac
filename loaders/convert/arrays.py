"""An in-memory split (images (N, H, W, 3) uint8 + labels) as a writer source.

Array-backed formats (CIFAR pickle batches, SVHN .mat, .npz, the digits demo) all end here; `parts` records which
file each run of samples came from, so an error names the file and the index inside it.
"""
from __future__ import annotations

import hashlib
from typing import Optional

import numpy as np


class ArraySource:
    """An in-memory split: images (N, H, W, 3) uint8 and labels (N,) as a writer source."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: list[str], name: str, split: str,
                 origin: str = "", checksum: str | None = None, parts: Optional[list[tuple[str, int]]] = None,
                 source_info: Optional[dict] = None):
        """parts: [(file, number of samples from it), ...] in sample order (default: one part, `origin`)."""
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
        self.parts = parts or [(self.origin, len(images))]
        self.source_info = dict(source_info or {})
        self._checksum = checksum

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        return self.images[i], int(self.labels[i])

    def locate(self, i: int) -> str:
        """'file[index inside that file]' of sample i."""
        start = 0
        for where, count in self.parts:
            if i < start + count:
                return f"{where}[{i - start}]"
            start += count
        return f"{self.origin}[{i}]"

    def source_checksum(self) -> str:
        if self._checksum is None:
            h = hashlib.sha256()
            h.update(np.ascontiguousarray(self.images).tobytes())
            h.update(self.labels.tobytes())
            self._checksum = h.hexdigest()
        return self._checksum
