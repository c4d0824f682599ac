"""Dataset files: a conversion killed mid-write, conversion fidelity, damaged .beton files, worker-count invariance.

The writer lays a .beton's pages out as one FFCV worker would, so its bytes are reproducible too
(tests/test_convert_data_path.py); "content hash" here is `content_digest`: SHA-256 over the sample count, every label and every image (shape and pixels) in index
order, and the sidecar's content keys (classes, counts, image facts, mean/std).
"""
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import runs
from runs import REPO

CONTENT_KEYS = ("dataset", "split", "classes", "num_classes", "num_images", "class_counts", "image", "mean", "std")


def content_digest(beton) -> str:
    from loaders.inspect import BetonFile

    f = BetonFile(beton)
    h = hashlib.sha256()
    h.update(np.asarray(f.labels, np.int64).tobytes())
    count = 0
    for _, image in f.images():
        h.update(repr(image.shape).encode())
        h.update(np.ascontiguousarray(image).tobytes())
        count += 1
    h.update(str(count).encode())
    meta = json.loads(beton.with_name(beton.name + ".json").read_text())
    h.update(json.dumps({k: meta[k] for k in CONTENT_KEYS}, sort_keys=True).encode())
    return h.hexdigest()


def _images(n, seed=0, size=(32, 32)):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *size, 3), dtype=np.uint8), rng.integers(0, 7, n)


# the conversion command a test kills: `smallvit convert`'s writer over an array source whose samples take
# SLOW seconds each (0 for the rerun), so the kill lands mid-write
CONVERT = textwrap.dedent("""
    import sys, time
    import numpy as np
    from loaders.convert.arrays import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    class Slow(ArraySource):
        def __getitem__(self, i):
            time.sleep(float(sys.argv[2]))
            return super().__getitem__(i)

    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (600, 32, 32, 3), dtype=np.uint8), rng.integers(0, 7, 600)
    write_beton(Slow(images, labels, list("abcdefg"), "slow", "train"), sys.argv[1],
                WriteOptions(num_workers=2, progress=False, chunksize=16))
""")


def test_item07_killed_conversion_leaves_nothing_and_reruns_identically(tmp_path):
    """Item 7: kill -9 during a conversion: no file at the final path (only a hidden temporary); rerunning the same
    conversion removes the temporary and gives a file whose content hash equals a clean conversion's."""
    env = runs.env()
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CONVERT, str(killed / "train.beton"), "0.01"], cwd=REPO, env=env)
    try:
        deadline = time.time() + 120
        while not any(p.name.startswith(".train.beton.tmp-") and p.stat().st_size for p in killed.iterdir()):
            assert proc.poll() is None and time.time() < deadline, "the writer never started writing"
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    left = sorted(p.name for p in killed.iterdir())
    assert left and all(name.startswith(".train.beton.tmp-") for name in left), left
    for folder, slow in ((killed, "0"), (tmp_path / "clean", "0")):
        folder.mkdir(exist_ok=True)
        subprocess.run([sys.executable, "-c", CONVERT, str(folder / "train.beton"), slow], cwd=REPO, env=env,
                       check=True, timeout=300)
    assert sorted(p.name for p in killed.iterdir()) == ["train.beton", "train.beton.json"]
    assert content_digest(killed / "train.beton") == content_digest(tmp_path / "clean" / "train.beton")


def test_item08_converter_fidelity(tmp_path, capsys):
    """Item 8: `smallvit convert` of the same source twice (1 and 2 writer processes) gives the same content hash;
    count and class histogram equal the source's; labels round-trip; raw pixels equal the source's, odd sizes
    included (31x33)."""
    from loaders.sidecar import read_sidecar
    from test_convert_support import beton_images, run_convert_cli

    for size in ((32, 32), (31, 33)):
        images, labels = _images(150, seed=size[1], size=size)
        src = tmp_path / f"{size[1]}" / "train.npz"
        src.parent.mkdir()
        np.savez(src, images=images, labels=labels)
        digests = []
        for workers in (1, 2):
            out = src.parent / f"out{workers}"
            rc, _, err = run_convert_cli(capsys, str(src), "--out", str(out), "--workers", str(workers))
            assert rc == 0, err
            beton = out / "train.beton"
            got, got_labels = beton_images(beton)
            np.testing.assert_array_equal(np.stack(got), images)
            np.testing.assert_array_equal(got_labels, labels)
            meta = read_sidecar(beton)
            assert meta["num_images"] == len(images)
            assert meta["class_counts"] == np.bincount(labels, minlength=meta["num_classes"]).tolist()
            digests.append(content_digest(beton))
        assert digests[0] == digests[1]


@pytest.fixture(scope="module")
def small_betons(tmp_path_factory):
    from loaders.convert.digits import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    folder = tmp_path_factory.mktemp("small")
    images, labels = _images(60, seed=5)
    out = {}
    for split in ("train", "test"):
        out[split] = folder / f"{split}.beton"
        write_beton(ArraySource(images, labels, list("abcdefg"), "small", split), out[split],
                    WriteOptions(num_workers=1, progress=False))
    return out


def _data(betons, loader="ffcv", **kw):
    from engine.config import DataConfig

    return DataConfig(**{"dataset": "small", "train": str(betons["train"]), "test": str(betons["test"]),
                         "loader": loader, "batch_size": 12, "num_workers": 1, **kw})


def _epoch(data, **kw):
    """Epoch 1's batches, each copied as it arrives (FFCV reuses its label buffers batches_ahead + 2 batches
    later, so a batch must be consumed, as the training loop does, before it is kept)."""
    from loaders.factory import build_loader

    loader, _ = build_loader(data, True, 3, torch.device("cpu"), **kw)
    return [dataclasses.replace(b, images=b.images.clone(), labels=b.labels.clone(), index=b.index.clone(),
                                soft_labels=None if b.soft_labels is None else b.soft_labels.clone())
            for b in loader.epoch(1)]


def test_item09_damaged_dataset_files_fail_fast_naming_the_file(small_betons, tmp_path):
    """Item 9: a .beton truncated at 10 offsets, or with any of its first 64 header bytes flipped: opening (the
    preflight every run starts with, then the loader) fails within a second with a DatasetFileError naming the
    file -- or, for a flipped byte the format does not use, yields the complete epoch with exactly the clean
    file's batches. Never a hang, a crash or a silently short epoch."""
    from loaders.factory import preflight
    from loaders.sidecar import DatasetFileError

    clean = _epoch(_data(small_betons))           # also compiles FFCV's pipeline: the timings below are warm
    size = small_betons["train"].stat().st_size
    damaged = {"train": tmp_path / "train.beton", "test": small_betons["test"]}
    shutil.copy(small_betons["train"].with_name("train.beton.json"), tmp_path / "train.beton.json")
    data = _data(damaged)
    cases = [("truncate", int(x)) for x in np.linspace(0, size - 1, 10)] + [("flip", i) for i in range(64)]
    unused = []
    for kind, where in cases:
        blob = bytearray(small_betons["train"].read_bytes())
        if kind == "truncate":
            blob = blob[:where]
        else:
            blob[where] ^= 0xFF
        damaged["train"].write_bytes(bytes(blob))
        t0 = time.perf_counter()
        try:
            preflight(data)
            batches = _epoch(data)
        except DatasetFileError as exc:
            assert str(damaged["train"]) in str(exc), (kind, where, exc)
            assert time.perf_counter() - t0 < 1.0, (kind, where)
            continue
        assert kind == "flip", f"a file truncated at {where} of {size} bytes opened"
        assert len(batches) == len(clean) and all(
            torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) for a, b in zip(batches, clean)), \
            f"header byte {where} flipped: the epoch differs from the clean file's without an error"
        unused.append(where)
    assert len(unused) < 16, unused   # most header bytes matter; the rest are padding and must change nothing


def test_item10_same_batches_for_any_worker_count_and_prefetch_depth(small_betons, monkeypatch):
    """Item 10: one seed and epoch with 0, 1 and 4 workers and two prefetch depths (torchvision's DataLoader
    prefetch_factor 2 and 4; FFCV's batches_ahead 1 and 3 with 1 and min(4, cores) decode threads): identical augmented
    batches (full recipe: AutoAugment, erasing, mixup/cutmix) and labels, equal to the resident loader's."""
    import functools

    import loaders.ffcv_loader as ffcv_loader
    import loaders.torchvision_loader as tv_loader

    recipe = dict(auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0, cutmix_alpha=1.0)
    reference = _epoch(_data(small_betons, "resident", **recipe))
    runs_ = {}
    real_dataloader, real_open = tv_loader.DataLoader, ffcv_loader.open_beton
    for workers in (0, 1, 4):
        for depth in (2, 4):
            if workers == 0 and depth == 4:
                continue   # prefetching needs worker processes
            kw = {"prefetch_factor": depth} if workers else {}
            monkeypatch.setattr(tv_loader, "DataLoader", functools.partial(real_dataloader, **kw))
            runs_[("torchvision", workers, depth)] = _epoch(_data(small_betons, "torchvision", num_workers=workers,
                                                                  **recipe))
    for workers in sorted({1, min(4, os.cpu_count() or 1)}):   # numba refuses more threads than cores
        for ahead in (1, 3):
            def open_beton(*args, _ahead=ahead, **kwargs):
                loader = real_open(*args, **kwargs)
                loader.batches_ahead = _ahead
                return loader
            monkeypatch.setattr(ffcv_loader, "open_beton", open_beton)
            runs_[("ffcv", workers, ahead)] = _epoch(_data(small_betons, "ffcv", num_workers=workers, **recipe))
    for key, batches in runs_.items():
        assert len(batches) == len(reference), key
        for i, (a, b) in enumerate(zip(batches, reference)):
            assert torch.equal(a.index, b.index) and torch.equal(a.labels, b.labels), (key, i)
            assert torch.equal(a.images, b.images) and torch.equal(a.soft_labels, b.soft_labels), (key, i)
