"""Counter-based random numbers for augmentation, keyed by (seed, epoch, sample index, view, slot).

Every random parameter of every transform is a pure function of its key, never of a generator's state, so the
same sample gets the same augmentation whatever the batch size, worker count, prefetch depth, rank count or
resume point. Integer work stays in int64 with 32-bit values so CPU and CUDA give identical bits.
"""
from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor | int, m: int) -> torch.Tensor | int:
    """(x * m) mod 2**32 for x < 2**32, without overflowing int64."""
    hi = ((x * (m >> 16)) & 0xFFFF) << 16
    return (hi + x * (m & 0xFFFF)) & _MASK32


def hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """The 'lowbias32' integer hash on int64 tensors holding 32-bit values (or on a Python int: the same bits)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def sample_keys(seed: int, epoch: int, index: torch.Tensor, view: int = 0) -> torch.Tensor:
    """(B,) int64 keys for the samples `index` (B,) of `epoch`; `view` separates multi-crop views / passes."""
    # the base in Python ints: a tensor built from them per batch would be a host-to-device copy (a sync) on CUDA
    base = hash32(hash32(hash32(seed & _MASK32) ^ (epoch & _MASK32)) ^ (view & _MASK32))
    return hash32((index.to(torch.int64) & _MASK32) ^ base)


def uniform(keys: torch.Tensor, slot: int, n: int = 1) -> torch.Tensor:
    """(B, n) float32 in [0, 1): independent draws number slot..slot+n-1 for each key."""
    counters = torch.arange(slot, slot + n, dtype=torch.int64, device=keys.device)
    bits = hash32(hash32(keys[:, None] ^ (counters[None, :] * 0x9E37 + 0x632B)) ^ counters[None, :])
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def randint(keys: torch.Tensor, slot: int, high: int, n: int = 1) -> torch.Tensor:
    """(B, n) int64 uniform in [0, high)."""
    return torch.clamp((uniform(keys, slot, n) * high).to(torch.int64), max=high - 1)
