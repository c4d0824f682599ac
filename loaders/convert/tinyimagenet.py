"""Tiny-ImageNet as distributed (tiny-imagenet-200/ or tiny-imagenet-200.zip):

    wnids.txt                                   the 200 class ids (classes are them, sorted)
    train/<wnid>/images/<wnid>_<k>.JPEG          500 per class (plus <wnid>_boxes.txt, ignored)
    val/images/val_<k>.JPEG                      10,000 images in ONE folder ...
    val/val_annotations.txt                      ... labelled here: "val_<k>.JPEG<TAB><wnid><TAB>x0 y0 x1 y1"
    test/images/test_<k>.JPEG                    unlabelled: not a split we can convert
A val/ already rearranged into val/<wnid>/... folders (a common fix-up script) is read as class folders.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from loaders.convert.images import FileImageSource, is_image_name
from loaders.sidecar import DatasetFileError

SPLITS = ("train", "val")


def looks_like_tinyimagenet(names: list[str]) -> bool:
    return "wnids.txt" in names and "train" in names


def _join(*parts: str) -> str:
    return "/".join(p for p in parts if p)


def load_tinyimagenet(tree, root: str, splits: Optional[list[str]], name: str = "tinyimagenet",
                      resize: Optional[int] = None) -> dict[str, FileImageSource]:
    files = tree.files()
    file_set = set(files)
    wnids_member = _join(root, "wnids.txt")
    if wnids_member not in file_set:
        raise DatasetFileError(f"{tree.locate(wnids_member)}: not found")
    wnids = [line.strip() for line in tree.read(wnids_member).decode().splitlines() if line.strip()]
    if len(set(wnids)) != len(wnids) or not wnids:
        raise DatasetFileError(f"{tree.locate(wnids_member)}: empty or repeated class ids")
    classes = sorted(wnids)
    index = {w: i for i, w in enumerate(classes)}
    wanted = splits or list(SPLITS)
    out = {}
    for split in wanted:
        if split == "test":
            raise DatasetFileError(f"{tree.locate(_join(root, 'test'))}: Tiny-ImageNet's test images have no "
                                   f"labels; convert 'train' and 'val'")
        if split not in SPLITS:
            raise DatasetFileError(f"{tree.origin}: tinyimagenet has splits {list(SPLITS)}, not '{split}'")
        if split == "train":
            members, labels = _class_folders(tree, files, _join(root, "train"), index)
        else:
            members, labels = _val(tree, files, file_set, _join(root, "val"), index)
        out[split] = FileImageSource(tree, members, np.asarray(labels), classes, name, split,
                                     origin=tree.locate(_join(root, split)), resize=resize)
    return out


def _class_folders(tree, files: list[str], folder: str, index: dict[str, int]) -> tuple[list[str], list[int]]:
    """<folder>/<wnid>/(images/)?*.JPEG -> members, labels; every wnid folder must hold images."""
    prefix = folder + "/"
    members, labels = [], []
    counts = dict.fromkeys(index, 0)
    for f in files:
        if f.startswith(prefix) and is_image_name(f):
            wnid = f[len(prefix):].split("/", 1)[0]
            if wnid not in index:
                raise DatasetFileError(f"{tree.locate(f)}: class '{wnid}' is not in wnids.txt")
            members.append(f)
            labels.append(index[wnid])
            counts[wnid] += 1
    empty = [w for w in tree.dirs(folder) if w in counts and counts[w] == 0]
    if empty:
        raise DatasetFileError(f"{tree.locate(_join(folder, empty[0]))}: empty class folder (no images)")
    if not members:
        raise DatasetFileError(f"{tree.locate(folder)}: no images")
    return members, labels


def _val(tree, files: list[str], file_set: set[str], folder: str,
         index: dict[str, int]) -> tuple[list[str], list[int]]:
    ann_member = _join(folder, "val_annotations.txt")
    if ann_member not in file_set:
        if any(d in index for d in tree.dirs(folder)):
            return _class_folders(tree, files, folder, index)
        raise DatasetFileError(f"{tree.locate(ann_member)}: not found (Tiny-ImageNet's val labels live there)")
    where = tree.locate(ann_member)
    label_of: dict[str, int] = {}
    for n, line in enumerate(tree.read(ann_member).decode().splitlines(), start=1):
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) < 2:
            raise DatasetFileError(f"{where}:{n}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        fname, wnid = cols[0].strip(), cols[1].strip()
        if wnid not in index:
            raise DatasetFileError(f"{where}:{n}: class '{wnid}' is not in wnids.txt")
        member = _join(folder, "images", fname)
        if member not in file_set:
            raise DatasetFileError(f"{where}:{n}: lists {fname}, but {tree.locate(member)} does not exist")
        label_of[member] = index[wnid]
    images = [f for f in files if f.startswith(folder + "/images/") and is_image_name(f)]
    unlabelled = [f for f in images if f not in label_of]
    if unlabelled:
        raise DatasetFileError(f"{tree.locate(unlabelled[0])}: not listed in {where} "
                               f"({len(unlabelled)} images have no label)")
    if not images:
        raise DatasetFileError(f"{tree.locate(folder + '/images')}: no images")
    return images, [label_of[f] for f in images]
