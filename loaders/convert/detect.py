"""From what the user points at (a path or a dataset word) to {split: writer source}: the format is detected.

    digits                                   the sklearn digits demo set (embedded)
    cifar10 | cifar100 | svhn | tinyimagenet the official files in the download folder (fetched with --download)
    *.npz, or a folder of <split>.npz        numpy arrays
    *.mat, or a folder of *_32x32.mat        SVHN
    a folder or archive (.tar.gz/.tgz/.tar/.zip) holding
        CIFAR pickle batches                 cifar10 / cifar100 (fine or coarse labels)
        wnids.txt + train/ + val/            Tiny-ImageNet
        class folders                        ImageFolder (CINIC-10, the CIFAR-10 JPEG copy, ...)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from loaders.convert import download as dl
from loaders.convert.cifar import cifar_variant, load_cifar
from loaders.convert.imagefolder import has_split_folders, load_imagefolder
from loaders.convert.npz import load_npz
from loaders.convert.svhn import load_svhn, svhn_files
from loaders.convert.tinyimagenet import load_tinyimagenet, looks_like_tinyimagenet
from loaders.convert.trees import common_root, is_archive, open_tree
from loaders.sidecar import DatasetFileError


@dataclass
class OpenedDataset:
    name: str                  # dataset name recorded in the sidecars
    format: str                # 'cifar', 'svhn', 'imagefolder', 'tinyimagenet', 'npz', 'digits'
    origin: str                # what was read
    sources: dict              # split -> writer source, in the order the splits will be written
    warnings: list = field(default_factory=list)   # notes for the user (symlinks not followed, files left out)


def guess_name(path: Path) -> str:
    """A dataset name from a file or folder name: 'cifar10-jpg.tar.gz' -> 'cifar10', 'CINIC-10' -> 'cinic10'."""
    stem = path.name.lower()
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip", ".npz", ".mat", ".tar.bz2", ".tar.xz"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    flat = re.sub(r"[^a-z0-9]", "", stem)
    for known in ("cifar100", "cifar10", "cinic10", "cinic", "svhn", "tinyimagenet", "mnist", "fashionmnist"):
        if flat.startswith(known):
            return {"cinic": "cinic10"}.get(known, known)
    return re.sub(r"[^a-z0-9_]+", "_", stem).strip("_") or "imagefolder"


def open_dataset(source: str, splits: Optional[list[str]] = None, labels: str = "fine",
                 resize: Optional[int] = None, download: bool = False, download_dir: Optional[Path] = None,
                 mirror: Optional[str] = None, progress: bool = True) -> OpenedDataset:
    """Read the metadata (and, for array formats, the arrays) of the requested splits; raise DatasetFileError
    naming the file for anything unusable. Nothing is written except a requested download."""
    if source.lower() == "digits":
        from loaders.convert.digits import digits_source

        wanted = splits or ["train", "test"]
        return OpenedDataset("digits", "digits", "sklearn:load_digits", {s: digits_source(s) for s in wanted})
    path = Path(source).expanduser()
    name = dl.known_name(source)
    if name and not path.exists():
        folder = Path(download_dir) if download_dir else Path("downloads")
        files = dl.locate_or_fetch(name, folder, splits, download, mirror, progress)
        path = files[0].parent if name == "svhn" else files[0]
    elif download:
        raise DatasetFileError(f"{source}: --download takes a dataset name ({', '.join(dl.RESOURCES)}), "
                               f"not a path")
    if not path.exists():
        raise DatasetFileError(f"{path}: no such file or folder")

    if path.suffix.lower() == ".npz" or (path.is_dir() and any(path.glob("*.npz"))):
        name = guess_name(path)
        return OpenedDataset(name, "npz", str(path), load_npz(path, splits, name))
    if path.suffix.lower() == ".mat" or (path.is_dir() and svhn_files(path)):
        return OpenedDataset("svhn", "svhn", str(path), load_svhn(path, splits))
    if not (path.is_dir() or is_archive(path)):
        raise DatasetFileError(f"{path}: unknown format (expected a folder, .tar.gz/.tgz/.tar/.zip, .mat or .npz)")

    tree = open_tree(path)
    files = tree.files()
    variant = cifar_variant(files)
    if variant:
        sources = load_cifar(tree, variant, splits or ["train", "test"], labels)
        return OpenedDataset(next(iter(sources.values())).name, "cifar", str(path), sources)
    root = common_root(tree, looks_like_tinyimagenet)
    if looks_like_tinyimagenet(tree.dirs(root) + [f.rpartition("/")[2] for f in files
                                                 if f.rpartition("/")[0] == root]):
        return OpenedDataset("tinyimagenet", "tinyimagenet", str(path),
                             load_tinyimagenet(tree, root, splits, "tinyimagenet", resize), tree.warnings)
    root = common_root(tree, has_split_folders)
    if not root and not has_split_folders(tree.dirs("")):
        root = _single_wrapper(tree)
    name = guess_name(path)
    sources = load_imagefolder(tree, root, splits, name, resize)
    return OpenedDataset(name, "imagefolder", str(path), sources, tree.warnings)


def _single_wrapper(tree) -> str:
    """'wrap/' when everything sits in one folder that itself holds only folders (class folders one level down)."""
    root = ""
    while True:
        subdirs = tree.dirs(root)
        prefix = root + "/" if root else ""
        direct_files = [f for f in tree.files() if f.startswith(prefix) and "/" not in f[len(prefix):]]
        if len(subdirs) != 1 or direct_files:
            return root
        inner = f"{prefix}{subdirs[0]}"
        inner_files = [f for f in tree.files() if f.startswith(inner + "/") and "/" not in f[len(inner) + 1:]]
        if inner_files or not tree.dirs(inner):
            return root
        root = inner
