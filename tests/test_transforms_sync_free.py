"""The sync-free formulation of the per-image op choices (loaders/transforms/sync_free.py).

1. Bitwise: with the sync-free path forced on the CPU, AutoAugment (every policy, both families: torchvision's
   and the references' PIL port), RandAugment, ColorJitter, the multi-crop views and the whole TrainTransform
   equal the sub-batch path (torch.equal) on random uint8 batches of several sizes, odd H/W included.
2. No host sync: the whole training recipe (crop, flip, AutoAugment/RandAugment, erasing, Mixup/CutMix,
   translation/scale T, multi-crop views) runs under a guard that raises on every operation that reads device
   values on the host or copies host data to the device: .item/.tolist/.numpy/.cpu/bool/int/float/index of a
   tensor, nonzero, boolean-mask indexing, unique, masked_select, repeat_interleave without output_size,
   tensors built from Python/numpy data (an H2D copy on CUDA) and copies between devices. On the CPU with the
   switch forced, and on fake CUDA tensors (FakeTensorMode: no GPU needed) with the device's own choice. The
   first batch of a size may fill the per-size tables (geometric matrices, magnitude values), so a warm-up
   batch runs first, as the first training step does.
"""
from __future__ import annotations

import contextlib
import importlib
import pkgutil

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loaders.transforms
from engine.config import DataConfig
from loaders.transforms.perceptibility import PerceptibilityTransform
from loaders.transforms import autoaugment_reference
from loaders.transforms.autoaugment import (OP_NAMES, POLICIES, apply_ops, auto_augment, rand_augment,
                                            signed_values)
from loaders.transforms.multicrop import MultiCrop, color_jitter
from loaders.transforms.pipeline import TrainTransform
from loaders.transforms.rng import hash32, sample_keys
from loaders.transforms.sync_free import forced_sync_free, use_sync_free

aten = torch.ops.aten


# ------------------------------------------------------------------------------------------------ the guard
class HostSyncError(AssertionError):
    pass


# aten ops whose result needs device values on the host (or host values on the device)
_SYNC_OPS = {aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select,
             aten._unique, aten._unique2, aten.unique_dim, aten.unique_consecutive, aten.unique_dim_consecutive,
             aten.lift_fresh, aten.lift_fresh_copy}
_INDEX_OPS = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
_COPY_OPS = {aten._to_copy, aten.copy_, aten._copy_from, aten._copy_from_and_resize}
# Tensor methods that hand a value to Python (some never reach the dispatcher on a CPU tensor)
_SYNC_METHODS = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__", "__index__")


class HostSyncGuard(TorchDispatchMode):
    """Raises HostSyncError on any aten op that would make the host wait for the device or copy host data to
    it (see _SYNC_OPS; boolean-mask indexing; repeat_interleave without output_size; cross-device copies)."""

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in _SYNC_OPS:
            raise HostSyncError(f"host sync: {func}")
        if packet in _INDEX_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices):
                raise HostSyncError(f"host sync: boolean-mask indexing ({func})")
        if packet is aten.repeat_interleave and isinstance(args[0], torch.Tensor) and \
                kwargs.get("output_size", args[2] if len(args) > 2 else None) is None:
            raise HostSyncError(f"host sync: {func} without output_size")
        if packet in _COPY_OPS:
            tensors = [a for a in args[:2] if isinstance(a, torch.Tensor)]
            devices = {t.device.type for t in tensors}
            if "device" in kwargs and kwargs["device"] is not None:
                devices.add(torch.device(kwargs["device"]).type)
            if len(devices) > 1:
                raise HostSyncError(f"host sync: copy between devices {sorted(devices)} ({func})")
        return func(*args, **kwargs)


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    """HostSyncGuard plus patched Tensor methods / torch functions that hand values to or from Python."""
    def forbidden(name):
        def raise_(*args, **kwargs):
            raise HostSyncError(f"host sync: {name}")
        return raise_

    with monkeypatch.context() as m:
        for name in _SYNC_METHODS:
            m.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
        for name in ("nonzero", "from_numpy", "tensor", "unique"):
            m.setattr(torch, name, forbidden(f"torch.{name}"))
        as_tensor = torch.as_tensor

        def tensor_as_tensor(data, *args, **kwargs):    # a tensor passes (a device change is a copy: guarded)
            if not isinstance(data, torch.Tensor):
                raise HostSyncError("host sync: torch.as_tensor of host data")
            return as_tensor(data, *args, **kwargs)
        m.setattr(torch, "as_tensor", tensor_as_tensor)
        with HostSyncGuard():
            yield


def test_the_guard_catches_each_kind_of_sync(monkeypatch):
    """The guard is not vacuous: each known way of syncing raises under it."""
    x = torch.arange(12.0).view(3, 4)
    mask = x > 5
    repeats = torch.tensor([1, 2])
    attempts = [lambda: x.sum().item(), lambda: x.tolist(), lambda: bool(x.sum()), lambda: float(x[0, 0]),
                lambda: torch.nonzero(mask), lambda: mask.nonzero(), lambda: x[mask], lambda: x.masked_select(mask),
                lambda: torch.unique(x), lambda: torch.repeat_interleave(repeats),
                lambda: x.new_tensor([1.0, 2.0]), lambda: torch.tensor([1.0]), lambda: torch.as_tensor([1.0]),
                lambda: x.cpu(),
                lambda: list(range(10))[x[0, 1].long()], lambda: x.index_put_((mask,), torch.zeros(())),
                lambda: torch.equal(x, x)]
    for i, attempt in enumerate(attempts):
        with pytest.raises(HostSyncError), no_host_sync(monkeypatch):
            attempt()
    with no_host_sync(monkeypatch):            # what the sync-free code does instead passes
        torch.where(mask, x, 0.0).sum(0)
        x[:, torch.arange(2)]
        torch.as_tensor(x, dtype=torch.float32)
        torch.repeat_interleave(torch.arange(3), 2)


# ---------------------------------------------------------------------------------------------- the switch
def test_switch_defaults_by_device_and_can_be_forced():
    assert not use_sync_free(torch.device("cpu"))
    assert use_sync_free(torch.device("cuda")) and use_sync_free(torch.device("meta"))
    assert use_sync_free(torch.device("cpu"), True) and not use_sync_free(torch.device("cuda"), False)
    with forced_sync_free(True):
        assert use_sync_free(torch.device("cpu"))
        assert not use_sync_free(torch.device("cpu"), False)        # an explicit argument wins
    with forced_sync_free(False):
        assert not use_sync_free(torch.device("cuda"))
    assert not use_sync_free(torch.device("cpu"))


# -------------------------------------------------------------------------------------------------- bitwise
def _images(n, h, w, seed=0):
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if n >= 3:
        x[0] = x[0] // 3 + 50            # a narrow histogram (autocontrast, equalize)
        x[1] = 77                        # a flat image
        x[2, 0] = 200                    # one flat channel
    return x


SHAPES = [(1, 32, 32), (7, 31, 33), (64, 32, 32), (7, 17, 16)]


@pytest.mark.parametrize("n,h,w", SHAPES)
def test_apply_ops_every_op_and_magnitude_both_paths_equal(n, h, w):
    """Random op and magnitude per image over all 15 ops (signed tables both signs), with and without fill."""
    g = torch.Generator().manual_seed(n * 1000 + h)
    x = _images(n, h, w, seed=n + h)
    ops = torch.randint(0, len(OP_NAMES), (n,), generator=g)
    sizes = torch.tensor([len(signed_values(10, h, w, o)) for o in OP_NAMES])
    mags = (torch.rand(n, generator=g) * sizes[ops]).long()
    for fill in (None, 128.0):
        sub = apply_ops(x, ops, mags, 10, fill, sync_free=False)
        free = apply_ops(x, ops, mags, 10, fill, sync_free=True)
        assert torch.equal(sub, free), (fill, (sub.int() - free.int()).abs().amax((1, 2, 3)))


@pytest.mark.parametrize("n,h,w", SHAPES)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_auto_augment_both_paths_equal(policy, n, h, w):
    x = _images(n, h, w, seed=3)
    keys = sample_keys(11, 4, torch.arange(50, 50 + n))
    sub, p_sub = auto_augment(x, keys, policy, sync_free=False)
    free, p_free = auto_augment(x, keys, policy, sync_free=True)
    assert torch.equal(sub, free)
    assert all(torch.equal(p_sub[k], p_free[k]) for k in p_sub)


@pytest.mark.parametrize("n,h,w", SHAPES)
def test_reference_family_every_op_and_magnitude_both_paths_equal(n, h, w):
    """The references' AutoAugment family: random op and magnitude per image over its 15 ops, both signs."""
    g = torch.Generator().manual_seed(n * 1000 + w)
    x = _images(n, h, w, seed=n + w)
    ops = torch.randint(0, len(OP_NAMES), (n,), generator=g)
    sizes = torch.tensor([len(autoaugment_reference.signed_values(o)) for o in OP_NAMES])
    mags = (torch.rand(n, generator=g) * sizes[ops]).long()
    sub = autoaugment_reference.apply_ops(x, ops, mags, sync_free=False)
    free = autoaugment_reference.apply_ops(x, ops, mags, sync_free=True)
    assert torch.equal(sub, free), (sub.int() - free.int()).abs().amax((1, 2, 3))


@pytest.mark.parametrize("n,h,w", SHAPES)
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_reference_auto_augment_both_paths_equal(policy, n, h, w):
    x = _images(n, h, w, seed=13)
    keys = sample_keys(21, 3, torch.arange(n))
    sub, _ = autoaugment_reference.auto_augment(x, keys, policy, sync_free=False)
    free, _ = autoaugment_reference.auto_augment(x, keys, policy, sync_free=True)
    assert torch.equal(sub, free)


@pytest.mark.parametrize("n,h,w", SHAPES)
@pytest.mark.parametrize("num_ops,magnitude", [(2, 9), (3, 15)])
def test_rand_augment_both_paths_equal(n, h, w, num_ops, magnitude):
    x = _images(n, h, w, seed=4)
    keys = sample_keys(12, 1, torch.arange(n))
    sub, _ = rand_augment(x, keys, num_ops, magnitude, sync_free=False)
    free, _ = rand_augment(x, keys, num_ops, magnitude, sync_free=True)
    assert torch.equal(sub, free)


@pytest.mark.parametrize("n,h,w", SHAPES)
def test_color_jitter_both_paths_equal(n, h, w):
    g = torch.Generator().manual_seed(n + w)
    x = _images(n, h, w, seed=5)
    u, order_u = torch.rand(n, 4, generator=g), torch.rand(n, 4, generator=g)
    for apply in (torch.rand(n, generator=g) < 0.8, torch.ones(n, dtype=torch.bool),
                  torch.zeros(n, dtype=torch.bool)):
        assert torch.equal(color_jitter(x, apply, u, order_u, sync_free=False),
                           color_jitter(x, apply, u, order_u, sync_free=True))


@pytest.mark.parametrize("n,h,w", [(1, 32, 32), (7, 31, 33), (64, 32, 32)])
def test_multicrop_views_both_paths_equal(n, h, w):
    x = _images(n, h, w, seed=6)
    mc = MultiCrop(32, 16, local_crops=3)
    with forced_sync_free(False):
        sub = mc(x, 2, 1, torch.arange(n), torch.arange(n) % 2)
    with forced_sync_free(True):
        free = mc(x, 2, 1, torch.arange(n), torch.arange(n) % 2)
    assert all(torch.equal(a, b) for a, b in zip(sub, free))


def _recipes():
    both = PerceptibilityTransform(kind="both")
    return [
        (DataConfig(auto_augment="cifar10", erasing_prob=0.5, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0,
                    multicrop=True, local_crops=2), both),
        (DataConfig(auto_augment="svhn", erasing_prob=0.5, erasing_fill="pixel", cutmix_alpha=1.0, mix_prob=1.0),
         PerceptibilityTransform(kind="translate", fill="mean")),
        (DataConfig(auto_augment="imagenet", erasing_prob=0.5, erasing_fill="const", mixup_alpha=0.8, mix_prob=1.0),
         PerceptibilityTransform(kind="scale")),
        (DataConfig(auto_augment="rand", erasing_prob=0.25, mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=0.5), both),
        (DataConfig(auto_augment="cifar10", auto_augment_impl="reference", erasing_prob=0.25, mixup_alpha=1.0,
                    cutmix_alpha=1.0, mix_prob=1.0), both),
    ]


def _batch_tensors(batch) -> dict[str, torch.Tensor]:
    out = {"images": batch.images, "labels": batch.labels}
    out.update({f"p_{k}": v for k, v in batch.params.items()})
    if batch.soft_labels is not None:
        out["soft_labels"] = batch.soft_labels
    out.update({f"v_{k}": v for k, v in batch.views.items()})
    out.update({f"crop{i}": c for i, c in enumerate(batch.crops or [])})
    return out


@pytest.mark.parametrize("recipe", range(len(_recipes())))
@pytest.mark.parametrize("n,h,w", [(7, 32, 32), (64, 32, 32)])
def test_train_transform_both_paths_equal(recipe, n, h, w):
    data, perc = _recipes()[recipe]
    t = TrainTransform(data, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], seed=3, num_classes=10,
                       batch_transforms=[perc])
    x = _images(n, h, w, seed=7)
    labels = torch.arange(n) % 10
    with forced_sync_free(False):
        sub = _batch_tensors(t(x, labels, torch.arange(n), 2, torch.arange(n) % 3))
    with forced_sync_free(True):
        free = _batch_tensors(t(x, labels, torch.arange(n), 2, torch.arange(n) % 3))
    assert sub.keys() == free.keys()
    assert [k for k in sub if not torch.equal(sub[k], free[k])] == []


def test_sample_keys_unchanged():
    """The per-batch key base is hashed in Python ints now (no host tensor per batch): same keys as the
    all-tensor hashing it replaced."""
    index = torch.randint(0, 2 ** 31, (500,), generator=torch.Generator().manual_seed(0))
    for seed, epoch, view in ((0, 0, 0), (12345, 7, 3), (2 ** 40 + 5, 2 ** 33, 0x4D4958), (-3, 1, 1)):
        base = hash32(torch.tensor([seed & 0xFFFFFFFF], dtype=torch.int64))
        base = hash32(base ^ (epoch & 0xFFFFFFFF))
        base = hash32(base ^ (view & 0xFFFFFFFF))
        assert torch.equal(sample_keys(seed, epoch, index, view), hash32(base ^ (index & 0xFFFFFFFF)))


# ------------------------------------------------------------------------------------------------ no sync
def _recipe_batches(device, guard=None):
    """One batch of 7 (32 x 32) through each recipe's TrainTransform on `device`, after a warm-up batch (the
    statistics move to the device, the per-size tables are made); `guard` (a monkeypatch) guards the second."""
    transforms = [TrainTransform(data, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], seed=3, num_classes=10,
                                 batch_transforms=[perc]) for data, perc in _recipes()]

    def batch(t, offset):
        x = torch.randint(0, 256, (7, 3, 32, 32), dtype=torch.uint8, device=device)
        index = torch.arange(offset, offset + 7, device=device)
        return t(x, index % 10, index, 1, index % 2)

    for t in transforms:
        batch(t, 0)
    with no_host_sync(guard) if guard is not None else contextlib.nullcontext():
        return [batch(t, 100) for t in transforms]


def test_sync_free_pipeline_makes_no_host_sync_on_cpu(monkeypatch):
    with forced_sync_free(True):
        batches = _recipe_batches(torch.device("cpu"), guard=monkeypatch)
    assert len(batches) == len(_recipes()) and len(batches[0].crops) == 4
    assert batches[0].views["transformed"] is not None


def test_sub_batch_path_does_sync(monkeypatch):
    """The CPU default (sub-batches) reads op counts on the host: the guard sees it."""
    with forced_sync_free(False), pytest.raises(HostSyncError, match="nonzero"):
        _recipe_batches(torch.device("cpu"), guard=monkeypatch)


def _transform_caches():
    """Every lru_cache of the loaders.transforms modules (their tables are kept per device)."""
    for info in pkgutil.iter_modules(loaders.transforms.__path__):
        module = importlib.import_module(f"loaders.transforms.{info.name}")
        yield from (value for value in vars(module).values() if hasattr(value, "cache_clear"))


@pytest.fixture
def clean_transform_caches():
    """Fake tensors must not stay in the per-device table caches after the test."""
    for cache in _transform_caches():
        cache.cache_clear()
    yield
    for cache in _transform_caches():
        cache.cache_clear()


def test_cuda_pipeline_makes_no_host_sync_on_fake_cuda(monkeypatch, clean_transform_caches):
    """The same recipes on fake CUDA tensors, the path chosen by the device (not forced): FakeTensorMode also
    refuses anything that needs values (.item, nonzero), and the guard refuses host<->device copies."""
    from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode

    _recipe_batches(torch.device("cpu"))       # the host-side tables (Python floats computed on host tensors)
    with FakeTensorMode(allow_non_fake_inputs=True):
        try:
            torch.empty(1, device="cuda")
        except Exception as e:                 # noqa: BLE001 - a torch build without CUDA support at all
            pytest.skip(f"fake CUDA tensors unavailable: {e}")
        batches = _recipe_batches(torch.device("cuda"), guard=monkeypatch)
        assert batches[0].images.device.type == "cuda" and batches[0].crops[3].device.type == "cuda"
        on_device, on_host = torch.zeros(3, device="cuda"), torch.zeros(3)
        for attempt in (lambda: on_host.to("cuda"), lambda: on_device.copy_(on_host), lambda: on_device.cpu(),
                        lambda: on_device.to("cpu"), lambda: torch.nonzero(on_device)):
            with pytest.raises((HostSyncError, DynamicOutputShapeException)), no_host_sync(monkeypatch):
                attempt()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the fake-CUDA test runs without)")
def test_cuda_pipeline_makes_no_host_sync_on_a_real_gpu():
    """On a real GPU, CUDA's own sync detector (set_sync_debug_mode('error')) over a second batch of each recipe,
    and the batch draws the same parameters as on the CPU."""
    cuda = torch.device("cuda")
    transforms = [TrainTransform(data, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], seed=3, num_classes=10,
                                 batch_transforms=[perc]) for data, perc in _recipes()]
    x = _images(7, 32, 32, seed=9)
    index = torch.arange(100, 107)
    for t in transforms:
        t(x.to(cuda), index.to(cuda) % 10, index.to(cuda), 1, index.to(cuda) % 2)           # warm-up
    inputs = (x.to(cuda), index.to(cuda) % 10, index.to(cuda), 2, index.to(cuda) % 2)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        batches = [t(*inputs) for t in transforms]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t, on_gpu in zip(transforms, batches):
        on_cpu = _batch_tensors(t(x, index % 10, index, 2, index % 2))
        assert on_cpu.keys() == _batch_tensors(on_gpu).keys()
        assert torch.equal(on_cpu["p_crop"], on_gpu.params["crop"].cpu())        # same draws on both devices
