"""Host-to-device copies that never make the host wait: pinned memory and non_blocking.

A plain `tensor.to('cuda')` waits until the copy is done, i.e. until every step queued before it on the stream has
run, so the host can never run ahead of the device. From pinned (page-locked) memory with non_blocking=True the
copy is queued like a kernel and the host goes on. PyTorch's pinned-memory cache does not hand a block out again
until the copies queued from it have finished, so a staged block can be dropped right after the call.
"""
from __future__ import annotations

import torch


def upload(host: torch.Tensor, device: torch.device, reused: bool = False) -> torch.Tensor:
    """`host` (a CPU tensor) on `device`, copied without a blocking wait; on the CPU `host` itself.

    reused: the producer writes into `host` again later (FFCV's output buffers), so it is staged into a pinned
    block of its own even when already pinned. Strides are kept (FFCV hands out channels-last views).
    """
    if device.type == "cpu" or host.device == device:
        return host
    if reused or not host.is_pinned():
        if not (host.is_contiguous() or host.is_contiguous(memory_format=torch.channels_last)):
            host = host.contiguous()
        staged = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, pin_memory=True)
        staged.copy_(host)
        host = staged
    return host.to(device, non_blocking=True)
