"""Process-level setup: distributed init (DeepSpeed's, gloo on CPU), the device, seeds, the DeepSpeed config."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from dataclasses import dataclass
from typing import Iterator

import torch

log = logging.getLogger("smallvit")


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """`engine.deterministic`: torch's deterministic algorithms for the run, the caller's setting restored after it
    (a run inside a notebook or a test session must not leave the process deterministic). Off leaves the process's
    setting alone. On CUDA, cuBLAS is deterministic only with a fixed workspace, which torch reads from
    CUBLAS_WORKSPACE_CONFIG when the first cuBLAS call makes its handle; without it the first matmul raises."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_runtime(device_choice: str = "auto") -> Runtime:
    """Join (or start, when no launcher set the env) the process group and pick the device.

    Without the `deepspeed` launcher, a single process group of one rank is made on localhost, so `smallvit
    train` needs no launcher on one process.
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": os.environ.get("MASTER_PORT", str(_free_port()))})
    use_cuda = torch.cuda.is_available() if device_choice == "auto" else device_choice == "cuda"
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("engine.device=cuda but no CUDA device is visible")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo", verbose=False)
    return Runtime(rank=torch.distributed.get_rank(), world_size=torch.distributed.get_world_size(),
                   local_rank=local_rank, device=device)


def deepspeed_config(cfg, world_size: int, bf16: bool = False) -> dict:
    """The DeepSpeed config of a run: ours from the run config, with a user's JSON (engine.deepspeed_config)
    merged over it (engine/deepspeed_json.py; cfg must have been resolved against it by resolve_into_config).

    bf16: DeepSpeed's own bf16 mode (the module held in bf16, bf16 gradient reduction). The loops pass False:
    their bf16 is torch.autocast over fp32 master weights (engine/precision.py). Gradient clipping: with ZeRO 0
    the loop clips itself (engine/supervised_step.py: one foreach norm, no host sync), so DeepSpeed's is off;
    ZeRO 1/2 clip inside DeepSpeed's optimizer."""
    k = cfg.optim.accumulation_steps
    if cfg.data.batch_size % (world_size * k):
        raise ValueError(f"data.batch_size: {cfg.data.batch_size} does not split over {world_size} ranks x "
                         f"optim.accumulation_steps {k}")
    ours = {
        "train_batch_size": cfg.data.batch_size,
        "train_micro_batch_size_per_gpu": cfg.data.batch_size // (world_size * k),
        "gradient_accumulation_steps": k,
        "gradient_clipping": cfg.optim.clip_grad if cfg.engine.zero_stage else 0.0,
        "bf16": {"enabled": bf16},
        "zero_optimization": {"stage": cfg.engine.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer synchronizes the device at every forward and step; the loop times itself
        "timers": {"throughput": {"enabled": False}},
    }
    if not cfg.engine.deepspeed_config:
        return ours
    from engine.deepspeed_json import merged_config

    return merged_config(cfg, ours, world_size)


def step_seed(seed: int, global_step: int, rank: int) -> int:
    """A seed for everything random inside one step (drop-path, pair sampling): a pure function of the step,
    so an interrupted and resumed run draws exactly what the uninterrupted one drew."""
    return (seed * 1_000_003 + global_step * 9_176 + rank * 7_919) % (2**63 - 1)
