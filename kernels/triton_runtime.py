"""Load the Triton kernel modules in the mode a launch needs: compiled (CUDA) or interpreted (TRITON_INTERPRET=1).

Triton 3.x decides at decoration time: `@triton.jit` builds an interpreter function when
`triton.knobs.runtime.interpret` (the env var TRITON_INTERPRET) is on *at the moment the module is imported*, and a
compiled JITFunction otherwise. A process where something imported the kernels before a test set the variable
would otherwise be stuck with compiled kernels that cannot take CPU tensors. So the kernel source module is loaded
here under a private name once per mode, with the knob forced for the duration of the import, and each launch
picks the mode from the knob as it is *at launch*: set TRITON_INTERPRET=1 (os.environ, monkeypatch.setenv, or
`triton.knobs.runtime.interpret = True`) any time before the call.
"""
from __future__ import annotations

import functools
import importlib.util
import sys
from types import ModuleType

import torch


class TritonUnavailableError(RuntimeError):
    """The Triton backend cannot run on this device / in this process; the message says why and what to do."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def interpret_enabled() -> bool:
    """Whether TRITON_INTERPRET is on now (read through Triton's knob, as Triton itself reads it)."""
    if not triton_available():
        return False
    import triton
    return bool(triton.knobs.runtime.interpret)


def check_device(device: torch.device, what: str) -> bool:
    """-> interpret mode for a Triton launch on `device`; raises TritonUnavailableError when it cannot run."""
    if not triton_available():
        raise TritonUnavailableError(f"{what}: backend='triton' (engine.kernels=triton) but the triton package is "
                                     "not installed: install triton, or set engine.kernels=torch (or auto, which "
                                     "runs the PyTorch reference where triton is missing)")
    interpret = interpret_enabled()
    if device.type != "cuda" and not interpret:
        raise TritonUnavailableError(
            f"{what}: backend='triton' got tensors on '{device}'. Compiled Triton kernels need a CUDA device; on the "
            "CPU they run only in Triton's interpreter, enabled by the environment variable TRITON_INTERPRET=1 "
            "(slow: meant for tests). Use backend='auto' (Triton on CUDA, PyTorch elsewhere) or 'torch'.")
    return interpret


@functools.cache
def _load(source: str, interpret: bool) -> ModuleType:
    import triton
    spec = importlib.util.find_spec(source)
    if spec is None or spec.origin is None:
        raise ImportError(f"kernel source module {source} not found")
    name = f"{source}__{'interpreted' if interpret else 'compiled'}"
    private = importlib.util.spec_from_file_location(name, spec.origin)
    module = importlib.util.module_from_spec(private)
    sys.modules[name] = module            # JITFunction looks its globals up through the module
    with triton.knobs.runtime.scope():
        triton.knobs.runtime.interpret = interpret
        private.loader.exec_module(module)
    return module


def load_kernels(source: str, device: torch.device, what: str) -> ModuleType:
    """The kernel module `source` (e.g. 'kernels.drloc_triton') built for launches on `device` right now."""
    return _load(source, check_device(device, what))
