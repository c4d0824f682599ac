"""Which samples each rank sees in each step: one plan shared by every loader backend.

An epoch is `repeats` fresh permutations of 0..N-1 concatenated (the recipes' "repeated augmentation": an epoch of
3 passes). The global batch t covers plan[t*G : (t+1)*G] with G = per_rank_batch * world_size; rank r takes
its r-th contiguous slice. With drop_last the tail shorter than G is dropped, so every sample appears at most
`repeats` times per epoch and every rank runs the same number of steps. The plan depends only on (seed, epoch,
N, repeats, G), not on the worker count or on how many ranks share G, so a resumed run (at a global step) or a
run with another world size at the same global batch sees exactly the same samples.

Without drop_last the tail is a shorter last step. Training ranks step in lockstep (every step all-reduces the
gradients), so a rank without a batch for it would wait forever in another collective: with `lockstep_ranks` = n
the tail is split evenly, tail // n samples per rank, its remainder (< n samples) dropped, and a tail shorter than
n is no step at all. Evaluation (lockstep_ranks 0) has no per-step collective and sees every sample exactly once:
ceil shares, so a rank may run one batch fewer.

`order='quasi_random'` is FFCV's quasi-random order (ffcv.traversal_order.QuasiRandom), for a .beton read through
FFCV's process cache (`data.os_cache=false`: pages loaded on demand) where a uniform permutation would make every
batch touch pages all over the file. `pages` (N,) gives each sample's page in the file; each pass shuffles the
samples within each page, takes the pages in a random order into a window of at most `2 * global_batch` open
pages (FFCV: 2 * batch size), and draws each next sample from a page chosen uniformly in the window, a page
leaving it once all its samples are drawn. Still a permutation of 0..N-1 per pass, seeded by (seed, epoch) like
the random one (its own draws, not FFCV's generator), so it resumes and shards exactly like it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

ORDERS = ("random", "quasi_random")


def _draw_from_window(by_page: np.ndarray, page_starts: np.ndarray, page_sizes: np.ndarray, page_order: np.ndarray,
                      picks: np.ndarray, window: int) -> np.ndarray:
    """The quasi-random walk: samples grouped by page (`by_page`, page p at page_starts[p], page_sizes[p] long,
    already shuffled within each page), pages entering the window in `page_order`, `picks` (N,) uniform [0, 1)
    choosing the window slot of each next sample. Returns the (N,) order."""
    out = np.empty(len(by_page), dtype=np.int64)
    open_pages = np.empty(max(1, window), dtype=np.int64)
    used = np.zeros(len(page_sizes), dtype=np.int64)
    n_open = next_page = 0
    for t in range(len(by_page)):
        while next_page < len(page_order) and n_open < window:
            page = page_order[next_page]
            next_page += 1
            if page_sizes[page] > 0:
                open_pages[n_open] = page
                n_open += 1
        slot = min(int(picks[t] * n_open), n_open - 1)
        page = open_pages[slot]
        out[t] = by_page[page_starts[page] + used[page]]
        used[page] += 1
        if used[page] == page_sizes[page]:
            n_open -= 1
            open_pages[slot] = open_pages[n_open]
    return out


_jit_walk = None


def _walk(*args) -> np.ndarray:
    """_draw_from_window compiled with numba (FFCV's dependency) on first use: a Python loop over N otherwise."""
    global _jit_walk
    if _jit_walk is None:
        from numba import njit

        _jit_walk = njit(cache=False, nogil=True)(_draw_from_window)
    return _jit_walk(*args)


def quasi_random_permutation(pages: np.ndarray, rng: np.random.Generator, window: int) -> np.ndarray:
    """(N,) int64 permutation of 0..N-1 in FFCV's quasi-random order over the page of each sample `pages` (N,),
    at most `window` pages open at a time (see the module docstring)."""
    pages = np.asarray(pages, dtype=np.int64)
    _, page_ids = np.unique(pages, return_inverse=True)
    page_ids = page_ids.astype(np.int64)
    n_pages = int(page_ids.max()) + 1 if len(page_ids) else 0
    by_page = np.lexsort((rng.random(len(pages)), page_ids)).astype(np.int64)   # by page, shuffled within
    page_sizes = np.bincount(page_ids, minlength=n_pages).astype(np.int64)
    page_starts = np.concatenate([[0], np.cumsum(page_sizes)[:-1]]).astype(np.int64)
    return _walk(by_page, page_starts, page_sizes, rng.permutation(n_pages).astype(np.int64), rng.random(len(pages)),
                 int(window))


@dataclass(frozen=True)
class EpochPlan:
    num_samples: int
    global_batch: int
    seed: int = 0
    repeats: int = 1
    shuffle: bool = True
    drop_last: bool = True
    order: str = "random"                     # 'random' or 'quasi_random' (needs `pages`); shuffle=True only
    pages: Optional[np.ndarray] = field(default=None, compare=False, repr=False)   # (N,) page of each sample
    # (M,) the sample indices the plan draws from (training without a held-out validation set, or that set);
    # None = all N. Permutations are of these M, so every rank and loader sees the same subset
    subset: Optional[np.ndarray] = field(default=None, compare=False, repr=False)
    lockstep_ranks: int = 0                   # ranks that take every step together (training); 0 = evaluation

    @property
    def size(self) -> int:
        """Samples one pass covers: len(subset), or N."""
        return self.num_samples if self.subset is None else len(self.subset)

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"data.order: expected one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.order == "quasi_random" and self.shuffle:
            if self.pages is None or len(self.pages) != self.num_samples:
                raise ValueError("data.order=quasi_random needs the page of each of the "
                                 f"{self.num_samples} samples (a .beton's allocation table)")

    def permutation(self, epoch: int) -> np.ndarray:
        """(repeats * N,) int64 sample indices for `epoch`, in global order."""
        if self.subset is not None:
            return np.asarray(self.subset, dtype=np.int64)[self._permutation(epoch, self.size)]
        return self._permutation(epoch, self.num_samples)

    def _permutation(self, epoch: int, n: int) -> np.ndarray:
        if not self.shuffle:
            return np.tile(np.arange(n, dtype=np.int64), self.repeats)
        rng = np.random.Generator(np.random.Philox(key=[self.seed & 0xFFFFFFFFFFFFFFFF, epoch]))
        if self.order == "quasi_random":
            window = 2 * self.global_batch
            pages = self.pages if self.subset is None else self.pages[self.subset]
            return np.concatenate([quasi_random_permutation(pages, rng, window) for _ in range(self.repeats)])
        return np.concatenate([rng.permutation(n) for _ in range(self.repeats)]).astype(np.int64)

    def steps(self) -> int:
        """Global steps (batches) per epoch."""
        total = self.size * self.repeats
        full, tail = divmod(total, self.global_batch)
        if self.drop_last or tail == 0:
            return full
        return full + (tail >= self.lockstep_ranks)

    def rank_positions(self, rank: int = 0, world_size: int = 1, start_step: int = 0) -> np.ndarray:
        """Positions in the epoch's concatenated permutations that rank `rank` reads, batch after batch, from
        global step `start_step` to the epoch's end (position p belongs to repeat p // N).

        Each per-rank batch has global_batch // world_size samples (the last one may be shorter without
        drop_last: equal on every rank in lockstep, see the module docstring). Raises ValueError when the global
        batch does not split evenly over the ranks.
        """
        if self.global_batch % world_size:
            raise ValueError(f"global batch {self.global_batch} does not split over {world_size} ranks")
        if self.lockstep_ranks and self.lockstep_ranks != world_size:
            raise ValueError(f"a plan for {self.lockstep_ranks} ranks in lockstep read by {world_size}")
        total = self.steps() * self.global_batch if self.drop_last else self.size * self.repeats
        chunks = []
        for t in range(start_step, self.steps()):
            step_start = t * self.global_batch
            step_len = min(self.global_batch, total - step_start)
            if self.lockstep_ranks:
                share = step_len // world_size
                lo, hi = step_start + rank * share, step_start + (rank + 1) * share
            else:
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
        return self.rank_positions(rank, world_size, start_step) // self.size

    def per_rank_batch(self, world_size: int) -> int:
        return self.global_batch // world_size
