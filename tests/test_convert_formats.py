"""`smallvit convert` on every source format, generated in its real on-disk layout: pixel-exact round trips in raw
mode (read back with loaders.ffcv_loader.read_all or a plain per-sample reader), bounded error in JPEG mode, and
sidecar statistics equal to a plain float64 computation."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.io import savemat

from loaders.ffcv_loader import read_all
from loaders.sidecar import read_sidecar
from test_convert_support import (beton_images, encode, make_cifar10, make_cifar100, make_imagefolder,
                                  make_tinyimagenet, run_convert_cli, smooth_images, tar_folder)


def plain_stats(images) -> tuple[np.ndarray, np.ndarray]:
    """Reference per-channel mean/std (fractions of 255) over a list/array of (H, W, 3) images."""
    flat = np.concatenate([np.asarray(i, np.float64).reshape(-1, 3) for i in images])
    return flat.mean(0) / 255.0, flat.std(0) / 255.0


def assert_raw_roundtrip(beton, images: np.ndarray, labels: np.ndarray, reader: str = "ffcv") -> None:
    """Pixel-exact: read back with FFCV's compiled loader (read_all) or, to save its ~2 s compile on further
    splits of the same test, with the plain per-sample reader of loaders.inspect."""
    if reader == "ffcv":
        x, y = read_all(beton)
        assert x.shape == (len(images), 3, images.shape[1], images.shape[2])
        x, y = x.permute(0, 2, 3, 1).numpy(), y.numpy()
    else:
        got, y = beton_images(beton)
        x = np.stack(got)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    meta = read_sidecar(beton)
    mean, std = plain_stats(images)
    np.testing.assert_allclose(meta["mean"], mean, atol=1e-9)
    np.testing.assert_allclose(meta["std"], std, atol=1e-9)
    assert meta["num_images"] == len(images)
    assert meta["class_counts"] == np.bincount(labels, minlength=meta["num_classes"]).tolist()


@pytest.mark.parametrize("archive", [True, False], ids=["tar.gz", "extracted"])
def test_cifar10_python_batches_roundtrip(tmp_path, capsys, archive):
    src, expected, names = make_cifar10(tmp_path / "src", archive=archive)
    rc, out, err = run_convert_cli(capsys, str(src), "--out", str(tmp_path / "out"), "--workers", "2")
    assert rc == 0, err
    for split in ("train", "test"):
        beton = tmp_path / "out" / f"{split}.beton"
        assert_raw_roundtrip(beton, *expected[split], reader="ffcv" if split == "train" else "plain")
        meta = read_sidecar(beton)
        assert meta["dataset"] == "cifar10" and meta["classes"] == names and meta["image"]["mode"] == "raw"
        assert len(meta["source"]["sha256"]) == 64
    assert "train" in out and "test" in out and "img/s" in out


@pytest.mark.parametrize("labels", ["fine", "coarse"])
def test_cifar100_fine_and_coarse(tmp_path, capsys, labels):
    src, expected, fine, coarse = make_cifar100(tmp_path / "src")
    rc, _, err = run_convert_cli(capsys, str(src), "--out", str(tmp_path / "out"), "--labels", labels)
    assert rc == 0, err
    for split in ("train", "test"):
        images, f, c = expected[split]
        beton = tmp_path / "out" / f"{split}.beton"
        assert_raw_roundtrip(beton, images, f if labels == "fine" else c,
                             reader="ffcv" if split == "test" else "plain")
        meta = read_sidecar(beton)
        assert meta["classes"] == (fine if labels == "fine" else coarse)
        assert meta["dataset"] == ("cifar100" if labels == "fine" else "cifar100_coarse")


def test_svhn_mat_label_10_is_digit_0_and_extra_optional(tmp_path, capsys):
    rng = np.random.default_rng(5)
    expected = {}
    for split, n in (("train", 11), ("test", 7), ("extra", 5)):
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        y = rng.integers(1, 11, n).astype(np.float64)  # the official files store y as double, 1..10
        y[0] = 10
        savemat(tmp_path / f"{split}_32x32.mat", {"X": images.transpose(1, 2, 3, 0), "y": y.reshape(-1, 1)})
        expected[split] = (images, (y % 10).astype(np.int64))
    rc, _, err = run_convert_cli(capsys, str(tmp_path), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.beton")) == ["test.beton", "train.beton"]
    for split in ("train", "test"):
        assert_raw_roundtrip(tmp_path / "out" / f"{split}.beton", *expected[split],
                             reader="ffcv" if split == "train" else "plain")
    assert read_sidecar(tmp_path / "out" / "train.beton")["classes"] == [str(d) for d in range(10)]
    # extra only when named; a single .mat file converts its own split
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "extra_32x32.mat"), "--out", str(tmp_path / "ex"))
    assert rc == 0, err
    assert_raw_roundtrip(tmp_path / "ex" / "extra.beton", *expected["extra"], reader="plain")


def test_cinic_imagefolder_train_valid_test(tmp_path, capsys):
    classes = ["airplane", "bird", "cat"]
    expected = make_imagefolder(tmp_path / "CINIC-10", {"train": 3, "valid": 2, "test": 2}, classes)
    rc, out, err = run_convert_cli(capsys, str(tmp_path / "CINIC-10"), "--out", str(tmp_path / "out"),
                                   "--workers", "2")
    assert rc == 0, err
    for split in ("train", "valid", "test"):
        images, labels = expected[split]
        beton = tmp_path / "out" / f"{split}.beton"
        assert_raw_roundtrip(beton, np.stack(images), labels, reader="ffcv" if split == "valid" else "plain")
        meta = read_sidecar(beton)
        assert meta["dataset"] == "cinic10" and meta["classes"] == classes


@pytest.mark.parametrize("packed", ["folder", "zip"])
def test_tinyimagenet_val_annotations(tmp_path, capsys, packed):
    if packed == "zip":
        expected, classes = make_tinyimagenet(None, zip_path=tmp_path / "tiny-imagenet-200.zip")
        src = tmp_path / "tiny-imagenet-200.zip"
    else:
        expected, classes = make_tinyimagenet(tmp_path / "tiny-imagenet-200")
        src = tmp_path / "tiny-imagenet-200"
    rc, _, err = run_convert_cli(capsys, str(src), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "out").glob("*.beton")) == ["train.beton", "val.beton"]
    for split in ("train", "val"):
        beton = tmp_path / "out" / f"{split}.beton"
        # 64 px JPEG sources: mode auto stores the decoded pixels raw
        assert_raw_roundtrip(beton, *expected[split], reader="ffcv" if split == "val" else "plain")
        meta = read_sidecar(beton)
        assert meta["dataset"] == "tinyimagenet" and meta["classes"] == classes


def test_imagefolder_any_size_png_and_resize(tmp_path, capsys):
    from loaders.inspect import BetonFile

    classes = ["a", "b"]
    expected = make_imagefolder(tmp_path / "shapes", {"train": 3, "test": 2}, classes, varied=True)
    # any size, stored as is (raw): a plain per-sample reader gets every pixel back
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "shapes"), "--out", str(tmp_path / "asis"), "--mode", "raw")
    assert rc == 0, err
    for split in ("train", "test"):
        images, labels = expected[split]
        got, got_labels = beton_images(tmp_path / "asis" / f"{split}.beton")
        assert len(got) == len(images)
        for a, b in zip(got, images):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(got_labels, labels)
        meta = read_sidecar(tmp_path / "asis" / f"{split}.beton")
        mean, std = plain_stats(images)
        np.testing.assert_allclose(meta["mean"], mean, atol=1e-9)
        np.testing.assert_allclose(meta["std"], std, atol=1e-9)
        if len({im.shape for im in images}) > 1:
            assert meta["image"]["height"] is None
    # --resize 16: every image 16x16, equal to torchvision Resize(16) + CenterCrop(16) of the decoded file
    import torchvision.transforms.functional as TF
    from PIL import Image

    rc, _, err = run_convert_cli(capsys, str(tmp_path / "shapes"), "--out", str(tmp_path / "r16"), "--resize", "16")
    assert rc == 0, err
    x, y = read_all(tmp_path / "r16" / "train.beton")
    images, labels = expected["train"]
    ref = np.stack([np.asarray(TF.center_crop(TF.resize(Image.fromarray(im), 16), 16)) for im in images])
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), ref)
    assert BetonFile(tmp_path / "r16" / "train.beton").heights.tolist() == [16] * len(images)


@pytest.mark.parametrize("packed", ["tar.gz", "folder"])
def test_cifar10_jpg_imagefolder_layout(tmp_path, capsys, packed):
    """The layout of ../shared/data/cifar10-jpg.tar.gz: train/<class>/NNNN.jpg inside a tar.gz, or extracted."""
    classes = ["airplane", "automobile", "bird"]
    expected = make_imagefolder(tmp_path / "tree", {"train": 3, "test": 2}, classes, fmt="JPEG", ext=".jpg")
    src = tar_folder(tmp_path / "tree", tmp_path / "cifar10-jpg.tar.gz") if packed == "tar.gz" else tmp_path / "tree"
    rc, _, err = run_convert_cli(capsys, str(src), "--out", str(tmp_path / "out"), "--dataset", "mycifar")
    assert rc == 0, err
    for split in ("train", "test"):
        images, labels = expected[split]
        assert_raw_roundtrip(tmp_path / "out" / f"{split}.beton", np.stack(images), labels,
                             reader="ffcv" if split == "train" else "plain")
        assert read_sidecar(tmp_path / "out" / f"{split}.beton")["dataset"] == "mycifar"


@pytest.mark.parametrize("grey", [False, True])
def test_npz_roundtrip(tmp_path, capsys, grey):
    rng = np.random.default_rng(7)
    shape = (13, 28, 20) if grey else (13, 28, 20, 3)
    images = rng.integers(0, 256, shape, dtype=np.uint8)
    labels = rng.integers(0, 4, 13)
    np.savez(tmp_path / "test.npz", images=images, labels=labels, classes=np.array(["w", "x", "y", "z"]))
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "test.npz"), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    rgb = np.repeat(images[..., None], 3, axis=3) if grey else images
    assert_raw_roundtrip(tmp_path / "out" / "test.beton", rgb, labels)
    assert read_sidecar(tmp_path / "out" / "test.beton")["classes"] == ["w", "x", "y", "z"]


@pytest.mark.parametrize("quality", [90, 75])
def test_jpeg_mode_bounded_error(tmp_path, capsys, quality):
    rng = np.random.default_rng(11)
    images = smooth_images(rng, 24, 32, 32)
    labels = rng.integers(0, 3, 24)
    np.savez(tmp_path / "train.npz", images=images, labels=labels)
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "out"),
                                 "--mode", "jpg", "--jpeg-quality", str(quality))
    assert rc == 0, err
    x, y = read_all(tmp_path / "out" / "train.beton")
    diff = np.abs(x.permute(0, 2, 3, 1).numpy().astype(np.int64) - images.astype(np.int64))
    assert diff.mean() < (3.5 if quality == 90 else 4.5), diff.mean()  # noise std 2 + 4:2:0 chroma at 32 px
    assert np.percentile(diff, 99) < 24
    assert diff.max() > 0  # really compressed
    np.testing.assert_array_equal(y.numpy(), labels)
    meta = json.loads((tmp_path / "out" / "train.beton.json").read_text())
    assert meta["image"]["mode"] == "jpg" and meta["image"]["jpeg_quality"] == quality


def test_max_resolution_shrinks_and_stats_follow_stored_pixels(tmp_path, capsys):
    import cv2

    rng = np.random.default_rng(12)
    images = smooth_images(rng, 6, 48, 40)
    np.savez(tmp_path / "train.npz", images=images, labels=np.arange(6) % 2)
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "out"),
                                 "--max-resolution", "24", "--mode", "raw")
    assert rc == 0, err
    ref = np.stack([cv2.resize(im, (20, 24), interpolation=cv2.INTER_AREA) for im in images])
    assert_raw_roundtrip(tmp_path / "out" / "train.beton", ref, np.arange(6) % 2)


def test_digits_word_and_stats_match_reference(tmp_path, capsys):
    from loaders.convert.digits import digits_source
    from loaders.convert.writer import channel_stats

    rc, out, err = run_convert_cli(capsys, "digits", "--out", str(tmp_path), "--splits", "test")
    assert rc == 0, err
    meta = read_sidecar(tmp_path / "test.beton")
    mean, std, counts = channel_stats(digits_source("test"))
    np.testing.assert_allclose(meta["mean"], mean, atol=1e-12)
    np.testing.assert_allclose(meta["std"], std, atol=1e-12)
    assert meta["class_counts"] == counts and meta["num_images"] == 360


@pytest.mark.parametrize("kind", ["jpeg", "png", "grey-png", "rgba-png", "palette-png", "grey-jpeg"])
def test_fast_decoder_matches_pil_reference(kind):
    """decode_image (OpenCV) against the plain PIL decoder on random images of odd sizes."""
    import io

    from PIL import Image

    from loaders.convert.images import decode_image, decode_image_pil

    import zlib

    rng = np.random.default_rng(zlib.crc32(kind.encode()))
    for h, w in ((1, 1), (7, 13), (32, 32), (33, 65), (64, 17)):
        rgb = smooth_images(rng, 1, h, w)[0]
        im = Image.fromarray(rgb)
        fmt = "JPEG" if "jpeg" in kind else "PNG"
        if kind.startswith("grey"):
            im = im.convert("L")
        elif kind == "rgba-png":
            im = im.convert("RGBA")
        elif kind == "palette-png":
            im = im.convert("P")
        buf = io.BytesIO()
        im.save(buf, format=fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        data = buf.getvalue()
        np.testing.assert_array_equal(decode_image(data), decode_image_pil(data), err_msg=f"{kind} {h}x{w}")


def test_truncated_jpeg_refused_at_every_cut():
    from loaders.convert.images import decode_image

    data = encode(smooth_images(np.random.default_rng(0), 1, 40, 40)[0], "JPEG")
    sos = data.rfind(b"\xff\xda")
    for cut in (10, sos - 5, sos + 20, (sos + len(data)) // 2, len(data) - 2):
        with pytest.raises(ValueError, match="cannot decode image"):
            decode_image(data[:cut])


def test_per_class_keeps_the_first_n_of_each_class_in_source_order(tmp_path, capsys):
    """--per-class N: a balanced slice, the same samples a plain loop over the source picks; a class with fewer than
    N keeps all of them; the sidecar names the subset and its checksum differs from the whole split's."""
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (23, 8, 6, 3), dtype=np.uint8)
    labels = np.array([0, 1, 1, 2, 0, 1, 0, 0, 2, 1, 1, 0, 0, 1, 2, 0, 1, 1, 0, 2, 1, 0, 3])
    np.savez(tmp_path / "train.npz", images=images, labels=labels, classes=np.array(["a", "b", "c", "d"]))
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "sub"),
                                 "--per-class", "3", "--workers", "1")
    assert rc == 0, err
    taken, keep = {}, []
    for i, y in enumerate(labels):          # the plain reference: walk the source, count per class
        if taken.get(y, 0) < 3:
            taken[y] = taken.get(y, 0) + 1
            keep.append(i)
    assert_raw_roundtrip(tmp_path / "sub" / "train.beton", images[keep], labels[keep], reader="plain")
    meta = read_sidecar(tmp_path / "sub" / "train.beton")
    assert meta["class_counts"] == [3, 3, 3, 1]
    assert meta["source"]["subset"] == "first 3 images per class in source order (10 of 23)"
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "all"), "--workers", "1")
    assert rc == 0, err
    assert read_sidecar(tmp_path / "all" / "train.beton")["source"]["sha256"] != meta["source"]["sha256"]
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "bad"),
                                 "--per-class", "0")
    assert rc == 2 and "--per-class must be a positive number" in err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
