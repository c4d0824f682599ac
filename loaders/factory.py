"""Pick and build a loader from the data config: one call for training and one for evaluation.

`data` is the run's data config, read by attribute (loaders never import engine). 'auto' means resident when the
split fits in `data.resident_max_fraction` of device memory, else ffcv. `data.order` (random / quasi_random) picks
the training order for every loader alike (loaders.order); quasi_random reads the pages from the .beton.

Every split is normalised with the training split's mean/std (its sidecar's, or the statistics a run recorded), as
the references normalise with fixed training statistics: a test split's own statistics would partly undo a shift
or corruption of the test set.
"""
from __future__ import annotations

import logging

import torch

from loaders.order import EpochPlan
from loaders.sidecar import DatasetFileError, read_sidecar
from loaders.transforms.pipeline import EvalTransform, TrainTransform

log = logging.getLogger("smallvit.loaders")


def check_sidecar(meta: dict, path: str, data, split_role: str) -> None:
    """Refuse a .beton made from another dataset than the config names (when it names one), or at a size the model
    cannot take (naming the conversion option that fixes it)."""
    if data.dataset and meta["dataset"] != data.dataset:
        raise DatasetFileError(f"{path}: holds dataset '{meta['dataset']}' but data.dataset is '{data.dataset}'")
    h, w = meta["image"]["height"], meta["image"]["width"]
    if h is None or w is None:
        raise DatasetFileError(f"{path}: images have mixed sizes ({meta['image'].get('min_size')} to "
                               f"{meta['image'].get('max_size')}); convert with --resize {data.image_size}")
    if h != w:
        raise DatasetFileError(f"{path}: images are {h}x{w}, not square: convert with --resize {data.image_size} "
                               f"(shorter side to {data.image_size}, centre crop)")
    if (h, w) != (data.image_size, data.image_size):
        raise DatasetFileError(f"{path}: images are {h}x{w} but data.image_size is {data.image_size}: set "
                               f"data.image_size={h} or convert with --resize {data.image_size}")


def preflight(data) -> dict:
    """Check both splits' files before any work starts (sidecar, header, dataset name, image size).

    Returns the training split's sidecar; raises DatasetFileError naming the file at fault.
    """
    from loaders.ffcv_loader import check_beton

    metas = {}
    for role in ("train", "test"):
        path = getattr(data, role)
        if not path:
            raise DatasetFileError(f"data.{role}: no dataset path given")
        meta = read_sidecar(path)
        check_sidecar(meta, path, data, role)
        check_beton(path, meta)
        metas[role] = meta
    if metas["train"]["classes"] != metas["test"]["classes"]:
        raise DatasetFileError(f"{data.test}: its classes differ from those of {data.train}")
    return metas["train"]


def training_statistics(data) -> tuple[list[float], list[float]]:
    """(mean, std) per channel, fractions of 255, of the training split named by data.train (its sidecar)."""
    if not data.train:
        raise DatasetFileError("data.train: evaluation normalises with the training split's mean/std, and no "
                               "training split is named")
    meta = read_sidecar(data.train)
    return list(meta["mean"]), list(meta["std"])


def eval_global_batch(requested: int, num_images: int, world_size: int) -> int:
    """data.eval_batch_size as the evaluation plan uses it: at most the split (a smaller request stays), rounded down
    to a multiple of the world size (at least one image per rank), so that it splits over the ranks."""
    batch = min(requested, max(world_size, num_images))
    return max(world_size, batch // world_size * world_size)


def build_loader(data, train: bool, seed: int, device: torch.device, rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, *, label_smoothing: float = 0.1,
                 batch_transforms=(), subset=None, path=None, stats: tuple | None = None):
    """-> (loader with .epoch(e, start_step) yielding Batch and len() = steps per epoch, sidecar dict).

    label_smoothing (optim.label_smoothing) is folded into the soft labels when mixup/cutmix is on;
    batch_transforms: the auxiliary tasks' loader-side transforms (loaders.transforms.pipeline), run on training
    batches in order: their views go into Batch.views, their draws into Batch.params.
    subset: the sample indices to draw from (loaders.holdout), path: the file (default data.train / data.test);
    a validation loader is train=False over data.train with the held-out subset.
    stats: (mean, std) to normalise an evaluation split with; default the training split's (training_statistics).
    """
    path = path or (data.train if train else data.test)
    if not path:
        raise DatasetFileError(f"data.{'train' if train else 'test'}: no dataset path given")
    meta = read_sidecar(path)
    check_sidecar(meta, path, data, "train" if train else "test")
    if train:
        global_batch = data.batch_size
    else:
        count = meta["num_images"] if subset is None else len(subset)
        global_batch = eval_global_batch(data.eval_batch_size, count, world_size)
    order = getattr(data, "order", "random")
    pages = None
    if train and order == "quasi_random":
        from loaders.ffcv_loader import beton_pages

        pages = beton_pages(path)
    plan = EpochPlan(num_samples=meta["num_images"], global_batch=global_batch, seed=seed,
                     repeats=data.repeats if train else 1, shuffle=train, drop_last=data.drop_last if train else False,
                     order=order, pages=pages, subset=subset, lockstep_ranks=world_size if train else 0)
    if train:
        transform = TrainTransform(data, meta["mean"], meta["std"], seed, dtype, channels_last,
                                   num_classes=meta["num_classes"], label_smoothing=label_smoothing,
                                   batch_transforms=batch_transforms)
    else:
        mean, std = stats if stats is not None else training_statistics(data)
        transform = EvalTransform(mean, std, dtype, channels_last)
    kind = data.loader
    if kind == "auto":
        from loaders.resident import fits_on_device

        nbytes = meta["num_images"] * 3 * meta["image"]["height"] * meta["image"]["width"]
        ok, why = fits_on_device(nbytes, device, data.resident_max_fraction)
        kind = "resident" if ok else "ffcv"
        # said once per run, on rank 0, for the training split: the test, validation and k-NN loaders choose again
        announce = rank == 0 and train
        log.log(logging.INFO if announce else logging.DEBUG, "loader auto -> %s (%s)", kind, why)
    if kind == "resident":
        from loaders.resident import ResidentLoader

        loader = ResidentLoader.from_beton(path, plan, transform, device, rank, world_size, data.num_workers,
                                           data.resident_max_fraction)
    elif kind == "ffcv":
        from loaders.ffcv_loader import FFCVLoader

        loader = FFCVLoader(path, plan, transform, device, rank, world_size, data.num_workers, data.os_cache)
    elif kind == "dali":
        from loaders.dali_loader import DALILoader

        loader = DALILoader(path, plan, transform, device, rank, world_size, data.num_workers, data.image_size)
    elif kind == "torchvision":
        from loaders.torchvision_loader import TorchvisionLoader

        loader = TorchvisionLoader(path, plan, transform, device, rank, world_size, data.num_workers)
    else:
        raise ValueError(f"data.loader: unknown loader {kind!r}")
    return loader, meta
