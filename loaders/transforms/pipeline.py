"""The batched augmentation pipeline run on the training device after decoding: uint8 in, `Batch` out.

The loaders call `TrainTransform(images, labels, index, epoch)` on each decoded batch; every random draw comes from
counter-based keys (seed, epoch, sample index, view), so results do not depend on batching, workers or resume.
`data` is the run's data config (read by attribute: crop_padding, flip, ...); loaders never import engine.
"""
from __future__ import annotations

import torch

from loaders.batch import Batch
from loaders.transforms.basic import normalize, random_crop, random_flip
from loaders.transforms.rng import sample_keys


class EvalTransform:
    """uint8 (B, 3, H, W) -> normalized float in the model's dtype/memory format."""

    def __init__(self, mean, std, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.dtype = dtype
        self.channels_last = channels_last

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        x = normalize(images, self.mean, self.std, self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int = 0) -> Batch:
        return Batch(images=self.to_model(images), labels=labels.to(torch.int64), index=index)


class TrainTransform(EvalTransform):
    """pad-crop and flip on uint8, then normalize (the parts of the recipe built so far)."""

    def __init__(self, data, mean, std, seed: int, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        super().__init__(mean, std, dtype, channels_last)
        self.data = data
        self.seed = seed
        unsupported = [name for name, on in [
            ("data.auto_augment", data.auto_augment != "none"), ("data.mixup_alpha", data.mixup_alpha > 0),
            ("data.cutmix_alpha", data.cutmix_alpha > 0), ("data.erasing_prob", data.erasing_prob > 0)] if on]
        if unsupported:
            raise NotImplementedError(f"{', '.join(unsupported)}: not built yet in the GPU augmentation suite")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int = 0) -> Batch:
        keys = sample_keys(self.seed, epoch, index)
        params: dict[str, torch.Tensor] = {}
        if self.data.crop_padding:
            images, params["crop"] = random_crop(images, keys, self.data.crop_padding, slot=0)
        if self.data.flip:
            images, params["flip"] = random_flip(images, keys, slot=2)
        return Batch(images=self.to_model(images), labels=labels.to(torch.int64), index=index, params=params)
