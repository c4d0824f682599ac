"""CIFAR-10 / CIFAR-100 from the official python archives or their extracted pickle batches.

    cifar-10-python.tar.gz  -> cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    cifar-100-python.tar.gz -> cifar-100-python/{train, test, meta}
Each batch is a pickled dict: b'data' uint8 (N, 3072) in channel-major order (1024 R, 1024 G, 1024 B, rows of
32), b'labels' (CIFAR-10) or b'fine_labels' / b'coarse_labels' (CIFAR-100). The unpickler only admits numpy's
array reconstruction, so a hostile "batch" cannot run code.
"""
from __future__ import annotations

import io
import pickle
from typing import Optional

import numpy as np

from loaders.convert.arrays import ArraySource
from loaders.sidecar import DatasetFileError

CIFAR10_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
CIFAR100_SPLITS = {"train": ["train"], "test": ["test"]}
CIFAR10_META, CIFAR100_META = "batches.meta", "meta"


def cifar_variant(files: list[str]) -> Optional[str]:
    """'cifar10', 'cifar100' or None from the member names of a tree."""
    by_folder: dict[str, set[str]] = {}
    for f in files:
        folder, _, base = f.rpartition("/")
        by_folder.setdefault(folder, set()).add(base)
    for names in by_folder.values():
        if "data_batch_1" in names or "test_batch" in names:
            return "cifar10"
        if {"train", "test", "meta"} <= names:
            return "cifar100"
    return None


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module, name):
        numpy_array = module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar",
                                                                    "_frombuffer")
        if numpy_array or (module, name) == ("_codecs", "encode"):  # protocol-2 pickles write bytes via encode
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (a CIFAR batch holds only arrays)")


def unpickle_batch(data: bytes, where: str) -> dict:
    try:
        batch = _ArraysOnly(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - pickle raises many types on damaged input
        raise DatasetFileError(f"{where}: not a readable CIFAR pickle batch ({type(exc).__name__}: {exc})") from None
    if not isinstance(batch, dict):
        raise DatasetFileError(f"{where}: not a CIFAR batch (a {type(batch).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _find(files: list[str], base: str, where: str) -> str:
    hits = [f for f in files if f.rpartition("/")[2] == base]
    if not hits:
        raise DatasetFileError(f"{where}: no '{base}' batch inside")
    return min(hits, key=len)


def load_cifar(tree, variant: str, splits: list[str], labels: str = "fine") -> dict[str, ArraySource]:
    """{split: ArraySource} for the requested splits of a CIFAR tree (folder or archive)."""
    files = tree.files()
    layout = CIFAR10_SPLITS if variant == "cifar10" else CIFAR100_SPLITS
    for s in splits:
        if s not in layout:
            raise DatasetFileError(f"{tree.origin}: {variant} has splits {sorted(layout)}, not '{s}'")
    if variant == "cifar100" and labels not in ("fine", "coarse"):
        raise ValueError(f"--labels must be 'fine' or 'coarse', got {labels!r}")
    meta_member = _find(files, CIFAR10_META if variant == "cifar10" else CIFAR100_META, tree.origin)
    meta = unpickle_batch(tree.read(meta_member), tree.locate(meta_member))
    names_key = "label_names" if variant == "cifar10" else f"{labels}_label_names"
    labels_key = "labels" if variant == "cifar10" else f"{labels}_labels"
    if names_key not in meta:
        raise DatasetFileError(f"{tree.locate(meta_member)}: lacks key '{names_key}'")
    classes = [c.decode() if isinstance(c, bytes) else str(c) for c in meta[names_key]]
    name = "cifar10" if variant == "cifar10" else ("cifar100" if labels == "fine" else "cifar100_coarse")
    out = {}
    for split in splits:
        images, targets, parts, members = [], [], [], []
        for base in layout[split]:
            member = _find(files, base, tree.origin)
            where = tree.locate(member)
            members.append(member)
            batch = unpickle_batch(tree.read(member), where)
            for key in ("data", labels_key):
                if key not in batch:
                    raise DatasetFileError(f"{where}: lacks key '{key}' (has {sorted(batch)})")
            data = np.asarray(batch["data"])
            y = np.asarray(batch[labels_key])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise DatasetFileError(f"{where}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
            if y.ndim != 1 or len(y) != len(data) or not np.issubdtype(y.dtype, np.integer):
                raise DatasetFileError(f"{where}: '{labels_key}' must be {len(data)} integers, got "
                                       f"{y.dtype} {y.shape}")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            targets.append(y.astype(np.int64))
            parts.append((where, len(data)))
        checksum = tree.checksum(members)
        out[split] = ArraySource(np.ascontiguousarray(np.concatenate(images)), np.concatenate(targets), classes,
                                 name, split, origin=tree.origin, checksum=checksum, parts=parts,
                                 source_info={"labels": labels} if variant == "cifar100" else {})
    return out
