"""Triton kernels of the augmentation's counter hash (loaders/transforms/rng.py): one launch where the int64
PyTorch formulation takes ~45 small ops (mul, and, xor, shifts) per draw.

Do not import this module directly: `kernels.triton_runtime.load_kernels("kernels.counter_hash_triton", device, ...)`
loads it in the mode a launch needs (compiled on CUDA, Triton's interpreter on CPU under TRITON_INTERPRET=1).

The hash is lowbias32 on uint32, whose products wrap mod 2**32: the same bits as rng.hash32's int64 arithmetic on
32-bit values (tests/test_transforms_rng.py compares them on odd sizes).
- keys: (B,) int64 -> hash32((index mod 2**32) ^ base), then, where repeat != 0,
  hash32(key ^ hash32(repeat * 0x27D4EB2F + 0x165667B1)) (rng.keys_for);
- uniform: (B,) keys -> (B, n) float32 (bits >> 8) / 2**24 of hash32(hash32(key ^ (c * 0x9E37 + 0x632B)) ^ c),
  c = slot + j; with RANDINT, (B, n) int64 min(int(u * high), high - 1) (rng.uniform, rng.randint).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from kernels.triton_runtime import _load

BLOCK = 256

# drloc's lowbias32 (uint32), from its module built in this module's own mode (interpreted or compiled: a kernel may
# only call jit functions of its mode)
_hash32 = _load("kernels.drloc_triton", bool(triton.knobs.runtime.interpret))._hash32


@triton.jit(do_not_specialize=["base"])
def _keys_kernel(index_ptr, repeat_ptr, out_ptr, base, size, HAS_REPEAT: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < size
    index = tl.load(index_ptr + i, mask=mask, other=0)
    key = _hash32(index.to(tl.uint32) ^ base.to(tl.uint32))
    if HAS_REPEAT:
        repeat = tl.load(repeat_ptr + i, mask=mask, other=0)
        salt = _hash32(repeat.to(tl.uint32) * 0x27D4EB2F + 0x165667B1)
        key = tl.where(repeat == 0, key, _hash32(key ^ salt))
    tl.store(out_ptr + i, key.to(tl.int64), mask=mask)


@triton.jit(do_not_specialize=["slot", "high"])
def _uniform_kernel(keys_ptr, out_ptr, size, n, slot, high, RANDINT: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < size
    row = r // n
    counter = (slot + (r - row * n)).to(tl.uint32)
    key = tl.load(keys_ptr + row, mask=mask, other=0).to(tl.uint32)
    bits = _hash32(_hash32(key ^ (counter * 0x9E37 + 0x632B)) ^ counter)
    u = (bits >> 8).to(tl.float32) * (1.0 / 16777216.0)
    if RANDINT:
        value = (u * high.to(tl.float32)).to(tl.int64)
        tl.store(out_ptr + r, tl.minimum(value, high - 1), mask=mask)
    else:
        tl.store(out_ptr + r, u, mask=mask)


def counter_keys(index: torch.Tensor, base: int, repeat: Optional[torch.Tensor]) -> torch.Tensor:
    """(B,) int64 keys of `index` (B,) int64 under `base` (a 32-bit Python int), repeat (B,) int64 folded in."""
    index = index.contiguous()
    out = torch.empty(index.shape, dtype=torch.int64, device=index.device)
    size = index.numel()
    if size:
        rep = repeat.contiguous() if repeat is not None else index
        _keys_kernel[(triton.cdiv(size, BLOCK),)](index, rep, out, base, size, HAS_REPEAT=repeat is not None,
                                                  BLOCK=BLOCK)
    return out


def counter_uniform(keys: torch.Tensor, slot: int, n: int, high: Optional[int] = None) -> torch.Tensor:
    """(B, n) float32 draws slot..slot+n-1 of each key (B,) int64; with `high`, (B, n) int64 in [0, high)."""
    keys = keys.contiguous()
    out = torch.empty((keys.shape[0], n), dtype=torch.int64 if high is not None else torch.float32,
                      device=keys.device)
    size = out.numel()
    if size:
        _uniform_kernel[(triton.cdiv(size, BLOCK),)](keys, out, size, n, slot, 1 if high is None else high,
                                                     RANDINT=high is not None, BLOCK=BLOCK)
    return out
