"""What a new user meets converting their own image set: symlink loops, over-large and empty images, one class, a
flat folder without a test split, a .beton from FFCV's own writer; each bad input is one line, exit 2, nothing
written."""
from __future__ import annotations

import os

import numpy as np
import pytest

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


def _image_file(path, image, fmt, **kw):
    import io

    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())


def test_image_larger_than_a_page_names_the_max_resolution_that_fits(tmp_path, capsys):
    """A sample stored larger than FFCV's 8 MiB page failed with FFCV's bare "page size" error: now one line names
    the file, the stored size and a --max-resolution that fits, and converting with it succeeds. Raw: a 1700x1700
    image (8.7 MB of pixels, exact: 1672); JPEG: 2200x2200 noise at quality 100 (about 10 MB)."""
    rng = np.random.default_rng(0)
    cases = (("raw", np.full((1700, 1700, 3), 90, np.uint8), "big.png", (), {}),
             ("jpg", rng.integers(0, 256, (2200, 2200, 3), dtype=np.uint8), "big.jpg", ("--jpeg-quality", "100"),
              {"quality": 100}))
    for mode, big, name, options, kw in cases:
        src = tmp_path / mode
        make_imagefolder(src, {"train": 2}, ["a", "b"])
        bad = src / "train" / "b" / name
        _image_file(bad, big, "PNG" if name.endswith(".png") else "JPEG", **kw)
        argv = (str(src), "--out", str(tmp_path / f"out-{mode}"), "--mode", mode, *options)
        rc, _, err = run_convert_cli(capsys, *argv)
        assert_refused(rc, err, tmp_path / f"out-{mode}", str(bad), "more than the 8 MiB a .beton page holds",
                       "--max-resolution ")
        fit = err.split("--max-resolution ")[1].split()[0]
        if mode == "raw":
            assert fit == "1672"
        rc, _, err = run_convert_cli(capsys, *argv, "--max-resolution", fit)
        assert rc == 0, err
        sizes = {tuple(img.shape[:2]) for img in beton_images(tmp_path / f"out-{mode}" / "train.beton")[0]}
        assert (int(fit), int(fit)) in sizes


def test_zero_byte_image_hints_skip_corrupt(tmp_path, capsys):
    """A zero-byte JPEG showed OpenCV's assertion text: now one line says the file is empty and names
    --skip-corrupt, which then converts the rest."""
    make_imagefolder(tmp_path / "set", {"train": 2}, ["a", "b"])
    empty = tmp_path / "set" / "train" / "a" / "empty.jpg"
    empty.write_bytes(b"")
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"))
    assert_refused(rc, err, tmp_path / "out", str(empty), "empty file: 0 bytes", "--skip-corrupt")
    assert "Assertion" not in err and "cv::" not in err
    rc, out, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"), "--skip-corrupt")
    assert rc == 0 and "skipped 1 corrupt image(s) in train" in out and str(empty) in out, err


def test_one_class_source_converts_with_a_warning(tmp_path, capsys):
    from loaders.sidecar import read_sidecar

    make_imagefolder(tmp_path / "set", {"train": 3, "test": 1}, ["cats"])
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"))
    assert rc == 0, err
    assert [line for line in err.splitlines() if line.strip()] == [
        f"warning: {tmp_path / 'set'}: one class only ('cats'): a classifier has nothing to tell apart (an "
        f"ImageFolder holds one folder per class: <split>/<class>/<image>)"]
    assert listing(tmp_path / "out") == ["test.beton", "test.beton.json", "train.beton", "train.beton.json"]
    assert read_sidecar(tmp_path / "out" / "train.beton")["num_classes"] == 1


def test_flat_folder_says_it_has_no_test_split_and_test_split_holds_one_out(tmp_path, capsys):
    """A flat <class>/<image> folder wrote train only, silently: now a note says so; --test-split 0.25 writes a
    stratified, seeded test split (the same seed the same files, another seed others), disjoint from train."""
    from loaders.sidecar import read_sidecar

    expected = make_imagefolder(tmp_path / "flat", {"train": 8}, ["a", "b", "c"])
    (tmp_path / "set").mkdir()
    for cls in ("a", "b", "c"):
        (tmp_path / "flat" / "train" / cls).rename(tmp_path / "set" / cls)
    (tmp_path / "set" / "a" / "0007.png").unlink()                  # classes of 7, 8, 8 images
    rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "plain"))
    assert rc == 0 and f"note: {tmp_path / 'set'} has no test split: only train was written" in err, err

    def split(seed, out):
        rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / out), "--test-split",
                                     "0.25", "--split-seed", str(seed), "--mode", "raw")
        assert rc == 0 and "note:" not in err, err
        metas = {s: read_sidecar(tmp_path / out / f"{s}.beton") for s in ("train", "test")}
        images = {s: [img.tobytes() for img in beton_images(tmp_path / out / f"{s}.beton")[0]] for s in metas}
        return metas, images

    metas, images = split(0, "s0")
    assert metas["test"]["class_counts"] == [2, 2, 2] and metas["train"]["class_counts"] == [5, 6, 6]
    assert "test-split 0.25 --split-seed 0" in metas["test"]["source"]["held_out"]
    everything = sorted(img.tobytes() for i, img in enumerate(expected["train"][0]) if i != 7)
    assert sorted(images["train"] + images["test"]) == everything and not set(images["train"]) & set(images["test"])
    assert split(0, "s0-again")[1] == images
    assert split(1, "s1")[1]["test"] != images["test"]


def test_test_split_refusals(tmp_path, capsys):
    make_imagefolder(tmp_path / "set", {"train": 3, "test": 1}, ["a", "b"])
    for argv, text in ((["--test-split", "1.5"], "--test-split must be a fraction between 0 and 1, got 1.5"),
                       (["--test-split", "0.2", "--splits", "train"], "leave out --splits"),
                       (["--test-split", "0.2"], "has the splits train, test already")):
        rc, _, err = run_convert_cli(capsys, str(tmp_path / "set"), "--out", str(tmp_path / "out"), *argv)
        assert_refused(rc, err, tmp_path / "out", text)


def _betons(folder, name, size):
    from loaders.convert.arrays import ArraySource
    from loaders.convert.writer import WriteOptions, write_beton

    rng = np.random.default_rng(0)
    paths = {}
    for split in ("train", "test"):
        paths[split] = folder / f"{split}.beton"
        write_beton(ArraySource(rng.integers(0, 256, (6, *size, 3), dtype=np.uint8), np.arange(6) % 2, ["x", "y"],
                                name, split), paths[split], WriteOptions(num_workers=1, progress=False))
    return paths


def test_dataset_name_comes_from_the_sidecar_unless_the_user_sets_it(tmp_path):
    """A recipe pins its dataset's name beside its own paths; pointing it at a new dataset's files used to fail the
    name check first. Now the name follows the files unless the user sets data.dataset (then it is checked)."""

    from engine.config import load_config
    from loaders.factory import preflight
    from loaders.sidecar import DatasetFileError

    recipe = os.path.join(os.path.dirname(__file__), "..", "configs", "cifar10_vit_scratch.yaml")
    betons = _betons(tmp_path, "photos", (32, 32))
    paths = [f"data.train={betons['train']}", f"data.test={betons['test']}"]
    assert load_config(recipe).data.dataset == "cifar10"                    # the recipe's own paths: checked
    for config, overrides in ((recipe, paths), (None, paths)):
        cfg = load_config(config, overrides)
        assert cfg.data.dataset == ""
        assert preflight(cfg.data)["dataset"] == "photos"
    with pytest.raises(DatasetFileError, match="holds dataset 'photos' but data.dataset is 'cifar10'"):
        preflight(load_config(recipe, [*paths, "data.dataset=cifar10"]).data)


def test_non_square_images_suggest_resize(tmp_path):

    from engine.config import load_config
    from loaders.factory import preflight
    from loaders.sidecar import DatasetFileError

    betons = _betons(tmp_path, "photos", (24, 32))
    with pytest.raises(DatasetFileError, match=r"images are 24x32, not square: convert with --resize 32 "):
        preflight(load_config(None, [f"data.train={betons['train']}", f"data.test={betons['test']}"]).data)


def _ffcv_own_beton(path, images, labels, fields=("image", "label")):
    """A .beton written by FFCV's own DatasetWriter, as its documentation shows (no sidecar)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    class Pairs:
        def __len__(self):
            return len(images)

        def __getitem__(self, i):
            return images[i], int(labels[i])

    path.parent.mkdir(parents=True, exist_ok=True)
    DatasetWriter(str(path), {fields[0]: RGBImageField(), fields[1]: IntField()}, num_workers=1) \
        .from_indexed_dataset(Pairs())


def test_sidecar_command_makes_an_ffcv_written_beton_usable(tmp_path, capsys):
    """A .beton from FFCV's own writer was refused ("sidecar missing") with no command to make one:
    `smallvit sidecar` writes it from the file; the names of a sidecar beside it are reused; then preflight and
    inspect --verify accept the pair, and the statistics are the pixels' exact ones."""
    from engine.cli import main as smallvit
    from engine.config import load_config
    from loaders.factory import preflight
    from loaders.sidecar import DatasetFileError, read_sidecar

    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8) for s, n in (("train", 9), ("test", 5))}
    labels = {"train": np.arange(9) % 3, "test": np.array([0, 1, 0, 1, 0])}     # test lacks class 2
    folder = tmp_path / "photos"
    for split in images:
        _ffcv_own_beton(folder / f"{split}.beton", images[split], labels[split])
    capsys.readouterr()
    with pytest.raises(DatasetFileError, match=r"sidecar missing .* `smallvit sidecar "):
        read_sidecar(folder / "train.beton")
    assert smallvit(["sidecar", str(folder / "train.beton"), "--classes", "cat,dog,emu", "--no-progress"]) == 0
    assert smallvit(["sidecar", str(folder / "test.beton"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"names from {folder / 'train.beton.json'}" in out
    metas = {s: read_sidecar(folder / f"{s}.beton") for s in images}
    for split, meta in metas.items():
        assert (meta["dataset"], meta["split"], meta["classes"]) == ("photos", split, ["cat", "dog", "emu"])
        assert meta["class_counts"] == np.bincount(labels[split], minlength=3).tolist()
        flat = images[split].reshape(-1, 3).astype(np.float64)
        np.testing.assert_allclose(meta["mean"], flat.mean(0) / 255, atol=1e-12)
        np.testing.assert_allclose(meta["std"], flat.std(0) / 255, atol=1e-12)
        assert meta["image"]["mode"] == "raw" and (meta["image"]["height"], meta["image"]["width"]) == (32, 32)
    data = load_config(None, [f"data.train={folder / 'train.beton'}", f"data.test={folder / 'test.beton'}"]).data
    assert preflight(data)["num_images"] == 9
    assert smallvit(["inspect", str(folder / "test.beton"), "--verify", "--no-progress"]) == 0
    assert "verify ok: all 5 images" in capsys.readouterr().out


def test_sidecar_command_refusals(tmp_path, capsys):
    from engine.cli import main as smallvit

    rng = np.random.default_rng(1)
    _ffcv_own_beton(tmp_path / "a" / "train.beton", rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8),
                    np.array([0, 1, 2, 1]))
    _ffcv_own_beton(tmp_path / "b" / "train.beton", rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8),
                    np.array([0, 1]), fields=("img", "y"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "train.beton").write_bytes(b"not a beton" * 10)
    capsys.readouterr()
    cases = (([str(tmp_path / "a" / "train.beton"), "--classes", "x,y"], "label 2 of sample 2 is outside 0..1"),
             ([str(tmp_path / "b" / "train.beton")], "expected fields 'image' and 'label'"),
             ([str(tmp_path / "c" / "train.beton")], "not a readable .beton"),
             ([str(tmp_path / "a" / "nope.beton")], "no such file"))
    for argv, text in cases:
        rc = smallvit(["sidecar", *argv, "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and text in err, err
        assert not list(tmp_path.rglob("*.json")) and not list(tmp_path.rglob(".*tmp*"))
    assert smallvit(["sidecar", str(tmp_path / "a" / "train.beton"), "--no-progress"]) == 0
    before = (tmp_path / "a" / "train.beton.json").read_bytes()
    capsys.readouterr()
    assert smallvit(["sidecar", str(tmp_path / "a" / "train.beton"), "--classes", "p,q,r", "--no-progress"]) == 2
    assert "exists (pass --force to overwrite)" in capsys.readouterr().err
    assert (tmp_path / "a" / "train.beton.json").read_bytes() == before
