"""The conversion half of the data path: one ImageFolder listing for the converter and the folder loaders, all
splits committed or none, .beton bytes independent of the writer count, --jpeg-quality under --mode auto."""
from __future__ import annotations

import os

import numpy as np
import pytest

from test_convert_support import beton_images, decoded, encode, listing, run_convert_cli, smooth_images


def _write(path, image, fmt):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(image, fmt))


def test_converter_and_folder_loaders_list_an_imagefolder_alike(tmp_path, capsys):
    """Subfolders inside class folders, hidden files and folders, .pgm/.gif/upper-case names, a class name that
    sorts before its prefix ('a-b' < 'a/' as paths): the .beton holds exactly the files the DALI and torchvision
    loaders list, in their order, with their labels."""
    from loaders.dali_loader import FolderSamples
    from loaders.torchvision_loader import image_folder_files

    rng = np.random.default_rng(0)
    root = tmp_path / "set"
    names = ["a/0.png", "a/sub/1.png", "a/z.PNG", "a/.hidden.png", "a/._mac.jpg", "a/.ipynb_checkpoints/2.png",
             "a-b/0.png", "a-b/deep/er/3.png", "b/0.pgm", "b/1.gif", "b/notes.txt", ".DS_Store/x.png"]
    for name in names:
        fmt = {".pgm": "PPM", ".gif": "GIF", ".txt": "PNG"}.get(name[name.rfind("."):].lower(), "PNG")
        _write(root / "train" / name, smooth_images(rng, 1, 9, 11)[0], fmt)
    rc, out, err = run_convert_cli(capsys, str(root), "--out", str(tmp_path / "out"), "--mode", "raw")
    assert rc == 0, err
    assert "left out 2 file(s)" in err and ".gif: 1" in err and ".txt: 1" in err

    files, labels, classes = image_folder_files(root / "train")
    assert classes == ["a", "a-b", "b"]
    assert [f[len(str(root / "train")) + 1:] for f in files] == \
        ["a/0.png", "a/sub/1.png", "a/z.PNG", "a-b/0.png", "a-b/deep/er/3.png", "b/0.pgm"]
    assert labels.tolist() == [0, 0, 0, 1, 1, 2]
    assert FolderSamples(root / "train").files == files
    images, beton_labels = beton_images(tmp_path / "out" / "train.beton")
    assert beton_labels.tolist() == labels.tolist()
    for image, f in zip(images, files, strict=True):
        with open(f, "rb") as fh:
            np.testing.assert_array_equal(image, decoded(fh.read()))


def _two_splits(tmp_path, seed):
    from test_convert_support import make_imagefolder

    src = tmp_path / f"set{seed}"
    make_imagefolder(src, {"train": 3, "test": 2}, ["a", "b"], seed=seed)
    return src


def _snapshot(folder):
    return {p: (folder / p).read_bytes() for p in listing(folder) if (folder / p).is_file()}


def test_blocked_test_target_writes_no_split(tmp_path, capsys):
    """test.beton is a folder: refused before any work (it used to commit train, then fail on test), with --force
    too; the folder is left as it was."""
    out = tmp_path / "out"
    (out / "test.beton").mkdir(parents=True)
    for force in ((), ("--force",)):
        rc, _, err = run_convert_cli(capsys, str(_two_splits(tmp_path, 1)), "--out", str(out), *force)
        assert rc == 2 and err.strip().splitlines() == [f"smallvit: error: {out / 'test.beton'} exists and is not "
                                                        f"a file (remove it or choose another --out)"], err
        assert listing(out) == ["test.beton"]


def test_failed_rename_under_force_keeps_the_old_pair(tmp_path, capsys, monkeypatch):
    """--force over an earlier conversion, the rename of the new test split fails: the new train does not stay
    beside the old test; both old splits and their sidecars are back, byte for byte, nothing else is left."""
    out = tmp_path / "out"
    rc, _, err = run_convert_cli(capsys, str(_two_splits(tmp_path, 1)), "--out", str(out))
    assert rc == 0, err
    before = _snapshot(out)
    real_replace = os.replace

    def replace(src, dst):   # the new test split cannot be renamed in (putting the old one back still works)
        if os.fspath(dst) == os.fspath(out / "test.beton") and ".tmp-" in os.fspath(src):
            raise PermissionError(13, "Permission denied", os.fspath(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    rc, _, err = run_convert_cli(capsys, str(_two_splits(tmp_path, 2)), "--out", str(out), "--force")
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "Permission denied" in err, err
    assert _snapshot(out) == before
    monkeypatch.setattr(os, "replace", real_replace)
    rc, _, err = run_convert_cli(capsys, str(_two_splits(tmp_path, 2)), "--out", str(out), "--force")
    assert rc == 0, err
    after = _snapshot(out)
    assert sorted(after) == sorted(before) and all(after[k] != before[k] for k in ("train.beton", "test.beton"))


@pytest.mark.parametrize("mode", ["raw", "jpg"])
def test_beton_bytes_do_not_depend_on_the_worker_count(tmp_path, monkeypatch, mode):
    """1, 2 and 3 writer processes give the same bytes (FFCV's own writer gives other bytes with every run of more
    than one worker), over several pages of varied sizes; the sidecar's sha256 is the whole file's."""
    import hashlib

    from loaders.convert.arrays import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton
    from loaders.convert import writer

    monkeypatch.setattr(writer, "PAGE_SIZE", 1 << 21)       # FFCV's smallest page: ~2 MiB holds ~70 samples here
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (230, 96, 100, 3), dtype=np.uint8)
    images[::7] //= 16                                      # JPEG sizes vary from sample to sample
    source = ArraySource(images, rng.integers(0, 4, 230), list("abcd"), "pages", "train")
    digests = []
    for workers in (1, 2, 3):
        path = tmp_path / f"w{workers}" / "train.beton"
        meta = write_beton(source, path, WriteOptions(mode=mode, num_workers=workers, progress=False, chunksize=16))
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
        assert meta["sha256"] == digests[-1]
        assert path.stat().st_size > 2 * (1 << 21)                # pages filled across boundaries
        got, labels = beton_images(path)
        np.testing.assert_array_equal(labels, source.labels)
        if mode == "raw":
            np.testing.assert_array_equal(np.stack(got), images)
    assert digests[0] == digests[1] == digests[2]


def test_jpeg_quality_under_mode_auto_is_not_ignored(tmp_path, capsys):
    """--jpeg-quality used to be dropped silently for images of up to 64 px under the default --mode auto: it now
    asks for JPEG storage (saying so); with --mode raw it is refused before any work."""
    from loaders.sidecar import read_sidecar
    from test_convert_errors import assert_refused

    rc, _, err = run_convert_cli(capsys, "digits", "--splits", "test", "--out", str(tmp_path / "q"),
                                 "--jpeg-quality", "70")
    assert rc == 0, err
    assert "note: --jpeg-quality 70 given, so these images are stored as JPEG" in err
    image = read_sidecar(tmp_path / "q" / "test.beton")["image"]
    assert (image["mode"], image["jpeg_quality"]) == ("jpg", 70)
    rc, _, err = run_convert_cli(capsys, "digits", "--splits", "test", "--out", str(tmp_path / "plain"))
    assert rc == 0 and "note:" not in err
    assert read_sidecar(tmp_path / "plain" / "test.beton")["image"]["mode"] == "raw"
    rc, _, err = run_convert_cli(capsys, "digits", "--out", str(tmp_path / "raw"), "--mode", "raw",
                                 "--jpeg-quality", "70")
    assert_refused(rc, err, tmp_path / "raw", "--jpeg-quality 70 with --mode raw")
