"""Counter-based random numbers for augmentation, keyed by (seed, epoch, sample index, view, slot).

Every random parameter of every transform is a pure function of its key, never of a generator's state, so the
same sample gets the same augmentation whatever the batch size, worker count, prefetch depth, rank count or
resume point. Integer work stays in int64 with 32-bit values so CPU and CUDA give identical bits.

The three hashing steps every transform calls (keys, uniform draws, integer draws) are one fused op each
(`torch.ops.smallvit.counter_*`): on CUDA one Triton launch (kernels/counter_hash_triton.py, the same bits; the
PyTorch form when triton is missing), elsewhere the int64 PyTorch formulation below (~45 small ops per call: a
host launch each on a GPU). On 'meta' and fake tensors they give the shape only, counted as one launch.
"""
from __future__ import annotations

from typing import Optional

import torch

_MASK32 = 0xFFFFFFFF
REPEAT_MUL, REPEAT_ADD = 0x27D4EB2F, 0x165667B1      # how a repeat number salts the keys
COUNTER_MUL, COUNTER_ADD = 0x9E37, 0x632B           # how a draw's counter enters the hash


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


def key_base(seed: int, epoch: int, view: int = 0) -> int:
    """The 32-bit base of a pass's keys, hashed in Python ints (a tensor built from them per batch would be a
    host-to-device copy, a sync, on CUDA)."""
    return hash32(hash32(hash32(seed & _MASK32) ^ (epoch & _MASK32)) ^ (view & _MASK32))


# ------------------------------------------------------------------------------------------ the plain forms
def _keys_plain(index: torch.Tensor, base: int, repeat: Optional[torch.Tensor]) -> torch.Tensor:
    keys = hash32((index.to(torch.int64) & _MASK32) ^ base)
    if repeat is None:
        return keys
    repeat = repeat.to(torch.int64)
    return torch.where(repeat == 0, keys, hash32(keys ^ hash32(repeat * REPEAT_MUL + REPEAT_ADD)))


def _uniform_plain(keys: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    counters = torch.arange(slot, slot + n, dtype=torch.int64, device=keys.device)
    bits = hash32(hash32(keys[:, None] ^ (counters[None, :] * COUNTER_MUL + COUNTER_ADD)) ^ counters[None, :])
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def _randint_plain(keys: torch.Tensor, slot: int, high: int, n: int) -> torch.Tensor:
    return torch.clamp((_uniform_plain(keys, slot, n) * high).to(torch.int64), max=high - 1)


# ---------------------------------------------------------------------------------------------- fused ops
def _triton_hash(device: torch.device):
    """The Triton launchers for `device`, or None where the PyTorch form runs (no triton installed)."""
    from kernels.triton_runtime import load_kernels, triton_available

    if not triton_available():
        return None
    return load_kernels("kernels.counter_hash_triton", device, "counter hash")


@torch.library.custom_op("smallvit::counter_keys", mutates_args=())
def counter_keys(index: torch.Tensor, base: int, repeat: Optional[torch.Tensor]) -> torch.Tensor:
    """(B,) int64 keys: hash32((index mod 2**32) ^ base), each repeat != 0 hashed in (see keys_for)."""
    return _keys_plain(index, base, repeat)


@counter_keys.register_kernel("cuda")
def _counter_keys_cuda(index, base, repeat):
    kernels = _triton_hash(index.device)
    if kernels is None:
        return _keys_plain(index, base, repeat)
    return kernels.counter_keys(index.to(torch.int64), base, None if repeat is None else repeat.to(torch.int64))


@counter_keys.register_fake
def _(index, base, repeat):
    return torch.empty(index.shape, dtype=torch.int64, device=index.device)


@torch.library.custom_op("smallvit::counter_uniform", mutates_args=())
def counter_uniform(keys: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """(B, n) float32 in [0, 1): draws slot..slot+n-1 of each key (B,)."""
    return _uniform_plain(keys, slot, n)


@counter_uniform.register_kernel("cuda")
def _counter_uniform_cuda(keys, slot, n):
    kernels = _triton_hash(keys.device)
    return _uniform_plain(keys, slot, n) if kernels is None else kernels.counter_uniform(keys, slot, n)


@counter_uniform.register_fake
def _(keys, slot, n):
    return torch.empty((keys.shape[0], n), dtype=torch.float32, device=keys.device)


@torch.library.custom_op("smallvit::counter_randint", mutates_args=())
def counter_randint(keys: torch.Tensor, slot: int, high: int, n: int) -> torch.Tensor:
    """(B, n) int64 in [0, high): min(int(u * high), high - 1) of the uniform draws slot..slot+n-1."""
    return _randint_plain(keys, slot, high, n)


@counter_randint.register_kernel("cuda")
def _counter_randint_cuda(keys, slot, high, n):
    kernels = _triton_hash(keys.device)
    return _randint_plain(keys, slot, high, n) if kernels is None else kernels.counter_uniform(keys, slot, n, high)


@counter_randint.register_fake
def _(keys, slot, high, n):
    return torch.empty((keys.shape[0], n), dtype=torch.int64, device=keys.device)


# ------------------------------------------------------------------------------------------------ the API
def keys_for(seed: int, epoch: int, index: torch.Tensor, view: int = 0,
             repeat: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B,) int64 keys for the samples `index` (B,) of `epoch`; `view` separates multi-crop views / passes;
    repeat (B,) (on index's device) gives every repeat != 0 of a sample its own stream (repeat 0: the plain key).
    One fused op: repeat_keys(sample_keys(seed, epoch, index, view), repeat)."""
    return counter_keys(index, key_base(seed, epoch, view), repeat)


def sample_keys(seed: int, epoch: int, index: torch.Tensor, view: int = 0) -> torch.Tensor:
    """(B,) int64 keys for the samples `index` (B,) of `epoch`; `view` separates multi-crop views / passes."""
    return counter_keys(index, key_base(seed, epoch, view), None)


def repeat_keys(keys: torch.Tensor, repeat: Optional[torch.Tensor]) -> torch.Tensor:
    """Fold the repeat number (B,) into the keys; repeat 0 (or None) leaves them unchanged."""
    if repeat is None:
        return keys
    repeat = repeat.to(keys.device, torch.int64)
    return torch.where(repeat == 0, keys, hash32(keys ^ hash32(repeat * REPEAT_MUL + REPEAT_ADD)))


def uniform(keys: torch.Tensor, slot: int, n: int = 1) -> torch.Tensor:
    """(B, n) float32 in [0, 1): independent draws number slot..slot+n-1 for each key."""
    return counter_uniform(keys, slot, n)


def randint(keys: torch.Tensor, slot: int, high: int, n: int = 1) -> torch.Tensor:
    """(B, n) int64 uniform in [0, high)."""
    return counter_randint(keys, slot, high, n)
