"""The augmentation on static buffers, captured as one CUDA graph per batch shape and replayed for every batch.

Eagerly the full recipe is a few hundred small kernels per batch (AutoAugment's sync-free form runs every op it can
draw on the whole batch), each a host launch of several microseconds whatever the batch size. Captured, a batch is
a handful of launches: the copies of its inputs into the graph's static buffers, one replay, one clone per output
(the graph overwrites its outputs at the next replay, and a caller may keep a Batch). The kernels replayed are the
ones the eager call launches, so the outputs are bit-equal to the eager path's.

`mode` (config key data.capture_transform):
    auto     capture on CUDA (the first `warmup` batches of each shape run eagerly, the next one is captured on a
             side stream), eager elsewhere and where capture cannot run (one logged line: "transform graph off:
             <reason>");
    off      always eager;
    emulate  the same static-buffer path without capture, on any device: inputs copied into static buffers, the body
             run on them with its ops hidden from dispatch counters (as a replay is), its outputs copied into static
             outputs and cloned out: what the CPU tests run.
The body must be capturable: no host sync (the sync-free form of the per-image op choices) and no host value that
changes between batches (every per-batch random draw comes from its key tensors, made outside the graph).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from loaders.transforms.sync_free import use_sync_free

log = logging.getLogger("smallvit.loaders")

MODES = ("auto", "off", "emulate")
Body = Callable[..., dict[str, torch.Tensor]]


class _Replay(TorchDispatchMode):
    """Runs the ops of a block below every other dispatch mode, counting them: what a graph replay is to the host
    (one launch; nothing dispatched)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        self.ops += 1
        with _disable_current_modes():
            return func(*args, **(kwargs or {}))


@dataclass
class _Shape:
    """What one input signature (shapes, dtypes, strides) has: eager calls so far, then its static buffers."""
    eager_calls: int = 0
    static_in: Optional[list[torch.Tensor]] = None
    static_out: Optional[dict[str, torch.Tensor]] = None
    graph: Optional["torch.cuda.CUDAGraph"] = None
    kernels: int = 0                       # ops in one replay (emulate mode: counted; capture: unknown, 0)
    failed: Optional[str] = None


def _signature(inputs: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t.device, t.dtype, tuple(t.shape), t.stride()) for t in inputs)


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


class CapturedTransform:
    """`body(*inputs) -> {name: tensor}` run eagerly, emulated or as a replayed CUDA graph (see the module docstring).

    inputs: tensors only, all on one device; outputs: a flat dict of tensors (same keys for a given input signature).
    `replays` counts the batches served from static buffers; `kernels_per_replay` the ops a replay holds (emulate).
    """

    def __init__(self, body: Body, mode: str = "auto", warmup: int = 1, max_shapes: int = 4, name: str = "transform"):
        if mode not in MODES:
            raise ValueError(f"data.capture_transform: expected one of {', '.join(MODES)}, got {mode!r}")
        self.body, self.mode, self.warmup, self.max_shapes, self.name = body, mode, warmup, max_shapes, name
        self._shapes: "OrderedDict[tuple, _Shape]" = OrderedDict()
        self.replays = 0
        self._told: set[str] = set()

    def _why_eager(self, inputs: tuple[torch.Tensor, ...]) -> Optional[str]:
        """None when the static path can run for these inputs (mode 'auto': a CUDA graph), else the reason."""
        device = inputs[0].device
        if self.mode == "off":
            return "off"
        if self.mode == "emulate":
            return None
        if device.type != "cuda" or not torch.cuda.is_available() or any(_is_fake(t) for t in inputs):
            return "not on a CUDA device"
        if not use_sync_free(device):
            return "the per-image op choices are forced to sub-batches (a host sync per op: not capturable)"
        if torch.are_deterministic_algorithms_enabled():
            return "deterministic algorithms are on (their sort-based kernels are not verified capture-safe)"
        if torch.cuda.is_current_stream_capturing():
            return "called inside another capture"
        return None

    def _tell(self, reason: str) -> None:
        if reason not in self._told and reason not in ("off", "not on a CUDA device"):
            self._told.add(reason)
            log.info("%s graph off: %s", self.name, reason)

    def __call__(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        why = self._why_eager(inputs)
        if why is not None:
            self._tell(why)
            return self.body(*inputs)
        sig = _signature(inputs)
        shape = self._shapes.get(sig)
        if shape is None:
            shape = self._shapes[sig] = _Shape()
            while len(self._shapes) > self.max_shapes:
                self._shapes.popitem(last=False)          # the least recently used shape's graph and buffers
        self._shapes.move_to_end(sig)
        if shape.failed is not None or shape.eager_calls < self.warmup:
            shape.eager_calls += 1
            return self.body(*inputs)
        if shape.static_in is None:
            try:
                self._prepare(shape, inputs)
            except Exception as exc:                       # noqa: BLE001 - any capture failure: stay eager, say why
                shape.failed = f"capture failed ({type(exc).__name__}: {exc})"
                shape.static_in = shape.static_out = shape.graph = None
                self._tell(shape.failed)
                return self.body(*inputs)
        for static, t in zip(shape.static_in, inputs):
            static.copy_(t)
        self._replay(shape)
        self.replays += 1
        return {k: v.clone() for k, v in shape.static_out.items()}

    def _prepare(self, shape: _Shape, inputs: tuple[torch.Tensor, ...]) -> None:
        shape.static_in = [t.clone() for t in inputs]
        if self.mode == "emulate":
            with _Replay() as replay:
                shape.static_out = self.body(*shape.static_in)
            shape.kernels = replay.ops
            return
        device = inputs[0].device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            self.body(*shape.static_in)                    # lazy handles and tables made outside the capture
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            shape.static_out = self.body(*shape.static_in)
        shape.graph = graph

    def _replay(self, shape: _Shape) -> None:
        if shape.graph is not None:
            shape.graph.replay()
            return
        with _Replay():
            out = self.body(*shape.static_in)
        for k, v in out.items():
            shape.static_out[k].copy_(v)

    @property
    def kernels_per_replay(self) -> int:
        """Ops in one emulated replay of the most recent shape (0 when none or when captured on CUDA)."""
        return next(reversed(self._shapes.values())).kernels if self._shapes else 0
