"""What a new user meets converting their own image set: symlink loops, over-large and empty images, one class, a
flat folder without a test split, a .beton from FFCV's own writer; each bad input is one line, exit 2, nothing
written."""
from __future__ import annotations

import os

import numpy as np

from test_convert_errors import assert_refused
from test_convert_support import beton_images, listing, make_imagefolder, run_convert_cli


def test_symlink_loop_counts_each_file_once_and_warns(tmp_path, capsys):
    """`class/loop -> ..` and an alias of a sibling class: followed by os.walk(followlinks=True) they multiplied the
    data; now each real folder is listed once, the links are named in a warning, the loaders list the same."""
    from loaders.torchvision_loader import image_folder_files

    make_imagefolder(tmp_path / "set", {"train": 5, "test": 2}, ["a", "b"])
    os.symlink("..", tmp_path / "set" / "train" / "a" / "loop")
    os.symlink("../b", tmp_path / "set" / "train" / "a" / "alias")
    outside = tmp_path / "extra"
    make_imagefolder(outside, {"more": 3}, ["x"])
    os.symlink(outside / "more" / "x", tmp_path / "set" / "train" / "b" / "linked")   # outside the tree: followed
    os.symlink("..", outside / "more" / "x" / "back")                                  # and its own loop
    rc, out, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, err
    assert any(str(tmp_path / "set" / "train" / "a" / "loop") in w and "symlink loop" in w for w in warnings)
    assert any(str(tmp_path / "set" / "train" / "a" / "alias") in w and "already listed" in w for w in warnings)
    _, labels = beton_images(tmp_path / "out" / "train.beton")
    assert labels.tolist() == [0] * 5 + [1] * 8
    files, folder_labels, _ = image_folder_files(tmp_path / "set" / "train")
    assert len(files) == 13 and folder_labels.tolist() == labels.tolist()
