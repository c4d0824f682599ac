"""GPU-resident loader: the whole uint8 split copied once to device memory and indexed per batch.

No worker processes, no per-batch host work or copy (the epoch's order is uploaded once per epoch): at CIFAR
size the device gathers and transforms a batch in microseconds. Used by default when the split fits in `max_fraction` of free device memory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from loaders.batch import Batch
from loaders.order import EpochPlan
from loaders.sidecar import DatasetFileError
from loaders.upload import upload


def fits_on_device(nbytes: int, device: torch.device, max_fraction: float) -> tuple[bool, str]:
    """Whether `nbytes` fit in max_fraction of the device's free memory, and a one-line reason."""
    if device.type != "cuda":
        return True, "CPU tensors"
    free, total = torch.cuda.mem_get_info(device)
    ok = nbytes <= max_fraction * free
    return ok, (f"{nbytes / 2**20:.0f} MiB {'fits in' if ok else 'exceeds'} {max_fraction:.0%} of "
                f"{free / 2**20:.0f} MiB free on {device}")


class ResidentLoader:
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, plan: EpochPlan, transform,
                 device: torch.device, rank: int = 0, world_size: int = 1, origin: str = ""):
        """images: uint8 (N, 3, H, W) (any device; moved once), labels (N,) int64."""
        if images.shape[0] != plan.num_samples:
            raise DatasetFileError(f"{origin}: holds {images.shape[0]} samples, its sidecar says {plan.num_samples}")
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.plan, self.transform, self.device = plan, transform, device
        self.rank, self.world_size = rank, world_size

    @classmethod
    def from_beton(cls, path: str | Path, plan: EpochPlan, transform, device: torch.device, rank: int = 0,
                   world_size: int = 1, num_workers: int = 1, max_fraction: float = 0.5) -> "ResidentLoader":
        from loaders.ffcv_loader import read_all

        images, labels = read_all(path, num_workers)
        ok, why = fits_on_device(images.numel(), device, max_fraction)
        if not ok:
            raise MemoryError(f"{path}: resident loader does not fit ({why}); use data.loader=ffcv")
        return cls(images, labels, plan, transform, device, rank, world_size, origin=str(path))

    def __len__(self) -> int:
        return self.plan.steps()

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        order = upload(torch.from_numpy(self.plan.rank_order(epoch, self.rank, self.world_size, start_step)),
                       self.device)
        repeats = upload(torch.from_numpy(self.plan.rank_repeats(self.rank, self.world_size, start_step)),
                         self.device)
        per = self.plan.per_rank_batch(self.world_size)
        for start in range(0, len(order), per):
            index = order[start:start + per]
            yield self.transform(self.images[index], self.labels[index], index, epoch, repeats[start:start + per])
