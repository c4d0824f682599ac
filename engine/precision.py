"""The one precision scheme of both loops and both step paths (DeepSpeed's eager step and the static step).

engine.precision=bf16: the forward runs under torch.autocast(bfloat16) over fp32 parameters. The parameters (the
master weights), their gradients, the gradient all-reduce, AdamW's state, the checkpoints and the exported
model.safetensors all stay fp32. DeepSpeed's own bf16 mode is never used: it holds the module in bf16, so its
exports are bf16-rounded and its gradients are reduced in bf16. fp32: no autocast at all.

bf16 runs where the device supports it (a CUDA device with bf16); elsewhere the run is fp32 and says so. CPU
autocast in bf16 works in torch but is slow and not what a CPU run wants; tests turn it on through
`_CPU_BF16` to compare the two step paths under bf16 without a GPU.
"""
from __future__ import annotations

import contextlib

import torch

_CPU_BF16 = False   # tests only: let engine.precision=bf16 run bf16 autocast on the CPU


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """torch.bfloat16 when `precision` is 'bf16' and `device` can compute in it, else torch.float32."""
    if precision != "bf16":
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and _CPU_BF16:
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """The forward's context: bf16 autocast for torch.bfloat16, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
