"""`smallvit inspect FILE.beton [--verify]`: fields, count, class histogram; --verify decodes every image and
catches a file that disagrees with its sidecar; anything that is not a .beton is a one-line error, exit code 2."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from loaders.inspect import BetonFile, add_inspect_arguments, run_inspect
from test_convert_support import make_imagefolder


def inspect(capsys, *argv: str) -> tuple[int, str, str]:
    parser = add_inspect_arguments(argparse.ArgumentParser())
    rc = run_inspect(parser.parse_args(list(argv)))
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A small ImageFolder (3 classes, 4/2 per class) converted raw, and a JPEG copy with varied sizes."""
    root = tmp_path_factory.mktemp("inspect")
    make_imagefolder(root / "set", {"train": 4, "test": 2}, ["cat", "dog", "emu"])
    make_imagefolder(root / "varied", {"train": 3}, ["a", "b"], varied=True)
    from loaders.convert.command import main

    assert main([str(root / "set"), "--out", str(root / "raw"), "--workers", "1", "--no-progress"]) == 0
    assert main([str(root / "varied"), "--out", str(root / "jpg"), "--mode", "jpg", "--workers", "1",
                 "--no-progress"]) == 0
    return root


def test_describe_and_verify(converted, capsys):
    rc, out, err = inspect(capsys, str(converted / "raw" / "train.beton"), "--verify")
    assert rc == 0, err
    assert "12 samples" in out and "image (RGBImageField)" in out and "label (IntField)" in out
    assert "raw, 32x32" in out
    for k, name in enumerate(["cat", "dog", "emu"]):
        assert any(line.split()[:3] == [str(k), name, "4"] for line in out.splitlines()), out
    assert "verify ok: all 12 images decode" in out


def test_verify_jpeg_varied_sizes(converted, capsys):
    rc, out, err = inspect(capsys, str(converted / "jpg" / "train.beton"), "--verify")
    assert rc == 0, err
    assert "jpg" in out and "verify ok: all 6 images" in out


def test_plain_reader_matches_ffcv_loader(converted):
    from loaders.ffcv_loader import read_all

    x, y = read_all(converted / "raw" / "test.beton")
    beton = BetonFile(converted / "raw" / "test.beton")
    images = np.stack([im for _, im in beton.images()])
    np.testing.assert_array_equal(images, x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(beton.labels, y.numpy())


def test_verify_catches_sidecar_mismatch(converted, capsys, tmp_path):
    import shutil

    shutil.copy(converted / "raw" / "test.beton", tmp_path / "test.beton")
    meta = json.loads((converted / "raw" / "test.beton.json").read_text())
    meta["class_counts"] = [3, 1, 2]
    meta["mean"] = [0.9, 0.9, 0.9]
    (tmp_path / "test.beton.json").write_text(json.dumps(meta))
    rc, _, err = inspect(capsys, str(tmp_path / "test.beton"), "--verify")
    assert rc == 1 and "class counts [2, 2, 2] differ" in err
    meta["class_counts"] = [2, 2, 2]
    (tmp_path / "test.beton.json").write_text(json.dumps(meta))
    rc, _, err = inspect(capsys, str(tmp_path / "test.beton"), "--verify")
    assert rc == 1 and "decoded channel mean" in err


def test_verify_catches_damaged_data(converted, capsys, tmp_path):
    import shutil

    shutil.copy(converted / "raw" / "test.beton", tmp_path / "test.beton")
    shutil.copy(converted / "raw" / "test.beton.json", tmp_path / "test.beton.json")
    beton = BetonFile(tmp_path / "test.beton")
    ptr = int(beton._image["data_ptr"][3])
    with open(tmp_path / "test.beton", "r+b") as fh:  # flip pixels of sample 3
        fh.seek(ptr)
        fh.write(bytes(255 - b for b in fh.read(600)))
    rc, _, err = inspect(capsys, str(tmp_path / "test.beton"), "--verify")
    assert rc == 1 and "decoded channel" in err


@pytest.mark.parametrize("case", ["checkpoint", "missing", "garbage", "no-sidecar"])
def test_bad_files(converted, capsys, tmp_path, case):
    import shutil

    if case == "checkpoint":
        path = tmp_path / "model.pt"
        path.write_bytes(b"x")
        rc, out, err = inspect(capsys, str(path))
        assert rc == 2 and err.strip() == f"smallvit: error: {path}: not a .beton file"
    elif case == "missing":
        rc, _, err = inspect(capsys, str(tmp_path / "nope.beton"))
        assert rc == 2 and "nope.beton: no such file" in err
    elif case == "garbage":
        (tmp_path / "bad.beton").write_bytes(b"\0\1" * 50)
        rc, _, err = inspect(capsys, str(tmp_path / "bad.beton"))
        assert rc == 2 and len(err.strip().splitlines()) == 1 and "bad.beton" in err
    else:
        shutil.copy(converted / "raw" / "test.beton", tmp_path / "test.beton")
        rc, out, err = inspect(capsys, str(tmp_path / "test.beton"))
        assert rc == 0 and "sidecar missing" in err and "6 samples" in out
        rc, _, err = inspect(capsys, str(tmp_path / "test.beton"), "--verify")
        assert rc == 2 and "sidecar missing" in err


def test_convert_help_lists_every_option_with_default():
    from loaders.convert.command import add_convert_arguments

    parser = add_convert_arguments(argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    text = parser.format_help()
    for option in ("--out", "--dataset", "--splits", "--labels", "--mode", "--jpeg-quality", "--max-resolution",
                   "--resize", "--workers", "--force", "--download", "--download-dir", "--mirror", "--skip-corrupt",
                   "--no-progress"):
        assert option in text
    for action in parser._actions:
        if action.dest != "help":
            assert action.help, action.dest


def test_verify_shows_progress_and_checks_the_whole_file(converted, capsys, tmp_path):
    """--verify draws a progress bar on stderr (none with --no-progress) and checks the file's SHA-256: a byte
    changed where no sample, header or table lies (the unused end of a page) is caught."""
    import shutil

    rc, out, err = inspect(capsys, str(converted / "raw" / "train.beton"), "--verify")
    assert rc == 0 and "verify train.beton" in err and "100%" in err, err
    assert "mean/std and SHA-256 match the sidecar" in out
    rc, _, err = inspect(capsys, str(converted / "raw" / "train.beton"), "--verify", "--no-progress")
    assert rc == 0 and err == ""
    shutil.copy(converted / "raw" / "test.beton", tmp_path / "test.beton")
    shutil.copy(converted / "raw" / "test.beton.json", tmp_path / "test.beton.json")
    beton = BetonFile(tmp_path / "test.beton")
    unused = int(beton._image["data_ptr"].max()) + (1 << 20)          # 1 MiB past the last sample, same page
    assert unused < (tmp_path / "test.beton").stat().st_size - (1 << 20)
    with open(tmp_path / "test.beton", "r+b") as fh:
        fh.seek(unused)
        fh.write(b"\x01")
    rc, _, err = inspect(capsys, str(tmp_path / "test.beton"), "--verify", "--no-progress")
    assert rc == 1 and err.strip() == f"verify FAILED: {tmp_path / 'test.beton'}: its SHA-256 differs from the " \
                                      f"sidecar's (the file changed after conversion)"
