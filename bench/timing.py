"""Device timing done right: warm-up, synchronisation (CUDA events on a GPU), median of repeats and the spread."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Timing:
    median_s: float        # seconds per call, median over repeats
    min_s: float
    max_s: float
    repeats: int

    def rate(self, items_per_call: int) -> float:
        """items per second at the median."""
        return items_per_call / self.median_s

    def as_dict(self, items_per_call: int | None = None) -> dict:
        out = {"median_ms": self.median_s * 1e3, "min_ms": self.min_s * 1e3, "max_ms": self.max_s * 1e3,
               "repeats": self.repeats, "spread_pct": 100.0 * (self.max_s - self.min_s) / self.median_s}
        if items_per_call:
            out["items_per_s"] = self.rate(items_per_call)
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int = 3, repeats: int = 10,
               calls_per_repeat: int = 1) -> Timing:
    """Time `fn` after `warmup` calls: each repeat times `calls_per_repeat` calls and divides."""
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls_per_repeat):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3 / calls_per_repeat)
        else:
            t0 = time.perf_counter()
            for _ in range(calls_per_repeat):
                fn()
            samples.append((time.perf_counter() - t0) / calls_per_repeat)
    return Timing(statistics.median(samples), min(samples), max(samples), repeats)
