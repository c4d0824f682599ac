"""Bad inputs give one clear line naming the file (and sample), exit code 2, and leave the output folder as it was:
truncated archive, corrupt/truncated image, empty class folder, label out of range, .mat without keys, a broken
val_annotations.txt; overwrite refusal; all-or-nothing across splits; --skip-corrupt; Ctrl-C mid-write."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from loaders.sidecar import read_sidecar
from test_convert_support import (beton_images, listing, make_cifar10, make_imagefolder, make_tinyimagenet,
                                  run_convert_cli)

REPO = Path(__file__).resolve().parents[1]


def assert_refused(rc: int, err: str, out_dir: Path, *named: str) -> None:
    assert rc == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("smallvit: error: "), err
    for text in named:
        assert text in lines[0], (text, lines[0])
    assert [p for p in listing(out_dir) if p != "downloads"] == [], listing(out_dir)


def test_truncated_archive(tmp_path, capsys):
    src, _, _ = make_cifar10(tmp_path / "src")
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    rc, _, err = run_convert_cli(capsys, str(src), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", str(src), "truncated or corrupt archive")


def test_cifar_label_out_of_range_names_batch_and_index(tmp_path, capsys):
    src, _, _ = make_cifar10(tmp_path / "src", archive=False, bad_label_at=("data_batch_3", 4))
    rc, _, err = run_convert_cli(capsys, str(src), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", "data_batch_3[4]", "label 10", "outside 0..9")


def test_npz_negative_label(tmp_path, capsys):
    np.savez(tmp_path / "train.npz", images=np.zeros((5, 8, 8, 3), np.uint8), labels=np.array([0, 1, -1, 0, 1]))
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", "train.npz[2]", "label -1")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_image_names_file_and_index_and_writes_nothing(tmp_path, capsys, damage):
    make_imagefolder(tmp_path / "set", {"train": 3, "test": 2}, ["a", "b"], fmt="JPEG", ext=".jpg")
    bad = tmp_path / "set" / "train" / "b" / "0001.jpg"
    bad.write_bytes(b"not a jpeg at all" if damage == "garbage" else bad.read_bytes()[:200])
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"), "--workers", "2")
    # sorted member order: train/a/0000..0002, train/b/0000, train/b/0001 -> sample 4
    assert_refused(rc, err, tmp_path / "out", str(bad), "sample 4 of train", "cannot decode image")


def test_skip_corrupt_lists_and_leaves_out(tmp_path, capsys):
    expected = make_imagefolder(tmp_path / "set", {"train": 3, "test": 2}, ["a", "b"])
    bad = tmp_path / "set" / "train" / "a" / "0002.png"
    bad.write_bytes(bad.read_bytes()[:60])
    rc, out, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"), "--skip-corrupt")
    assert rc == 0, err
    assert "skipped 1 corrupt image(s) in train" in out and str(bad) in out
    images, labels = expected["train"]
    keep = [i for i in range(len(images)) if i != 2]
    got, got_labels = beton_images(tmp_path / "out" / "train.beton")
    assert len(got) == len(keep)
    for a, i in zip(got, keep):
        np.testing.assert_array_equal(a, images[i])
    np.testing.assert_array_equal(got_labels, labels[keep])
    meta = read_sidecar(tmp_path / "out" / "train.beton")
    assert meta["num_images"] == 5 and meta["class_counts"] == [2, 3]
    assert [s["index"] for s in meta["skipped"]] == [2] and meta["skipped"][0]["file"] == str(bad)
    flat = np.concatenate([images[i].reshape(-1, 3).astype(np.float64) for i in keep])
    np.testing.assert_allclose(meta["mean"], flat.mean(0) / 255, atol=1e-9)


def test_empty_class_folder(tmp_path, capsys):
    make_imagefolder(tmp_path / "set", {"train": 2, "test": 1}, ["a", "b"])
    (tmp_path / "set" / "test" / "b" / "0000.png").unlink()
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", str(tmp_path / "set" / "test" / "b"), "empty class folder")


def test_mat_without_keys(tmp_path, capsys):
    savemat(tmp_path / "train_32x32.mat", {"images": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((2, 1))})
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train_32x32.mat"), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", str(tmp_path / "train_32x32.mat"), "lacks key 'X'")


def test_svhn_label_outside_1_to_10(tmp_path, capsys):
    y = np.array([[1], [10], [11]], np.float64)
    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 3), np.uint8), "y": y})
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "test_32x32.mat"), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", "test_32x32.mat[2]", "y=11")


def test_tinyimagenet_annotation_of_missing_image(tmp_path, capsys):
    root = tmp_path / "tiny-imagenet-200"
    make_tinyimagenet(root)
    (root / "val" / "images" / "val_3.JPEG").unlink()
    rc, _, err = run_convert_cli(capsys, str(root), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", str(root / "val" / "val_annotations.txt") + ":4", "val_3.JPEG")


def test_refuses_overwrite_without_force(tmp_path, capsys):
    np.savez(tmp_path / "train.npz", images=np.full((4, 8, 8, 3), 7, np.uint8), labels=np.array([0, 1, 0, 1]))
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    before = (tmp_path / "out" / "train.beton").read_bytes()
    np.savez(tmp_path / "train.npz", images=np.full((4, 8, 8, 3), 9, np.uint8), labels=np.array([0, 1, 0, 1]))
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "out"))
    assert rc == 2 and "exists (pass --force to overwrite)" in err
    assert (tmp_path / "out" / "train.beton").read_bytes() == before
    assert listing(tmp_path / "out") == ["train.beton", "train.beton.json"]
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(tmp_path / "out"), "--force")
    assert rc == 0, err
    assert read_sidecar(tmp_path / "out" / "train.beton")["mean"] == pytest.approx([9 / 255] * 3)


def test_all_or_nothing_across_splits(tmp_path, capsys):
    """The test split fails after train was written: train must not appear either."""
    make_imagefolder(tmp_path / "set", {"train": 2, "test": 2}, ["a", "b"])
    (tmp_path / "set" / "test" / "b" / "0001.png").write_bytes(b"\x89PNG broken")
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", "0001.png", "sample 3 of test")


def test_bad_options_are_one_line_errors(tmp_path, capsys):
    for argv, text in ((["digits", "--jpeg-quality", "0"], "--jpeg-quality"),
                       (["digits", "--splits", "train,train"], "twice"),
                       ([str(tmp_path / "nothing-here"), ], "no such file or folder"),
                       (["digits", "--resize", "-3"], "--resize")):
        rc, _, err = run_convert_cli(capsys, *argv, "--out", str(tmp_path / "out"))
        assert_refused(rc, err, tmp_path / "out", text)


SLOW_SOURCE = textwrap.dedent("""
    import sys, time
    import numpy as np
    from loaders.convert.arrays import ArraySource
    from loaders.convert.command import EXIT_INTERRUPTED
    from loaders.convert.writer import WriteOptions, write_beton

    class Slow(ArraySource):
        def __getitem__(self, i):
            time.sleep(0.02)
            return super().__getitem__(i)

    src = Slow(np.zeros((4000, 8, 8, 3), np.uint8), np.zeros(4000, np.int64), ["a"], "slow", "train")
    try:
        write_beton(src, sys.argv[1], WriteOptions(num_workers=2, progress=False, chunksize=16))
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
""")


def test_ctrl_c_mid_write_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    # a shell's background job (`cmd &` without job control) ignores SIGINT, and Python keeps an inherited SIG_IGN
    # instead of raising KeyboardInterrupt: give the child the default disposition whatever launched the tests
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SOURCE, str(out / "train.beton")], env=env, cwd=tmp_path,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while not any(p.name.startswith(".train.beton.tmp-") for p in out.iterdir()):
            assert proc.poll() is None and time.time() < deadline, "writer never started"
            time.sleep(0.2)
        time.sleep(1.0)  # workers are mid-stream now
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert listing(out) == []


def test_killed_conversion_temporary_is_removed_next_time(tmp_path, capsys):
    """A SIGKILLed writer cannot clean up; its hidden temporary (dead pid in the name) goes on the next run."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    stale = out / f".train.beton.tmp-{dead.pid}"
    stale.write_bytes(b"half a beton")
    np.savez(tmp_path / "train.npz", images=np.zeros((3, 8, 8, 3), np.uint8), labels=np.array([0, 1, 1]))
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "train.npz"), "--out", str(out))
    assert rc == 0, err
    assert listing(out) == ["train.beton", "train.beton.json"]


def test_corrupt_first_image_with_mode_auto(tmp_path, capsys):
    """Mode auto peeks at the first image; a corrupt one is still reported by the writer with its name."""
    make_imagefolder(tmp_path / "set", {"train": 2}, ["a", "b"])
    bad = tmp_path / "set" / "train" / "a" / "0000.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", str(bad), "sample 0 of train")
