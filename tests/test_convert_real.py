"""The real CIFAR-10 copy in ../shared/data (an ImageFolder of JPEGs inside a tar.gz): all 60,000 images converted
straight from the archive, 5,000 / 1,000 per class, and the channel means the writer computed within 0.01 of the
well-known CIFAR-10 values. Skips when the file is absent. About 40 s on two busy cores (not marked slow).
The extracted-folder path runs the same ImageFolder reader over a DirTree; it is covered on generated data in
test_convert_formats.py::test_cifar10_jpg_imagefolder_layout."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from loaders.sidecar import read_sidecar
from test_convert_support import run_convert_cli

CIFAR10_JPG = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpg.tar.gz"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.491, 0.482, 0.447)


def test_real_cifar10_jpg_archive(tmp_path, capsys):
    if not CIFAR10_JPG.is_file():
        pytest.skip(f"{CIFAR10_JPG} absent (the real CIFAR-10 copy; see ../shared/data/README.md)")
    rc, out, err = run_convert_cli(capsys, str(CIFAR10_JPG), "--out", str(tmp_path), "--workers", "2")
    assert rc == 0, err
    for split, n, per_class in (("train", 50_000, 5_000), ("test", 10_000, 1_000)):
        meta = read_sidecar(tmp_path / f"{split}.beton")
        assert meta["dataset"] == "cifar10" and meta["classes"] == CIFAR10_CLASSES
        assert meta["num_images"] == n and meta["class_counts"] == [per_class] * 10
        assert (meta["image"]["height"], meta["image"]["width"], meta["image"]["mode"]) == (32, 32, "raw")
        assert meta["skipped"] == []
    train = read_sidecar(tmp_path / "train.beton")
    np.testing.assert_allclose(train["mean"], CIFAR10_MEAN, atol=0.01)
    np.testing.assert_allclose(train["std"], (0.247, 0.243, 0.261), atol=0.01)
    assert "50000" in out and "10000" in out

    # the file agrees with its sidecar when decoded independently (count, labels, sizes, mean/std)
    import argparse

    from loaders.inspect import add_inspect_arguments, run_inspect

    args = add_inspect_arguments(argparse.ArgumentParser()).parse_args([str(tmp_path / "test.beton"), "--verify"])
    assert run_inspect(args) == 0
    assert "verify ok: all 10000 images" in capsys.readouterr().out
