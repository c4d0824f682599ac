"""The reference repos' data path: a torch DataLoader with worker processes running per-image torchvision
transforms, kept as the baseline for bench/ and as the per-image reference for the batched suite.

Source: a .beton (decoded once into arrays, like the reference's in-memory CIFAR) or an ImageFolder directory
(PIL decode per image in the workers, like torchvision.datasets.ImageFolder). Each worker applies the uint8 stage
image by image with torchvision.transforms.functional (pad + crop, hflip, AutoAugment/RandAugment via
torchvision's own `_apply_op`), with parameters drawn from the same counter-based keys as the batched suite, so
for a given seed this loader yields the same batches as the resident/ffcv loaders (tests check it) and the same
batches whatever the worker count. style='pil' runs the reference's PIL transforms instead (RandomHorizontalFlip,
RandomCrop(padding), AutoAugment on PIL images, the global RNG seeded per sample from its key): the bench
baseline. The batch stage (normalize, erasing, mixing, the tasks' batch transforms) runs in the main process
through the TrainTransform's `finish`, as the reference runs mixing on the batch.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from loaders.batch import Batch
from loaders.convert.imagefolder import image_folder_files  # the converter's listing: same order and count
from loaders.order import EpochPlan
from loaders.sidecar import DatasetFileError
from loaders.transforms.pipeline import EvalTransform, TrainTransform
from loaders.upload import upload


def augment_one(image: torch.Tensor, key: torch.Tensor, data) -> torch.Tensor:
    """The uint8 stage for one image (3, H, W) with torchvision.transforms.functional, key () int64 (the
    references' AutoAugment family, which torchvision lacks, as a batch of one)."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.autoaugment import _apply_op

    from loaders.transforms.autoaugment import OP_NAMES, auto_augment_params, rand_augment_params, signed_values
    from loaders.transforms.rng import randint, uniform

    keys = key.view(1)
    h, w = image.shape[-2:]
    if data.crop_padding:
        top, left = randint(keys, 0, 2 * data.crop_padding + 1, n=2)[0].tolist()
        image = TF.crop(TF.pad(image, [data.crop_padding], fill=0), top, left, h, w)
    if data.flip and float(uniform(keys, 2)[0, 0]) < 0.5:
        image = TF.hflip(image)
    if data.auto_augment != "none" and getattr(data, "auto_augment_impl", "torchvision") == "reference":
        from loaders.transforms.autoaugment_reference import auto_augment as reference_auto_augment

        return reference_auto_augment(image.unsqueeze(0), keys, data.auto_augment)[0][0]   # no torchvision op
    if data.auto_augment != "none":
        if data.auto_augment == "rand":
            p = rand_augment_params(keys, data.rand_augment_ops, data.rand_augment_magnitude)
            bins = 31
        else:
            p = auto_augment_params(keys, data.auto_augment)
            bins = 10
        for stage in range(p["op"].shape[1]):
            name = OP_NAMES[int(p["op"][0, stage])]
            if name == "Identity":
                continue
            value = signed_values(bins, h, w, name)[int(p["mag_idx"][0, stage])]
            image = _apply_op(image, name, value, InterpolationMode.NEAREST, None)
    return image


def pil_pipeline(data, height: int):
    """The reference repos' per-image PIL transforms for the uint8 stage (SPT_LSA_ViT/main.py order)."""
    from torchvision import transforms as T

    steps = []
    if data.flip:
        steps.append(T.RandomHorizontalFlip())
    if data.crop_padding:
        steps.append(T.RandomCrop(height, padding=data.crop_padding))
    if data.auto_augment == "rand":
        steps.append(T.RandAugment(data.rand_augment_ops, data.rand_augment_magnitude))
    elif data.auto_augment != "none":
        steps.append(T.AutoAugment(T.AutoAugmentPolicy(data.auto_augment)))
    return T.Compose(steps)


class _Samples(Dataset):
    """Item (index, repeat) -> (uint8 (3, H, W) augmented, label, index, repeat).

    style 'keyed': torchvision.transforms.functional on tensors with our keyed parameters (bit-equal to the
    batched suite); 'pil': the reference's PIL transforms, their global RNG seeded from the sample's key (so
    still the same result for any worker count, but not the batched suite's draws) — the speed baseline.
    """

    def __init__(self, images: Optional[np.ndarray], labels: np.ndarray, files: Optional[list[str]],
                 transform, epoch: int, style: str = "keyed"):
        self.images, self.labels, self.files = images, labels, files
        self.transform, self.epoch, self.style = transform, epoch, style
        self.pil = None

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return torch.from_numpy(np.ascontiguousarray(self.images[i]))
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()

    def __getitem__(self, item):
        i, repeat, key = item
        image = self._load(i)
        if isinstance(self.transform, TrainTransform):
            if self.style == "pil":
                import random

                from PIL import Image

                if self.pil is None:
                    self.pil = pil_pipeline(self.transform.data, image.shape[-2])
                torch.random.default_generator.manual_seed(key)     # CPU generator only: cheap per sample
                random.seed(key)
                out = self.pil(Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy())))
                image = torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1).contiguous()
            else:
                image = augment_one(image, torch.tensor(key, dtype=torch.int64), self.transform.data)
        return image, int(self.labels[i]), i, repeat


class _PlanBatches:
    """Batch sampler: the rank's share of the plan as lists of (index, repeat, key) — keys computed per epoch in
    one vectorized call, not per sample in the workers."""

    def __init__(self, order: np.ndarray, repeats: np.ndarray, keys: np.ndarray, per: int):
        self.order, self.repeats, self.keys, self.per = order, repeats, keys, per

    def __len__(self) -> int:
        return -(-len(self.order) // self.per)

    def __iter__(self):
        for s in range(0, len(self.order), self.per):
            sl = slice(s, s + self.per)
            yield list(zip(self.order[sl].tolist(), self.repeats[sl].tolist(), self.keys[sl].tolist()))


def _collate(items):
    """The images only: labels, index and repeat are slices of the epoch's arrays already on the device."""
    return torch.stack([it[0] for it in items])


class TorchvisionLoader:
    """Yields `Batch`es for one rank from a torch DataLoader with `num_workers` worker processes."""

    def __init__(self, source: str | Path, plan: EpochPlan, transform, device: torch.device, rank: int = 0,
                 world_size: int = 1, num_workers: int = 2, style: str = "keyed"):
        """style: 'keyed' (default; same batches as the batched loaders) or 'pil' (the reference's PIL
        transforms: the bench baseline). See _Samples."""
        if style not in ("keyed", "pil"):
            raise ValueError(f"torchvision loader style must be 'keyed' or 'pil', got {style!r}")
        self.style = style
        source = Path(source)
        self.images: Optional[np.ndarray] = None
        self.files: Optional[list[str]] = None
        if source.is_dir():
            self.files, self.labels, _ = image_folder_files(source)
        else:
            from loaders.ffcv_loader import read_all

            images, labels = read_all(source)
            self.images, self.labels = images.numpy(), labels.numpy()
        if len(self.labels) != plan.num_samples:
            raise DatasetFileError(f"{source}: holds {len(self.labels)} samples, the plan expects {plan.num_samples}")
        if getattr(transform, "multicrop", None) is not None:
            raise NotImplementedError("data.multicrop: the torchvision baseline loader does not cut multi-crop "
                                      "views; use the resident, ffcv or dali loader")
        self.plan, self.transform, self.device = plan, transform, device
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.device_labels = upload(torch.from_numpy(self.labels), device)

    def __len__(self) -> int:
        return self.plan.steps()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = self.plan.rank_order(epoch, self.rank, self.world_size, start_step)
        repeats = self.plan.rank_repeats(self.rank, self.world_size, start_step)
        dataset = _Samples(self.images, self.labels, self.files, self.transform, epoch, self.style)
        if isinstance(self.transform, TrainTransform):
            keys = self.transform.keys(torch.from_numpy(order), epoch, torch.from_numpy(repeats)).numpy()
        else:
            keys = np.zeros(len(order), dtype=np.int64)
        loader = DataLoader(dataset, batch_sampler=_PlanBatches(order, repeats, keys, self.plan.per_rank_batch(
            self.world_size)), num_workers=self.num_workers, collate_fn=_collate,
            pin_memory=self.device.type == "cuda")
        on_device = upload(torch.from_numpy(order), self.device)          # the epoch's order and repeats: one
        repeats_on_device = upload(torch.from_numpy(repeats), self.device)  # upload each, then device slices
        per = self.plan.per_rank_batch(self.world_size)
        for step, images in enumerate(loader):
            images = upload(images, self.device)
            index = on_device[step * per:step * per + len(images)]
            labels = self.device_labels[index]
            t = self.transform
            if isinstance(t, TrainTransform):
                repeat = repeats_on_device[step * per:step * per + len(images)]
                keys = t.keys(index, epoch, repeat)
                yield t.finish(images, labels, index, keys, t.batch_key(index, epoch, repeat), {})
            elif isinstance(t, EvalTransform):
                yield t(images, labels, index, epoch)
            else:
                yield t(images, labels, index, epoch)
