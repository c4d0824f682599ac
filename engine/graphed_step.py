"""The supervised step on static buffers, captured once as a CUDA graph and replayed (config engine.graph_step).

    off      DeepSpeed's step (engine(batch), engine.backward, engine.step): the default.
    on       WARMUP_STEPS eager steps on a side stream, one captured with torch.cuda.graph, then `graph.replay()`.
    auto     'on' where it can run (a CUDA device and a capturable config), else DeepSpeed's step.
    emulate  the same static-buffer step run eagerly on any device: what the CPU tests compare with DeepSpeed's.
A config that cannot run this way falls back to DeepSpeed's step with one log line, "graphed step off: <reason>".

A step: the Batch is copied in place into static buffers (every tensor field and view, shapes checked); LR, step
seed, task weights (weights=) and step number go into device scalars; TrainModule forward -> backward -> global
norm clip -> AdamW skipping a non-finite update on the device -> loss parts summed on the device, read by
`read()` every run.log_every steps. DeepSpeed keeps launch, config and checkpoints (docs/design.md, "The static
step"); more than one rank falls back, since no test here can exercise an all-reduce inside a captured graph.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from engine.loss_window import LossWindow, WindowReport  # noqa: F401 (WindowReport: read()'s type)
from loaders.batch import Batch

log = logging.getLogger("smallvit")

WARMUP_STEPS = 3   # eager steps on a side stream before capture (cuBLAS handles, Triton/compile, optimizer state)
CLIP_EPS = 1e-6    # DeepSpeed's clip_grad_norm_: coef = max_norm / (total_norm + 1e-6), at most 1


# ------------------------------------------------------------------------------------------- whether it can run
def config_fallback_reason(cfg, world_size: int, device: torch.device, num_train_images: int) -> Optional[str]:
    """Why `cfg` cannot run the static step on `device` (None when it can). Reasons known before DeepSpeed starts;
    `engine_fallback_reason` checks what DeepSpeed made of the config."""
    mode, e = cfg.engine.graph_step, cfg.engine
    if e.zero_stage >= 1:
        return (f"engine.zero_stage={e.zero_stage}: ZeRO partitions the optimizer state and reduces gradients in "
                f"DeepSpeed's backward hooks with host-side bucket bookkeeping; the static step needs stage 0")
    if cfg.optim.accumulation_steps > 1:
        return (f"optim.accumulation_steps={cfg.optim.accumulation_steps}: the static step is one micro-batch per "
                f"optimizer step (the default step accumulates)")
    per_epoch = num_train_images * cfg.data.repeats
    if not cfg.data.drop_last and per_epoch % cfg.data.batch_size:
        return (f"data.drop_last=false: the last batch of each epoch has {per_epoch % cfg.data.batch_size} "
                f"images, not {cfg.data.batch_size}, and a graph replays fixed shapes")
    if world_size > 1:
        return (f"{world_size} ranks: the gradient all-reduce stays in DeepSpeed's step (an all-reduce inside a "
                f"captured graph needs NCCL settings and warm-up not verified here); the static step runs on one rank")
    if mode in ("on", "auto"):
        if device.type != "cuda":
            return f"engine.graph_step={mode} captures a CUDA graph, and this run is on {device.type}"
        if e.deterministic:
            return ("engine.deterministic=true: deterministic CUDA kernels (sort-based scatter/index_put) are not "
                    "verified capture-safe; use engine.graph_step=emulate or turn deterministic off")
    return None


def engine_fallback_reason(engine, optimizer: torch.optim.Optimizer) -> Optional[str]:
    """Why DeepSpeed's engine, as configured, cannot be bypassed by the static step (None when it can)."""
    if engine.optimizer is not optimizer:
        return (f"DeepSpeed wrapped the optimizer in {type(engine.optimizer).__name__} (its ZeRO, bf16 or fp16 "
                f"path); the static step drives the plain torch AdamW (ZeRO 0, torch autocast for bf16)")
    if engine.gradient_accumulation_steps() != 1:
        return (f"gradient_accumulation_steps={engine.gradient_accumulation_steps()} in the DeepSpeed config: the "
                f"static step is one micro-batch per optimizer step")
    if getattr(engine, "torch_autocast_z0_gradscaler", None) is not None:
        return "DeepSpeed's torch_autocast grad scaler syncs with the host at every step"
    return None


@dataclass
class GraphPlan:
    """What train() runs: mode 'graphed' | 'emulated' | 'off', and the fallback reason (None when none)."""
    mode: str
    reason: Optional[str] = None

    @property
    def active(self) -> bool:
        return self.mode != "off"


def plan_graph_step(cfg, world_size: int, device: torch.device, num_train_images: int) -> GraphPlan:
    """engine.graph_step -> the mode this run takes, before DeepSpeed starts (see the module docstring)."""
    asked = cfg.engine.graph_step
    if asked == "off":
        return GraphPlan("off")
    reason = config_fallback_reason(cfg, world_size, device, num_train_images)
    if reason is not None:
        return GraphPlan("off", reason)
    return GraphPlan("emulated" if asked == "emulate" else "graphed")


def log_fallback(reason: str, is_main: bool) -> None:
    if is_main:
        log.warning("graphed step off: %s", reason)


# ---------------------------------------------------------------------------------------------- static inputs
@dataclass
class StaticBatch:
    """Preallocated copies of every Batch tensor the step reads; `load` refills them in place."""
    batch: Batch
    signature: dict = field(default_factory=dict)

    @staticmethod
    def tensor_fields(batch: Batch) -> dict[str, Optional[torch.Tensor]]:
        """{field name: tensor or None} of the Batch fields that hold one tensor (not params, views or crops)."""
        return {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)
                if getattr(batch, f.name) is None or isinstance(getattr(batch, f.name), torch.Tensor)}

    @classmethod
    def tensors(cls, batch: Batch) -> dict[str, Optional[torch.Tensor]]:
        """{name: tensor or None} of every tensor the batch holds: each tensor field by its name, each params entry
        as 'params.<key>' and each extra view as 'views.<name>' (sorted). Batch.crops (pretraining) is not read."""
        out = cls.tensor_fields(batch)
        for group in ("params", "views"):
            for key, t in sorted(getattr(batch, group).items()):
                out[f"{group}.{key}"] = t
        return out

    @classmethod
    def describe(cls, batch: Batch) -> dict:
        """{tensor name: (shape, dtype, device) or None} of the tensors the step reads (see `tensors`)."""
        return {name: None if t is None else (tuple(t.shape), t.dtype, t.device)
                for name, t in cls.tensors(batch).items()}

    @classmethod
    def like(cls, batch: Batch) -> "StaticBatch":
        def clone(t):
            return None if t is None else torch.empty_like(t).copy_(t)   # empty_like keeps channels_last strides
        fields = {name: clone(t) for name, t in cls.tensor_fields(batch).items()}
        static = Batch(**fields, params={k: clone(v) for k, v in batch.params.items()},
                       views={k: clone(v) for k, v in batch.views.items()})
        return cls(static, cls.describe(batch))

    def load(self, batch: Batch) -> None:
        """Copy `batch` into the buffers (device-to-device, no host sync); a batch of another layout raises."""
        got = self.describe(batch)
        if got != self.signature:
            diff = sorted(k for k in set(got) | set(self.signature) if got.get(k) != self.signature.get(k))
            raise RuntimeError(f"graphed step: the batch changed layout in {', '.join(diff)} (captured "
                               f"{[self.signature.get(k) for k in diff]}, got {[got.get(k) for k in diff]}); "
                               f"set engine.graph_step=off for this data config")
        mine = self.tensors(self.batch)
        for name, src in self.tensors(batch).items():
            if src is not None:
                mine[name].copy_(src, non_blocking=True)


# ------------------------------------------------------------------------------------------------- the runner
class StaticStepRunner:
    """Runs one training step of a TrainModule and its torch AdamW on static buffers (module docstring).

    module: engine.train_module.TrainModule (`module(batch, epoch, seed, weights=) -> (loss, parts)`, its `tasks`);
    optimizer: the torch AdamW over its parameters; mode: 'graphed' or 'emulated'; autocast_dtype: torch.bfloat16
    for bf16 compute under torch.autocast, None for fp32; fail_on_nonfinite: after a non-finite step every later
    update is skipped too, so the parameters stay those before it until the loop reads the buffers and stops; clip:
    max gradient norm (0 = off); engine: the DeepSpeed engine holding module and optimizer (ZeRO 0, one rank), whose
    step and sample counters the runner advances as engine.step() does, or None for a plain PyTorch step."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, mode: str, device: torch.device,
                 autocast_dtype: Optional[torch.dtype], fail_on_nonfinite: bool, clip: float = 0.0, engine=None,
                 warmup_steps: int = WARMUP_STEPS):
        if mode not in ("graphed", "emulated"):
            raise ValueError(f"StaticStepRunner mode must be 'graphed' or 'emulated', got {mode!r}")
        self.module, self.optimizer, self.mode, self.device, self.engine = module, optimizer, mode, device, engine
        self.tasks = list(getattr(self.module, "tasks", []))
        self.autocast_dtype = autocast_dtype
        self.fail_on_nonfinite = fail_on_nonfinite
        self.warmup_steps = warmup_steps
        self.clip = float(clip)
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        # the module's order, as DeepSpeed's clipping sums the per-parameter norms in it (the sum's rounding)
        self.module_params = [p for p in self.module.parameters() if p.requires_grad]
        self.fused = all(group.get("fused") for group in optimizer.param_groups)
        # the fused CUDA kernel reads a float32 LR; elsewhere float64 keeps AdamW's scalar math that of a Python float
        lr_dtype = torch.float32 if device.type == "cuda" else torch.float64
        self.lr = torch.zeros((), dtype=lr_dtype, device=device)
        # capturable keeps AdamW's step counts on the parameters' device: a capture needs it, and on CUDA an unfused
        # AdamW with CPU step counts would read them on the host and mix them with the device's skip mask
        capturable = mode == "graphed" or device.type == "cuda"
        for group in optimizer.param_groups:
            group["lr"] = self.lr
            if capturable:
                group["capturable"] = True
        if capturable:
            for state in optimizer.state.values():
                if isinstance(state.get("step"), torch.Tensor) and state["step"].device != device:
                    state["step"] = state["step"].to(device)
        self.seed = torch.zeros((), dtype=torch.int64, device=device)
        self.step_number = torch.zeros((), dtype=torch.int64, device=device)
        self.task_weights = torch.zeros(len(self.tasks), dtype=torch.float32, device=device)   # lambda(e) per task
        self.max_norm = torch.tensor(self.clip, dtype=torch.float32, device=device)
        self.window = LossWindow(device)   # the losses since the last read()
        self.halted = torch.zeros((), dtype=torch.bool, device=device)
        self.static: Optional[StaticBatch] = None
        self.backups: list[torch.Tensor] = []
        self.graph = None
        self.steps_run = 0

    # ---------------------------------------------------------------------------------------------- per step
    def step(self, batch: Batch, lr: float, seed: int, epoch: float, global_step: int) -> None:
        """One optimizer step on `batch` (global_step: the 0-based number of this step). No host sync."""
        if self.static is None:
            self.static = StaticBatch.like(batch)
        else:
            self.static.load(batch)
        self.lr.fill_(lr)
        self.seed.fill_(seed)
        self.step_number.fill_(global_step)
        for i, task in enumerate(self.tasks):
            self.task_weights[i].fill_(task.weight(epoch))   # this step's lambda(e), read by the forward
        torch.manual_seed(seed)
        if self.mode == "emulated":
            self.optimizer.zero_grad(set_to_none=True)
            self._body(epoch)
        elif self.graph is None and self.steps_run < self.warmup_steps:
            self._warmup_step(epoch)
        else:
            if self.graph is None:
                self._capture(epoch)
            self.graph.replay()
        self.steps_run += 1
        self._count_steps(1)

    def _count_steps(self, n: int) -> None:
        """Advance DeepSpeed's counters as engine.step() would (n < 0 takes skipped steps back in read(): DeepSpeed's
        path never counts a step it did not apply)."""
        if self.engine is not None:
            self.engine.global_steps += n
            self.engine.global_samples += n * self.engine.train_batch_size()
            self.engine.micro_steps += n

    def _warmup_step(self, epoch: float) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self.optimizer.zero_grad(set_to_none=True)
            self._body(epoch)
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _capture(self, epoch: float) -> None:
        """Record one step into a CUDA graph (the work is recorded, not run: the caller replays it)."""
        self.optimizer.zero_grad(set_to_none=True)   # the captured backward allocates .grad from the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._body(epoch)
        self.graph = graph
        log.info("graphed step: captured the training step as one CUDA graph after %d warm-up steps",
                 self.steps_run)

    def _body(self, epoch: float) -> None:
        """forward, backward, norm, clip, guarded AdamW, accumulators: the work a replay repeats."""
        with self._autocast():   # the weights as buffers: a replay reads this step's lambda(e), not the captured one
            loss, parts = self.module(self.static.batch, epoch, self.seed, weights=self.task_weights)
        loss.backward()
        with torch.no_grad():
            grads = [p.grad for p in self.module_params if p.grad is not None]
            # DeepSpeed's clip_grad_norm_: per-parameter fp32 norms, then the root of their summed squares
            total_norm = torch.stack(torch._foreach_norm(grads, 2.0)).pow(2).sum().float().pow(0.5)
            loss_finite = torch.isfinite(loss.detach())
            bad = ~(loss_finite & torch.isfinite(total_norm))
            skip = (bad | self.halted) if self.fail_on_nonfinite else bad
            if self.clip > 0:
                coef = torch.clamp(self.max_norm / (total_norm + CLIP_EPS), max=1.0)
                torch._foreach_mul_(grads, coef)
            self._guarded_optimizer_step(skip)
            self._accumulate(loss, parts, bad, loss_finite)

    def _guarded_optimizer_step(self, skip: torch.Tensor) -> None:
        """AdamW's step, leaving parameters and optimizer state untouched where `skip` (0-dim bool) is set."""
        if self.fused:   # the fused kernel skips the update and steps its count back where found_inf is 1
            self.optimizer.found_inf = skip.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
            return
        # unfused AdamW takes no found_inf: keep a copy of everything it writes and put it back where skipped
        live = self._optimizer_tensors()
        if [b.shape for b in self.backups] != [t.shape for t in live]:
            self.backups = [torch.empty_like(t) for t in live]
        if live:
            torch._foreach_copy_(self.backups, live)
        self.optimizer.step()
        known = {id(t) for t in live}
        for t, b in zip(live, self.backups):
            t.copy_(torch.where(skip, b, t))
        for t in self._optimizer_tensors():
            if id(t) not in known:   # state made by this very step (the first): a skipped step leaves it as new
                t.masked_fill_(skip, 0)

    def _optimizer_tensors(self) -> list[torch.Tensor]:
        """The parameters and every optimizer state tensor (moments, step counts), in a fixed order."""
        out = list(self.params)
        for p in self.params:
            out += [v for v in self.optimizer.state.get(p, {}).values() if isinstance(v, torch.Tensor)]
        return out

    def _accumulate(self, loss: torch.Tensor, parts: dict, bad: torch.Tensor, loss_finite: torch.Tensor) -> None:
        self.window.add(loss, parts, bad, loss_finite, self.step_number)   # first call eager: allocates outside capture
        if self.fail_on_nonfinite:
            self.halted.logical_or_(bad)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        # no weight-cast cache: a cached cast made during capture would be stale at replay
        return torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=False)

    # ------------------------------------------------------------------------------------------- the host side
    def read(self) -> WindowReport:
        """One device-to-host copy: the mean loss and parts over the finite steps since the last read, and the
        non-finite steps among them; resets the window. Takes skipped steps back from DeepSpeed's counters."""
        report = self.window.read()
        self._count_steps(-report.nonfinite)
        return report
