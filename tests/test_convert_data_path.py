"""The conversion half of the data path: one ImageFolder listing for the converter and the folder loaders, all
splits committed or none, .beton bytes independent of the writer count, --jpeg-quality under --mode auto."""
from __future__ import annotations

import numpy as np

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
