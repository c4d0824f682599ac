"""The choice between two formulations of per-image op choices (AutoAugment/RandAugment ops, ColorJitter order).

- sub-batches: gather the images that drew an op (nonzero + index_select), run the op on them, write them back;
- sync-free: run each op on the whole batch and keep, per image, the op it drew (torch.where); no
  data-dependent shapes, so nothing waits for the device.

Both give bit-identical images (every op is per image; tests/test_transforms_sync_free.py).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

# nonzero reads each op's image count back to the host: a sync per op kind that stalls a CUDA stream (and
# cannot be graph-captured), so non-CPU devices take the sync-free form; on the CPU the sync is free but the
# sync-free form costs every op on every image (AutoAugment: ~14x the work), so the CPU keeps sub-batches.
# None = choose by device; True/False forces one form everywhere (tests, benchmarks).
SYNC_FREE_OVERRIDE: Optional[bool] = None


def use_sync_free(device: torch.device, sync_free: Optional[bool] = None) -> bool:
    """Whether per-image op choices on `device` take the sync-free form: an explicit `sync_free` wins, then
    SYNC_FREE_OVERRIDE, else True on any device but the CPU."""
    if sync_free is not None:
        return sync_free
    if SYNC_FREE_OVERRIDE is not None:
        return SYNC_FREE_OVERRIDE
    return device.type != "cpu"


@contextlib.contextmanager
def forced_sync_free(on: Optional[bool]) -> Iterator[None]:
    """Set SYNC_FREE_OVERRIDE to `on` inside the block (None: by device again)."""
    global SYNC_FREE_OVERRIDE
    before, SYNC_FREE_OVERRIDE = SYNC_FREE_OVERRIDE, on
    try:
        yield
    finally:
        SYNC_FREE_OVERRIDE = before


def per_image(choose: torch.Tensor, chosen: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """choose (B,) bool -> image i of `chosen` where choose[i], else of `other` ((B, ...) each)."""
    return torch.where(choose.view(-1, *([1] * (chosen.dim() - 1))), chosen, other)
