"""ImageFolder trees (CINIC-10, the CIFAR-10 JPEG copy, any class-per-folder set), in a folder or an archive.

    root/train/<class>/*.jpg|png   root/test/<class>/...    (also val/ or valid/: CINIC-10 has train/valid/test)
or a root whose subfolders are the classes (one split). Classes are the sorted class folder names of the first
split (train when present); every other split must use only those. An empty class folder is an error.

`list_image_folder` is the one listing of such a tree: the converter and the folder loaders (DALI, torchvision)
all use it, so sample indices and counts agree. Its rules: class folders are the sorted non-hidden subfolders;
a class holds every image file below its folder (subfolders included), sorted by path; hidden files and folders
(a name starting with '.') are skipped; image files are torchvision's extensions (IMAGE_EXTENSIONS, any case);
other files are counted in `ignored` and left out.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from loaders.convert.images import IMAGE_EXTENSIONS, FileImageSource, is_hidden
from loaders.sidecar import DatasetFileError

SPLIT_FOLDERS = ("train", "val", "valid", "test")
log = logging.getLogger("smallvit.loaders")


def has_split_folders(names: list[str]) -> bool:
    return any(n in SPLIT_FOLDERS for n in names)


def split_folders(tree, root: str) -> list[str]:
    return [d for d in tree.dirs(root) if d in SPLIT_FOLDERS]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def class_folders(tree, folder: str) -> list[str]:
    """The sorted non-hidden subfolder names of `folder` inside `tree`."""
    return [d for d in tree.dirs(folder) if not d.startswith(".")]


@dataclass
class FolderListing:
    members: list[str]                  # tree member paths, class by class, sorted by path within a class
    labels: np.ndarray                  # (N,) int64, index into classes
    classes: list[str]
    ignored: dict[str, int] = field(default_factory=dict)   # extension -> files left out as not images


def list_image_folder(tree, folder: str, classes: Optional[list[str]] = None) -> FolderListing:
    """The images of one split: `folder` ('' = the tree's root) holds one subfolder per class.

    classes: the class list to label with (a test split uses the training split's); None: this folder's own.
    Raises DatasetFileError naming the file or folder at fault: no class folders, an image outside a class
    folder, a class folder not in `classes`, an empty class folder, no images.
    """
    own = class_folders(tree, folder)
    classes = own if classes is None else list(classes)
    where = tree.locate(folder) if folder else tree.origin
    if not classes:
        raise DatasetFileError(f"{where}: no class folders (expected <split>/<class>/<image> or <class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    prefix = folder + "/" if folder else ""
    found: list[tuple[int, str, str]] = []
    ignored: dict[str, int] = {}
    for f in tree.files():
        if not f.startswith(prefix):
            continue
        rest = f[len(prefix):]
        if is_hidden(rest):
            continue
        if not rest.lower().endswith(IMAGE_EXTENSIONS):
            ext = Path(rest).suffix.lower() or "(none)"
            ignored[ext] = ignored.get(ext, 0) + 1
            continue
        if "/" not in rest:
            raise DatasetFileError(f"{tree.locate(f)}: image outside a class folder")
        cls, inner = rest.split("/", 1)
        if cls not in index:
            raise DatasetFileError(f"{tree.locate(_join(folder, cls))}: class folder '{cls}' is not one of the "
                                   f"{len(classes)} classes of the first split")
        found.append((index[cls], inner, f))
    found.sort()
    counts = np.bincount([k for k, _, _ in found], minlength=len(classes))
    for cls in own:
        if cls in index and counts[index[cls]] == 0:
            raise DatasetFileError(f"{tree.locate(_join(folder, cls))}: empty class folder (no images)")
    if not found:
        raise DatasetFileError(f"{where}: no images")
    return FolderListing([f for _, _, f in found], np.array([k for k, _, _ in found], dtype=np.int64), classes,
                         ignored)


def image_folder_files(root: str | Path) -> tuple[list[str], np.ndarray, list[str]]:
    """One split's folder -> (file paths, labels (N,) int64, classes): the folder loaders' view of the listing
    `smallvit convert` writes (same order, same count). Symlink loops and skipped files are logged."""
    from loaders.convert.trees import DirTree

    root = Path(root)
    if not root.is_dir():
        raise DatasetFileError(f"{root}: not an ImageFolder tree (no such folder)")
    tree = DirTree(root)
    listing = list_image_folder(tree, "")
    for warning in tree.warnings:
        log.warning("warning: %s", warning)
    if listing.ignored:
        log.warning("warning: %s", ignored_line(root, listing.ignored))
    return [str(root / m) for m in listing.members], listing.labels, listing.classes


def ignored_line(where, ignored: dict[str, int]) -> str:
    kinds = ", ".join(f"{ext}: {n}" for ext, n in sorted(ignored.items()))
    return (f"{where}: left out {sum(ignored.values())} file(s) that are not images of the kinds read "
            f"({kinds}; images are {' '.join(IMAGE_EXTENSIONS)})")


def load_imagefolder(tree, root: str, splits: Optional[list[str]], name: str,
                     resize: Optional[int] = None) -> dict[str, FileImageSource]:
    """{split: FileImageSource} for an ImageFolder tree whose dataset root is `root` inside `tree`.

    Notes about left-out files go to `tree.warnings`."""
    present = split_folders(tree, root)
    if present:
        order = [s for s in SPLIT_FOLDERS if s in present]
        wanted = splits or order
        for s in wanted:
            if s not in present:
                raise DatasetFileError(f"{tree.locate(_join(root, s))}: no such split folder (has {order})")
        folders = {s: _join(root, s) for s in wanted}
        class_split = "train" if "train" in present else order[0]
    else:
        if splits and len(splits) != 1:
            raise DatasetFileError(f"{tree.origin}: holds class folders for one split; name it with one --splits")
        wanted = splits or ["train"]
        folders = {wanted[0]: root}
        class_split = None
    class_origin = _join(root, class_split) if class_split else root
    classes = class_folders(tree, class_origin)
    if not classes:
        raise DatasetFileError(f"{tree.locate(class_origin) if class_origin else tree.origin}: no class folders "
                               f"(expected <split>/<class>/<image> or <class>/<image>)")
    out = {}
    for split, folder in folders.items():
        listing = list_image_folder(tree, folder, classes)
        origin = tree.locate(folder) if folder else tree.origin
        if listing.ignored:
            tree.warnings.append(ignored_line(origin, listing.ignored))
        out[split] = FileImageSource(tree, listing.members, listing.labels, classes, name, split, origin=origin,
                                     resize=resize)
    return out
