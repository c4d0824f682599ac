"""ImageFolder trees (CINIC-10, the CIFAR-10 JPEG copy, any class-per-folder set), in a folder or an archive.

    root/train/<class>/*.jpg|png   root/test/<class>/...    (also val/ or valid/: CINIC-10 has train/valid/test)
or a root whose subfolders are the classes (one split). Classes are the sorted class folder names of the first
split (train when present); every other split must use only those. An empty class folder is an error.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from loaders.convert.images import FileImageSource, is_image_name
from loaders.sidecar import DatasetFileError

SPLIT_FOLDERS = ("train", "val", "valid", "test")


def has_split_folders(names: list[str]) -> bool:
    return any(n in SPLIT_FOLDERS for n in names)


def split_folders(tree, root: str) -> list[str]:
    return [d for d in tree.dirs(root) if d in SPLIT_FOLDERS]


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def load_imagefolder(tree, root: str, splits: Optional[list[str]], name: str,
                     resize: Optional[int] = None) -> dict[str, FileImageSource]:
    """{split: FileImageSource} for an ImageFolder tree whose dataset root is `root` inside `tree`."""
    present = split_folders(tree, root)
    files = tree.files()
    if present:
        order = [s for s in SPLIT_FOLDERS if s in present]
        wanted = splits or order
        for s in wanted:
            if s not in present:
                raise DatasetFileError(f"{tree.locate(_join(root, s))}: no such split folder (has {order})")
        folders = {s: _join(root, s) for s in wanted}
        class_split = "train" if "train" in present else order[0]
        classes = tree.dirs(_join(root, class_split))
        class_origin = _join(root, class_split)
    else:
        if splits and len(splits) != 1:
            raise DatasetFileError(f"{tree.origin}: holds class folders for one split; name it with one --splits")
        wanted = splits or ["train"]
        folders = {wanted[0]: root}
        classes = tree.dirs(root)
        class_origin = root
    if not classes:
        raise DatasetFileError(f"{tree.locate(class_origin) if class_origin else tree.origin}: no class folders "
                               f"(expected <split>/<class>/<image> or <class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for split, folder in folders.items():
        prefix = folder + "/" if folder else ""
        members, labels = [], []
        seen = {c: 0 for c in classes}
        for f in files:
            if not f.startswith(prefix) or not is_image_name(f):
                continue
            rest = f[len(prefix):]
            if "/" not in rest:
                raise DatasetFileError(f"{tree.locate(f)}: image outside a class folder")
            cls = rest.split("/", 1)[0]
            if cls not in index:
                raise DatasetFileError(f"{tree.locate(_join(folder, cls))}: class folder '{cls}' is not one of the "
                                       f"{len(classes)} classes of {tree.locate(class_origin) or tree.origin}")
            members.append(f)
            labels.append(index[cls])
            seen[cls] += 1
        for cls in tree.dirs(folder):
            if cls in seen and seen[cls] == 0:
                raise DatasetFileError(f"{tree.locate(_join(folder, cls))}: empty class folder (no images)")
        if not members:
            raise DatasetFileError(f"{tree.locate(folder) if folder else tree.origin}: no images")
        out[split] = FileImageSource(tree, members, np.asarray(labels), classes, name, split,
                                     origin=tree.locate(folder) if folder else tree.origin, resize=resize)
    return out
