"""Loaders on CPU: ffcv, dali, resident and torchvision over small .beton files the tests write.

Every sample exactly once per epoch (per repeat), labels match images, shards disjoint across ranks, identical
batches for identical seeds (and across loaders and worker counts), repeats draw fresh augmentation, and bad
input fails with a clear error.
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from engine.config import DataConfig
from loaders.transforms.perceptibility import PerceptibilityTransform
from loaders.convert.digits import ArraySource
from loaders.convert.writer import WriteOptions, write_beton
from loaders.factory import build_loader
from loaders.sidecar import DatasetFileError

N = 60
CLASSES = [f"c{i}" for i in range(10)]
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _arrays(n=N, size=(32, 32), seed=0):
    """Flat-colour images whose colour encodes the sample: R = 4 * (i % 60), G = 20 * label; mild noise in B
    (mild so that JPEG chroma bleed stays under 2 levels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    images = np.zeros((n, *size, 3), dtype=np.uint8)
    images[..., 0] = (4 * (np.arange(n) % 60))[:, None, None]
    images[..., 1] = (20 * labels)[:, None, None]
    images[..., 2] = rng.integers(112, 144, (n, *size), dtype=np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    root = tmp_path_factory.mktemp("betons")
    images, labels = _arrays()
    out = {}
    for mode in ("raw", "jpg"):
        src = ArraySource(images, labels, CLASSES, "toy", "train")
        write_beton(src, root / f"train_{mode}.beton", WriteOptions(mode=mode, num_workers=1, progress=False,
                                                                   jpeg_quality=95))
        out[mode] = root / f"train_{mode}.beton"
    other = ArraySource(*_arrays(20, seed=1), CLASSES, "other", "train")
    write_beton(other, root / "other.beton", WriteOptions(num_workers=1, progress=False))
    out["other"] = root / "other.beton"
    odd = ArraySource(*_arrays(20, size=(31, 33), seed=2), CLASSES, "toy", "train")
    write_beton(odd, root / "odd.beton", WriteOptions(num_workers=1, progress=False))
    out["odd"] = root / "odd.beton"
    out["images"], out["labels"] = images, labels
    return out


def _data(path, loader, **kw):
    base = dict(dataset="toy", train=str(path), test=str(path), loader=loader, batch_size=12, eval_batch_size=16,
                num_workers=0, crop_padding=4, flip=True)
    base.update(kw)
    return DataConfig(**base)


def _collect(loader, epoch, start_step=0):
    return list(loader.epoch(epoch, start_step))


LOADERS = ["resident", "ffcv", "dali", "torchvision"]


@pytest.mark.parametrize("kind", LOADERS)
def test_every_sample_once_labels_match_and_shards_disjoint(betons, kind):
    mode = "jpg" if kind == "dali" else "raw"
    data = _data(betons[mode], kind, crop_padding=0, flip=False, drop_last=False)
    seen = []
    for rank in range(2):
        loader, meta = build_loader(data, True, 3, torch.device("cpu"), rank, 2)
        batches = _collect(loader, 1)
        assert len(batches) == len(loader)
        idx = torch.cat([b.index for b in batches])
        seen.append(idx)
        for b in batches:
            assert b.images.shape[1:] == (3, 32, 32) and b.images.dtype == torch.float32
            assert torch.equal(b.labels, torch.from_numpy(betons["labels"])[b.index])
            # undo the normalization: the red channel encodes the sample, the green one its label
            mean = torch.tensor(meta["mean"]).view(1, 3, 1, 1)
            std = torch.tensor(meta["std"]).view(1, 3, 1, 1)
            pixels = (b.images * std + mean) * 255
            red = pixels[:, 0].mean((1, 2))
            green = pixels[:, 1].mean((1, 2))
            tol = 1.9 if mode == "jpg" else 0.01
            assert torch.all((red - 4 * (b.index % 60)).abs() <= tol)
            assert torch.all((green - 20 * b.labels).abs() <= tol)
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert sorted(torch.cat(seen).tolist()) == list(range(N))


@pytest.mark.parametrize("kind", LOADERS)
def test_identical_batches_for_identical_seeds_and_resume(betons, kind):
    mode = "jpg" if kind == "dali" else "raw"
    data = _data(betons[mode], kind, auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0, cutmix_alpha=1.0)
    a, _ = build_loader(data, True, 5, torch.device("cpu"))
    b, _ = build_loader(data, True, 5, torch.device("cpu"))
    c, _ = build_loader(data, True, 6, torch.device("cpu"))
    ea, eb, ec = _collect(a, 2), _collect(b, 2), _collect(c, 2)
    for x, y in zip(ea, eb):
        assert torch.equal(x.images, y.images) and torch.equal(x.index, y.index)
        assert torch.equal(x.soft_labels, y.soft_labels)
    assert not torch.equal(ea[0].index, ec[0].index)
    resumed = _collect(a, 2, start_step=2)
    for x, y in zip(ea[2:], resumed):
        assert torch.equal(x.images, y.images) and torch.equal(x.soft_labels, y.soft_labels)


@pytest.mark.parametrize("impl", ["torchvision", "reference"])
def test_loaders_agree_batch_for_batch(betons, impl):
    """The batched suite (resident, ffcv) equals the per-image torchvision reference loader, bit for bit, with
    either AutoAugment family."""
    data = _data(betons["raw"], "resident", auto_augment="svhn", auto_augment_impl=impl, erasing_prob=0.5,
                 mixup_alpha=1.0, cutmix_alpha=1.0)
    perc = PerceptibilityTransform(kind="both")
    runs = {}
    for kind in ("resident", "ffcv", "torchvision"):
        loader, _ = build_loader(dataclasses.replace(data, loader=kind), True, 9, torch.device("cpu"),
                                 batch_transforms=[perc])
        runs[kind] = _collect(loader, 0)
    for kind in ("ffcv", "torchvision"):
        for x, y in zip(runs["resident"], runs[kind]):
            assert torch.equal(x.index, y.index)
            assert torch.equal(x.images, y.images), kind
            assert torch.equal(x.views["transformed"], y.views["transformed"])
            assert torch.equal(x.params["translate_idx"], y.params["translate_idx"])


@pytest.mark.parametrize("style", ["keyed", "pil"])
def test_torchvision_loader_same_batches_for_0_1_2_workers(betons, style):
    from loaders.order import EpochPlan
    from loaders.torchvision_loader import TorchvisionLoader
    from loaders.transforms.pipeline import TrainTransform

    data = _data(betons["raw"], "torchvision", auto_augment="cifar10", erasing_prob=0.25)
    transform = TrainTransform(data, [0.5] * 3, [0.25] * 3, seed=4)
    plan = EpochPlan(N, 12, seed=4)
    outs = []
    for workers in (0, 1, 2):
        loader = TorchvisionLoader(betons["raw"], plan, transform, torch.device("cpu"), num_workers=workers,
                                   style=style)
        outs.append(_collect(loader, 1)[:3])
    for other in outs[1:]:
        for x, y in zip(outs[0], other):
            assert torch.equal(x.images, y.images)
    if style == "pil":      # the PIL path is a different implementation: same labels/order, other pixels
        keyed = TorchvisionLoader(betons["raw"], plan, transform, torch.device("cpu"), num_workers=0)
        first = _collect(keyed, 1)[0]
        assert torch.equal(first.index, outs[0][0].index) and not torch.equal(first.images, outs[0][0].images)


def test_dali_jpeg_matches_ffcv_decode(betons):
    """DALI's decode of the .beton's JPEG field against FFCV's decode of the same field: the same pixels (both
    libjpeg-turbo's accurate IDCT), same labels and order."""
    data = _data(betons["jpg"], "dali", crop_padding=0, flip=False)
    d, meta = build_loader(data, False, 0, torch.device("cpu"))
    f, _ = build_loader(dataclasses.replace(data, loader="ffcv"), False, 0, torch.device("cpu"))
    for x, y in zip(_collect(d, 0), _collect(f, 0)):
        assert torch.equal(x.index, y.index) and torch.equal(x.labels, y.labels)
        assert torch.equal(x.images, y.images)


def _cifar_slice(per_class: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """The first `per_class` test images of each class of ../shared/data/cifar10-jpg.tar.gz, decoded with PIL."""
    import tarfile

    from PIL import Image

    images, labels, classes = [], [], {}
    with tarfile.open(DATA / "cifar10-jpg.tar.gz") as tar:
        for m in tar:
            parts = m.name.split("/")
            if not (m.isfile() and m.name.endswith(".jpg") and "test" in parts[:-2]):
                continue
            label = classes.setdefault(parts[-2], len(classes))
            if sum(1 for y in labels if y == label) < per_class:
                with Image.open(tar.extractfile(m)) as im:
                    images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
                labels.append(label)
    return np.stack(images), np.array(labels)


@pytest.mark.parametrize("origin", ["generated", "cifar10"])
def test_every_loader_sees_the_pixels_pil_decodes_from_a_jpeg_beton(tmp_path, origin):
    """One pixel truth: resident, ffcv, dali (CPU) and torchvision read a JPEG .beton and yield, batch for batch,
    exactly what PIL (a torchvision/PIL deployment) decodes from the stored JPEG bytes: 0 levels apart. FFCV's own
    decoder (fast IDCT) is off by up to several levels at every quality."""
    from ffcv.libffcv import imdecode
    from PIL import Image

    from loaders.dali_loader import BetonSamples
    from loaders.transforms.pipeline import EvalTransform

    if origin == "cifar10":
        if not (DATA / "cifar10-jpg.tar.gz").is_file():
            pytest.skip("../shared/data/cifar10-jpg.tar.gz absent")
        images, labels = _cifar_slice()
        quality = 90
    else:
        rng = np.random.default_rng(5)
        base = rng.integers(0, 256, (40, 8, 8, 3)).astype(np.float64)
        images = np.clip(np.kron(base, np.ones((1, 4, 4, 1))) + rng.normal(0, 12, (40, 32, 32, 3)), 0, 255)
        images, labels, quality = images.astype(np.uint8), rng.integers(0, 10, 40), 75
    path = tmp_path / "jpg.beton"
    write_beton(ArraySource(images, labels, CLASSES, "toy", "train"), path,
                WriteOptions(mode="jpg", jpeg_quality=quality, num_workers=1, progress=False))
    samples = BetonSamples(path)
    pil = np.stack([np.asarray(Image.open(io.BytesIO(samples.encoded(i).tobytes())).convert("RGB"))
                    for i in range(len(samples))])
    truth = torch.from_numpy(pil).permute(0, 3, 1, 2)
    assert not np.array_equal(pil, images)                      # lossy: the test is about the decoder, not JPEG
    fast = np.zeros_like(pil)
    for i in range(len(samples)):
        imdecode(samples.encoded(i), fast[i], 32, 32, 32, 32, 0, 0, 1, 1, False, False)
    assert np.abs(fast.astype(int) - pil).max() >= 2             # what FFCV's stock decoder would have given
    data = _data(path, "ffcv", eval_batch_size=16)
    for kind in LOADERS:
        loader, meta = build_loader(dataclasses.replace(data, loader=kind), False, 0, torch.device("cpu"))
        expected = EvalTransform(meta["mean"], meta["std"])
        for b in _collect(loader, 0):
            want = expected(truth[b.index], b.labels, b.index).images
            assert torch.equal(b.images, want), (kind, ((b.images - want).abs().amax() * 255 * 0.25).item())


def test_dali_raw_beton_passes_pixels_through_exactly(betons):
    data = _data(betons["raw"], "dali", auto_augment="cifar10", mixup_alpha=1.0)
    d, _ = build_loader(data, True, 2, torch.device("cpu"))
    r, _ = build_loader(dataclasses.replace(data, loader="resident"), True, 2, torch.device("cpu"))
    for x, y in zip(_collect(d, 0), _collect(r, 0)):
        assert torch.equal(x.images, y.images) and torch.equal(x.soft_labels, y.soft_labels)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", LOADERS)
def test_an_epoch_makes_no_blocking_copy_and_no_host_sync(betons, kind, train):
    """With the device set to an accelerator ('meta': no data, CUDA's device rules; bench.counting), a whole
    epoch of each loader with the full recipe: no host-to-device copy that waits (labels, index and repeats are
    slices of device arrays, images come through pinned memory, non_blocking), no device-to-host read; one
    upload per batch (the images; none for the resident loader) plus the epoch's order and repeats."""
    from bench.counting import DeviceWork

    mode = "jpg" if kind == "dali" else "raw"
    data = _data(betons[mode], kind, auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0, cutmix_alpha=1.0,
                 num_workers=1, drop_last=False)
    meta = torch.device("meta")
    with DeviceWork():                                  # emulates pinned memory for the set-up and warm-up too
        loader, _ = build_loader(data, train, 0, meta, batch_transforms=[PerceptibilityTransform()])
        list(loader.epoch(0))                           # the per-size tables (made once) and statistics
        with DeviceWork(strict=True) as work:
            batches = list(loader.epoch(1))
    assert len(batches) == len(loader) and batches[0].images.device == meta and batches[0].labels.device == meta
    assert work.blocking_copies == 0 and work.syncs == 0
    per_batch = 0 if kind == "resident" else 1
    assert work.uploads == per_batch * len(batches) + 2


@pytest.mark.parametrize("kind", ["resident", "ffcv", "dali", "torchvision"])
def test_repeats_draw_different_augmentation(betons, kind):
    mode = "jpg" if kind == "dali" else "raw"
    data = _data(betons[mode], kind, repeats=3, auto_augment="cifar10", drop_last=False, batch_size=15)
    loader, _ = build_loader(data, True, 1, torch.device("cpu"))
    by_sample: dict[int, list[torch.Tensor]] = {}
    for b in _collect(loader, 0):
        for i, img in zip(b.index.tolist(), b.images):
            by_sample.setdefault(i, []).append(img)
    assert all(len(v) == 3 for v in by_sample.values())
    same = sum(torch.equal(v[0], v[1]) or torch.equal(v[1], v[2]) for v in by_sample.values())
    assert same <= 3   # only the rare draw where both repeats happen to pick identity ops and the same crop


def test_repeat_keys_transform_level():
    from loaders.transforms.pipeline import TrainTransform

    data = DataConfig(auto_augment="imagenet")
    t = TrainTransform(data, [0.5] * 3, [0.25] * 3, seed=0)
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    index = torch.arange(40)
    r0 = t(images, torch.zeros(40, dtype=torch.int64), index, 0, torch.zeros(40, dtype=torch.int64))
    plain = t(images, torch.zeros(40, dtype=torch.int64), index, 0)
    r1 = t(images, torch.zeros(40, dtype=torch.int64), index, 0, torch.ones(40, dtype=torch.int64))
    assert torch.equal(r0.images, plain.images)                  # repeat 0 keeps the plain keys
    assert not torch.equal(r0.params["crop"], r1.params["crop"])


def test_rank_repeats_matches_plan_order():
    from loaders.order import EpochPlan

    plan = EpochPlan(num_samples=10, global_batch=4, seed=0, repeats=3)
    for world in (1, 2):
        for rank in range(world):
            order = plan.rank_order(0, rank, world, start_step=1)
            reps = plan.rank_repeats(rank, world, start_step=1)
            assert len(order) == len(reps)
            full = plan.permutation(0)
            pos_owner = {}
            for p, i in enumerate(full):
                pos_owner.setdefault(int(i), []).append(p // 10)
            for i, r in zip(order.tolist(), reps.tolist()):
                assert r in pos_owner[i]


def _max_open_pages(order: np.ndarray, pages: np.ndarray) -> int:
    """The most pages begun but not finished at any point of `order` (one pass)."""
    first, last = {}, {}
    for t, page in enumerate(pages[order]):
        first.setdefault(page, t)
        last[page] = t
    events = np.zeros(len(order) + 1, dtype=np.int64)
    for page in first:
        events[first[page]] += 1
        events[last[page] + 1] -= 1
    return int(np.cumsum(events).max())


def test_quasi_random_order_is_seeded_resumable_and_keeps_few_pages_open():
    from loaders.order import EpochPlan

    pages = np.arange(1000) // 10                      # 100 pages of 10 samples, in file order
    plan = EpochPlan(1000, 8, seed=3, repeats=2, drop_last=False, order="quasi_random", pages=pages)
    perm = plan.permutation(0)
    for rep in perm.reshape(2, 1000):
        assert sorted(rep.tolist()) == list(range(1000))
        assert _max_open_pages(rep, pages) <= 2 * 8     # FFCV's window: 2 x batch pages
    assert not np.array_equal(perm[:1000], perm[1000:])
    uniform = EpochPlan(1000, 8, seed=3).permutation(0)
    assert _max_open_pages(uniform, pages) > 80          # what a uniform permutation does to the page cache
    assert np.array_equal(perm, EpochPlan(1000, 8, seed=3, repeats=2, drop_last=False, order="quasi_random",
                                          pages=pages).permutation(0))
    assert not np.array_equal(perm, plan.permutation(1))
    assert not np.array_equal(perm, EpochPlan(1000, 8, seed=4, repeats=2, drop_last=False, order="quasi_random",
                                              pages=pages).permutation(0))
    for rank in range(2):                                # resume at a step and shard like the random order
        full = plan.rank_order(1, rank, 2)
        assert np.array_equal(plan.rank_order(1, rank, 2, start_step=5), full[5 * 4:])
    assert sorted(np.concatenate([plan.rank_order(1, r, 2) for r in range(2)]).tolist()) == sorted(
        plan.permutation(1).tolist())
    with pytest.raises(ValueError, match="page of each"):
        EpochPlan(1000, 8, order="quasi_random")
    with pytest.raises(ValueError, match="data.order"):
        EpochPlan(1000, 8, order="sequential")


@pytest.mark.parametrize("kind", LOADERS)
def test_data_order_quasi_random_is_read_by_every_loader(betons, kind):
    """data.order=quasi_random changes the training order (it was accepted and ignored), every loader follows the
    same plan (pages from the .beton), whatever data.os_cache, and a resumed epoch continues it."""
    from loaders.ffcv_loader import beton_pages

    mode = "jpg" if kind == "dali" else "raw"
    data = _data(betons[mode], kind, crop_padding=0, flip=False)
    order = {}
    for name, os_cache in (("random", True), ("quasi_random", True), ("quasi_random", False)):
        loader, _ = build_loader(dataclasses.replace(data, order=name, os_cache=os_cache), True, 2,
                                 torch.device("cpu"))
        order[name, os_cache] = torch.cat([b.index for b in _collect(loader, 1)])
    assert not torch.equal(order["random", True], order["quasi_random", True])
    assert torch.equal(order["quasi_random", True], order["quasi_random", False])
    assert torch.equal(torch.cat([b.index for b in _collect(loader, 1, start_step=2)]), order["quasi_random", True][24:])
    plan_pages = beton_pages(betons[mode])
    assert plan_pages.shape == (N,) and np.array_equal(loader.plan.pages, plan_pages)
    reference, _ = build_loader(dataclasses.replace(data, loader="resident", order="quasi_random"), True, 2,
                                torch.device("cpu"))
    assert torch.equal(torch.cat([b.index for b in _collect(reference, 1)]), order["quasi_random", True])


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kind", LOADERS)
def test_beton_from_another_dataset_is_refused(betons, kind):
    data = _data(betons["other"], kind)
    with pytest.raises(DatasetFileError, match="other.*toy|toy.*other"):
        build_loader(data, True, 0, torch.device("cpu"))


@pytest.mark.parametrize("kind", LOADERS)
def test_image_size_the_model_cannot_take_is_refused(betons, kind):
    with pytest.raises(DatasetFileError, match="31x33"):
        build_loader(_data(betons["odd"], kind), True, 0, torch.device("cpu"))
    with pytest.raises(DatasetFileError, match="data.image_size is 64"):
        build_loader(_data(betons["raw"], kind, image_size=64), True, 0, torch.device("cpu"))


def test_resident_without_enough_device_memory_is_a_clear_error(betons):
    data = _data(betons["raw"], "resident")
    with mock.patch("torch.cuda.mem_get_info", return_value=(1000, 10**9)), \
            mock.patch.object(torch.Tensor, "to", lambda self, *a, **k: self):
        with pytest.raises(MemoryError, match="resident loader does not fit"):
            build_loader(data, True, 0, torch.device("cuda"))


def test_auto_falls_back_to_ffcv_when_memory_is_short(betons, caplog):
    from loaders.resident import fits_on_device

    with mock.patch("torch.cuda.mem_get_info", return_value=(1000, 10**9)):
        ok, why = fits_on_device(N * 3 * 32 * 32, torch.device("cuda"), 0.5)
    assert not ok and "exceeds" in why


def test_auto_builds_resident_when_the_set_fits_and_ffcv_when_it_does_not(betons, caplog):
    """The factory's choice itself, at the boundary: data.loader=auto on CUDA with the split needing exactly
    resident_max_fraction (0.5) of the free memory builds the resident loader, one byte less free builds ffcv.
    (No GPU here: the free memory is mocked, device copies stay on the host, pinned memory is emulated.)"""
    from bench.counting import DeviceWork
    from loaders.ffcv_loader import FFCVLoader
    from loaders.resident import ResidentLoader

    need = N * 3 * 32 * 32
    data = _data(betons["raw"], "auto", num_workers=1)
    built = {}
    for free in (2 * need, 2 * need - 1):
        caplog.clear()
        with mock.patch("torch.cuda.mem_get_info", return_value=(free, 10**12)), caplog.at_level("INFO"), \
                mock.patch.object(torch.Tensor, "to", lambda self, *a, **k: self), DeviceWork():
            loader, _ = build_loader(data, True, 0, torch.device("cuda"))
        built[free] = (type(loader), caplog.text)
    assert built[2 * need][0] is ResidentLoader and "loader auto -> resident" in built[2 * need][1]
    assert built[2 * need - 1][0] is FFCVLoader and "loader auto -> ffcv" in built[2 * need - 1][1]


def test_mixing_without_classes_and_dali_without_file_are_errors(betons, tmp_path):
    from loaders.dali_loader import DALILoader
    from loaders.order import EpochPlan
    from loaders.transforms.pipeline import TrainTransform

    with pytest.raises(ValueError, match="number of classes"):
        TrainTransform(DataConfig(mixup_alpha=1.0), [0.5] * 3, [0.2] * 3, 0)
    with pytest.raises(DatasetFileError, match="no such dataset file"):
        DALILoader(tmp_path / "missing.beton", EpochPlan(4, 2), None, torch.device("cpu"))
    (tmp_path / "junk.beton").write_bytes(b"not a beton")
    with pytest.raises(DatasetFileError, match="junk.beton"):
        DALILoader(tmp_path / "junk.beton", EpochPlan(4, 2), None, torch.device("cpu"))


def test_batch_contract_with_full_recipe(betons):
    data = _data(betons["raw"], "resident", auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0,
                 cutmix_alpha=1.0)
    loader, _ = build_loader(data, True, 0, torch.device("cpu"), label_smoothing=0.1,
                             batch_transforms=[PerceptibilityTransform(kind="translate")])
    b = next(iter(loader.epoch(0)))
    assert b.soft_labels.shape == (12, 10) and torch.allclose(b.soft_labels.sum(1), torch.ones(12))
    assert b.soft_labels.min() >= 0.01 - 1e-6                       # label smoothing folded in
    assert b.views["transformed"].shape == b.images.shape
    assert b.params["translate"].shape == (12, 2) and b.params["translate_idx"].dtype == torch.int64
    assert b.targets is b.soft_labels


@pytest.mark.skipif(not (DATA / "cifar10-jpg.tar.gz").is_file(), reason="../shared/data/cifar10-jpg.tar.gz absent")
def test_dali_and_torchvision_on_real_cifar_imagefolder(tmp_path):
    import tarfile

    from loaders.dali_loader import DALILoader
    from loaders.order import EpochPlan
    from loaders.torchvision_loader import TorchvisionLoader
    from loaders.transforms.pipeline import EvalTransform

    with tarfile.open(DATA / "cifar10-jpg.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and "/test/" in "/" + m.name
                   and m.name.rsplit("/", 1)[-1] < "0020"]
        tar.extractall(tmp_path, members=members)
    roots = [p for p in tmp_path.rglob("test") if p.is_dir()]
    assert roots, "no test/ folder in the archive"
    root = roots[0]
    n = sum(1 for _ in root.rglob("*.jpg"))
    plan = EpochPlan(n, 16, shuffle=False, drop_last=False)
    t = EvalTransform([0.5] * 3, [0.25] * 3)
    d = list(DALILoader(root, plan, t, torch.device("cpu")).epoch(0))
    v = list(TorchvisionLoader(root, plan, t, torch.device("cpu"), num_workers=0).epoch(0))
    for x, y in zip(d, v):
        assert torch.equal(x.labels, y.labels)
        assert torch.equal(x.images, y.images)                          # DALI's CPU decoder = PIL, 0 levels


def test_ffcv_batches_kept_across_the_epoch_keep_their_labels(tiny_betons):
    """FFCV reuses its output buffers a few batches later; a Batch the caller keeps must not change under it.
    tiny_betons labels are index % 4, so every kept batch can be checked after the whole epoch was read."""
    data = DataConfig(dataset="tiny", train=str(tiny_betons["train"]), test=str(tiny_betons["test"]), loader="ffcv",
                      batch_size=8, num_workers=1, crop_padding=0, flip=False)
    loader, _ = build_loader(data, True, 0, torch.device("cpu"))
    kept = list(loader.epoch(0))
    assert len(kept) == 96 // 8
    for batch in kept:
        assert torch.equal(batch.labels, batch.index % 4)
