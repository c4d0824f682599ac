"""Which samples each rank sees in each step: one plan shared by every loader backend.

An epoch is `repeats` fresh permutations of 0..N-1 concatenated (the recipes' "repeated augmentation": an epoch of
3 passes). The global batch t covers plan[t*G : (t+1)*G] with G = per_rank_batch * world_size; rank r takes
its r-th contiguous slice. With drop_last the tail shorter than G is dropped, so every sample appears at most
`repeats` times per epoch and every rank runs the same number of steps. The plan depends only on (seed, epoch,
N, repeats, G), not on the worker count or on how many ranks share G, so a resumed run (at a global step) or a
run with another world size at the same global batch sees exactly the same samples.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    num_samples: int
    global_batch: int
    seed: int = 0
    repeats: int = 1
    shuffle: bool = True
    drop_last: bool = True

    def permutation(self, epoch: int) -> np.ndarray:
        """(repeats * N,) int64 sample indices for `epoch`, in global order."""
        if not self.shuffle:
            return np.tile(np.arange(self.num_samples, dtype=np.int64), self.repeats)
        rng = np.random.Generator(np.random.Philox(key=[self.seed & 0xFFFFFFFFFFFFFFFF, epoch]))
        return np.concatenate([rng.permutation(self.num_samples) for _ in range(self.repeats)]).astype(np.int64)

    def steps(self) -> int:
        """Global steps (batches) per epoch."""
        total = self.num_samples * self.repeats
        return total // self.global_batch if self.drop_last else -(-total // self.global_batch)

    def rank_positions(self, rank: int = 0, world_size: int = 1, start_step: int = 0) -> np.ndarray:
        """Positions in the epoch's concatenated permutations that rank `rank` reads, batch after batch, from
        global step `start_step` to the epoch's end (position p belongs to repeat p // N).

        Each per-rank batch has global_batch // world_size samples (the last one may be shorter without
        drop_last). Raises ValueError when the global batch does not split evenly over the ranks.
        """
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} does not split over {world_size} ranks")
        total = self.steps() * self.global_batch if self.drop_last else self.num_samples * self.repeats
        chunks = []
        for t in range(start_step, self.steps()):
            step_start = t * self.global_batch
            step_len = min(self.global_batch, total - step_start)
            share = -(-step_len // world_size)
            lo = step_start + min(rank * share, step_len)
            hi = step_start + min((rank + 1) * share, step_len)
            chunks.append(np.arange(lo, hi, dtype=np.int64))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)

    def rank_order(self, epoch: int, rank: int = 0, world_size: int = 1, start_step: int = 0) -> np.ndarray:
        """The sample indices rank `rank` reads from global step `start_step` to the epoch's end."""
        return self.permutation(epoch)[self.rank_positions(rank, world_size, start_step)]

    def rank_repeats(self, rank: int = 0, world_size: int = 1, start_step: int = 0) -> np.ndarray:
        """The repeat number (0..repeats-1) of each sample rank_order returns, in the same order."""
        return self.rank_positions(rank, world_size, start_step) // self.num_samples

    def per_rank_batch(self, world_size: int) -> int:
        return self.global_batch // world_size
