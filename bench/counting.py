"""Count what a loader or transform asks of the device, per batch: ops (kernel launches), host-to-device copies
(blocking or not) and host syncs, from the aten ops it dispatches.

    with DeviceWork() as work:
        for batch in loader.epoch(1):
            ...
    work.ops, work.uploads, work.blocking_copies, work.syncs

- ops: aten ops with an operand on a non-CPU device, views and metadata queries left out (each is about one
  kernel launch on a GPU; a CUDA graph replay is one launch and dispatches nothing: callers add those);
- uploads: host-to-device copies; blocking_copies: those that make the host wait (non_blocking=False, or a source
  that is not pinned memory);
- syncs: device-to-host copies and ops whose result the host needs (item, nonzero, is_nonzero, ...).

Without a GPU the same code runs with the device set to 'meta' (tensors without data, with the same device rules
as CUDA: a CPU operand larger than a scalar is refused); pinned memory, which needs a driver, is then emulated (a
tensor is pinned when it came from pin_memory() or a factory call with pin_memory=True). FakeTensorMode CUDA
tensors would need the mode active in every thread and forked DataLoader worker; the meta device needs none.
`strict=True` raises HostSyncError at the first blocking copy or sync, naming the op.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_FREE = {"view", "_unsafe_view", "expand", "slice", "select", "unsqueeze", "squeeze", "transpose", "permute",
         "as_strided", "alias", "t", "detach", "unbind", "split", "split_with_sizes", "chunk", "_reshape_alias",
         "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "is_pinned",
         "_pin_memory", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "dim", "size", "stride",
         "is_same_size", "device", "scalar_tensor", "_to_copy_noop", "record_stream", "set_"}
_SYNCS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "_unique", "_unique2",
          "unique_dim", "unique_consecutive", "unique_dim_consecutive"}
_COPIES = {"_to_copy", "copy_", "_copy_from", "_copy_from_and_resize"}


class HostSyncError(AssertionError):
    pass


def _tensors(values):
    for v in values:
        if isinstance(v, torch.Tensor):
            yield v
        elif isinstance(v, (list, tuple)):
            yield from _tensors(v)


class DeviceWork(TorchDispatchMode):
    """The counters above, over the ops dispatched on this thread inside the block (see the module docstring)."""

    def __init__(self, strict: bool = False, emulate_pinned: bool | None = None):
        super().__init__()
        self.strict = strict
        self.emulate_pinned = (not torch.cuda.is_available()) if emulate_pinned is None else emulate_pinned
        self.ops = self.uploads = self.blocking_copies = self.syncs = 0
        self.by_op: dict[str, int] = {}
        self._pinned: dict[int, weakref.ref] = {}

    # ------------------------------------------------------------------------------------------ pinned memory
    def _pin(self, t: torch.Tensor) -> torch.Tensor:
        self._pinned[id(t)] = weakref.ref(t)
        return t

    def is_pinned(self, t: torch.Tensor) -> bool:
        if not self.emulate_pinned:
            return bool(t.is_pinned())
        ref = self._pinned.get(id(t))
        return ref is not None and ref() is t

    # ------------------------------------------------------------------------------------------------ counting
    def _fail(self, what: str) -> None:
        if self.strict:
            raise HostSyncError(what)

    def _copy(self, name: str, args, kwargs) -> None:
        if name == "_to_copy":
            src, target = args[0], kwargs.get("device")
            target = src.device if target is None else torch.device(target)
            non_blocking = kwargs.get("non_blocking", False)
        else:
            dst, src = args[0], args[1]
            target = dst.device
            non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
        if src.device.type == "cpu" and target.type != "cpu":
            self.uploads += 1
            if not non_blocking or not self.is_pinned(src):
                self.blocking_copies += 1
                self._fail(f"blocking host-to-device copy ({name}, non_blocking={non_blocking}, "
                           f"pinned={self.is_pinned(src)}, shape {tuple(src.shape)})")
        elif src.device.type != "cpu" and target.type == "cpu":
            self.syncs += 1
            self._fail(f"device-to-host copy ({name}, shape {tuple(src.shape)})")

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if self.emulate_pinned:
            if name == "is_pinned":
                return self.is_pinned(args[0])
            if name == "_pin_memory":
                return self._pin(args[0].clone())
            if kwargs.get("pin_memory"):
                return self._pin(func(*args, **{k: v for k, v in kwargs.items() if k != "pin_memory"}))
        if name in _COPIES:
            self._copy(name, args, kwargs)
        out = func(*args, **kwargs)
        on_device = any(t.device.type != "cpu" for t in _tensors((*args, *kwargs.values(), out)))
        if on_device and name in _SYNCS:
            self.syncs += 1
            self._fail(f"host sync: {func}")
        if on_device and name not in _FREE:
            self.ops += 1
            self.by_op[name] = self.by_op.get(name, 0) + 1
        return out

    def per_batch(self, batches: int) -> dict[str, float]:
        """The counters divided by `batches`."""
        n = max(1, batches)
        return {"ops": self.ops / n, "uploads": self.uploads / n, "blocking_copies": self.blocking_copies / n,
                "syncs": self.syncs / n}
