"""Small datasets in their real on-disk layouts, generated for the conversion tests (no test functions here).

Each maker returns the expected content: {split: (images uint8 (N, H, W, 3), labels (N,))}, in the order the
converter writes samples (batch order for arrays; sorted member paths for image files).
"""
from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from loaders.convert.command import main as convert_main


def smooth_images(rng: np.random.Generator, n: int, h: int = 32, w: int = 32) -> np.ndarray:
    """Images JPEG compresses well (low-frequency patterns with mild noise): uint8 (n, h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    out = np.empty((n, h, w, 3), np.uint8)
    for i in range(n):
        fx, fy, ph = rng.uniform(0.05, 0.25, 3)
        base = np.stack([np.sin(fx * x + ph * c) * np.cos(fy * y + c) for c in range(3)], -1)
        img = 127.5 + 100 * base + rng.normal(0, 2, (h, w, 3))
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return out


def _pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def make_cifar10(folder: Path, per_batch: int = 6, n_test: int = 8, archive: bool = True, seed: int = 0,
                 bad_label_at: tuple[str, int] | None = None):
    """cifar-10-python.tar.gz (or the extracted cifar-10-batches-py/) with real pickle batches."""
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    members, expected = {}, {"train": ([], []), "test": ([], [])}
    for batch, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        if bad_label_at and bad_label_at[0] == batch:
            labels[bad_label_at[1]] = 10
        data = images.transpose(0, 3, 1, 2).reshape(n, 3072)  # channel-major rows, as in the official files
        members[batch] = _pickle({b"batch_label": batch.encode(), b"labels": labels, b"data": data,
                                  b"filenames": [f"img_{k}.png".encode() for k in range(n)]})
        split = "test" if batch == "test_batch" else "train"
        expected[split][0].append(images)
        expected[split][1].append(np.array(labels))
    members["batches.meta"] = _pickle({b"label_names": [c.encode() for c in names], b"num_cases_per_batch": 10000,
                                       b"num_vis": 3072})
    members["readme.html"] = b"<html></html>"
    path = _write_members(folder, "cifar-10-python.tar.gz", "cifar-10-batches-py", members, archive)
    return path, {s: (np.concatenate(x), np.concatenate(y)) for s, (x, y) in expected.items()}, names


def make_cifar100(folder: Path, n_train: int = 12, n_test: int = 6, archive: bool = True, seed: int = 1):
    rng = np.random.default_rng(seed)
    fine = [f"fine{k}" for k in range(100)]
    coarse = [f"coarse{k}" for k in range(20)]
    members, expected = {}, {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        f = rng.integers(0, 100, n)
        c = f // 5
        members[split] = _pickle({b"filenames": [b"x.png"] * n, b"batch_label": split.encode(),
                                  b"fine_labels": f.tolist(), b"coarse_labels": c.tolist(),
                                  b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072)})
        expected[split] = (images, f, c)
    members["meta"] = _pickle({b"fine_label_names": [x.encode() for x in fine],
                               b"coarse_label_names": [x.encode() for x in coarse]})
    path = _write_members(folder, "cifar-100-python.tar.gz", "cifar-100-python", members, archive)
    return path, expected, fine, coarse


def _write_members(folder: Path, archive_name: str, inner: str, members: dict[str, bytes], archive: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if archive:
        path = folder / archive_name
        with tarfile.open(path, "w:gz") as tar:
            for name, data in members.items():
                _add_bytes(tar, f"{inner}/{name}", data)
        return path
    root = folder / inner
    root.mkdir(parents=True, exist_ok=True)
    for name, data in members.items():
        (root / name).write_bytes(data)
    return root


def encode(image: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).copy()


def make_imagefolder(root: Path, splits: dict[str, int], classes: list[str], fmt: str = "PNG", ext: str = ".png",
                     size=(32, 32), seed: int = 2, varied: bool = False):
    """root/<split>/<class>/<k>.<ext>; -> {split: (decoded images list, labels)} in sorted path order."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, per_class in splits.items():
        for ci, cls in enumerate(classes):
            for k in range(per_class):
                h, w = (int(rng.integers(9, 41)), int(rng.integers(9, 41))) if varied else size
                img = smooth_images(rng, 1, h, w)[0]
                files[f"{split}/{cls}/{k:04d}{ext}"] = (encode(img, fmt), ci)
    for rel, (data, _) in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    expected = {}
    for split in splits:
        rels = sorted(r for r in files if r.startswith(split + "/"))
        expected[split] = ([decoded(files[r][0]) for r in rels], np.array([files[r][1] for r in rels]))
    return expected


def tar_folder(folder: Path, out: Path, inner: str | None = None) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        for p in sorted(folder.rglob("*")):
            tar.add(p, arcname=(f"{inner}/" if inner else "") + p.relative_to(folder).as_posix(), recursive=False)
    return out


def make_tinyimagenet(root: Path, wnids=("n02124075", "n01443537", "n09246464"), per_class: int = 3,
                      n_val: int = 5, seed: int = 3, zip_path: Path | None = None):
    """tiny-imagenet-200/ as distributed: wnids.txt, words.txt, train/<wnid>/images + boxes, val/images +
    val_annotations.txt (tab-separated), test/images. -> {split: (images, labels)} with labels = sorted wnids."""
    rng = np.random.default_rng(seed)
    classes = sorted(wnids)
    files: dict[str, bytes] = {"wnids.txt": ("\n".join(wnids) + "\n").encode(),
                               "words.txt": "".join(f"{w}\tthing {w}\n" for w in wnids).encode()}
    train = {}
    for w in wnids:
        boxes = []
        for k in range(per_class):
            img = smooth_images(rng, 1, 64, 64)[0]
            name = f"train/{w}/images/{w}_{k}.JPEG"
            files[name] = encode(img, "JPEG")
            train[name] = classes.index(w)
            boxes.append(f"{w}_{k}.JPEG\t0\t0\t63\t63")
        files[f"train/{w}/{w}_boxes.txt"] = ("\n".join(boxes) + "\n").encode()
    ann, val = [], {}
    for k in range(n_val):
        w = wnids[k % len(wnids)]
        img = smooth_images(rng, 1, 64, 64)[0]
        files[f"val/images/val_{k}.JPEG"] = encode(img, "JPEG")
        ann.append(f"val_{k}.JPEG\t{w}\t{k}\t{k + 1}\t{40 + k}\t{50 + k}")
        val[f"val/images/val_{k}.JPEG"] = classes.index(w)
    files["val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    files["test/images/test_0.JPEG"] = encode(smooth_images(rng, 1, 64, 64)[0], "JPEG")
    if zip_path is not None:
        with zipfile.ZipFile(zip_path, "w") as zf:
            for rel, data in files.items():
                zf.writestr(f"tiny-imagenet-200/{rel}", data)
    else:
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
    expected = {}
    for split, table in (("train", train), ("val", val)):
        rels = sorted(table)
        expected[split] = (np.stack([decoded(files[r]) for r in rels]), np.array([table[r] for r in rels]))
    return expected, classes


def run_convert_cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Run `smallvit convert ARGV` in-process (1 writer worker unless given, no bars) -> (rc, stdout, stderr)."""
    args = list(argv)
    if "--workers" not in args:
        args += ["--workers", "1"]
    rc = convert_main(args + ["--no-progress"])
    out = capsys.readouterr()
    return rc, out.out, out.err


def beton_images(path: Path) -> tuple[list[np.ndarray], np.ndarray]:
    """Every image (H, W, 3) and label of a .beton, any sizes (plain per-sample reader)."""
    from loaders.inspect import BetonFile

    beton = BetonFile(path)
    return [img.copy() for _, img in beton.images()], beton.labels


def listing(folder: Path) -> list[str]:
    """Every entry under `folder` (hidden temporaries included), relative, sorted."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")) if folder.exists() else []
