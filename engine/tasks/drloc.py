"""Dense relative localization (METHODS.md C): predict the grid offset between two sampled patch tokens.

targets: per image m positions p_i and, independently, m positions p_j, uniform over the k x k grid with
         replacement; offsets (B, m, 2) (rows, cols) in grid cells: |Δ| (use_abs) or Δ + (k-1).
head:    Linear(2C,512) ReLU Linear(512,512) ReLU Linear(512,2)   (l1)
         Linear(2C,512) ReLU Linear(512,512) ReLU Linear(512,512), then Linear(512,n) for rows and for cols
         (ce, cbr; n = k with use_abs, else 2k-1)
loss:    l1 / ce / cbr of kernels.drloc_reference, through kernels.dispatch (pass_loss: the fused Triton head on
         CUDA, tested against the reference).
weight:  lambda(e) = lambda0*e/20 for e <= 20, then lambda0*(1 - (e-20)/(E-20)), E = optim.epochs; e is the
         integer epoch unless tasks.drloc.weight_per_step.
compute: returns lambda(e) * mean over the passes it is given of L_drloc(pass) -- the clean pass, plus the pass on
         each extra view another enabled task adds (METHODS.md: drloc applies to the clean and the transformed
         image alike).
The loop's length: `DrlocTask.epochs` (tasks.drloc.stop_at_101: the reference's stop at epoch 101 of a 300-epoch
schedule), folded into engine.tasks.effective_epochs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from engine.models import ModelOutput
from engine.models.reference_names import Rule
from engine.tasks.base import AuxTask, TaskOutput, schedule_epoch
from kernels import dispatch
from kernels import drloc_reference as ref
from loaders.batch import Batch

RAMP_EPOCHS = 20
REFERENCE_STOP_EPOCH = 101   # C's loop ends after epoch index 100 although LR and lambda are scheduled for 300


def drloc_weight(epoch: float, lambda0: float, total_epochs: int, ramp_epochs: int = RAMP_EPOCHS) -> float:
    """lambda(e): linear ramp to lambda0 over the first 20 epochs, then linear decay to 0 at the last epoch."""
    if epoch <= ramp_epochs:
        return lambda0 * epoch / ramp_epochs
    if total_epochs <= ramp_epochs:
        return lambda0
    return max(0.0, lambda0 * (1.0 - (epoch - ramp_epochs) / (total_epochs - ramp_epochs)))


@dataclass
class DrlocConfig:
    """Dense relative localization (METHODS.md C): the tasks.drloc section."""
    enabled: bool = False
    mode: Literal["l1", "ce", "cbr"] = "l1"
    use_abs: bool = True
    pairs: int = 64                    # m: pairs sampled per image
    lambda0: float = 0.1               # peak weight; ViT value unstated in the reference, 0.1 is our default
    hidden: int = 512
    stop_at_101: bool = False          # reproduce the reference loop that stops at epoch 101 of a 300-epoch schedule
                                       # (DrlocTask.epochs: the loop's epoch count; LR and lambda stay scheduled
                                       # over optim.epochs)
    weight_per_step: bool = False      # False = reference: lambda from the integer epoch, constant within an epoch


class DrlocHead(nn.Module):
    """The pairwise MLP of C's DenseRelativeLoc, with its parameter names, so C's state dict loads as is:
    `layers` = Linear(2C,H) ReLU Linear(H,H) ReLU Linear(H, 2 for l1 | H for ce/cbr) (`layers.0/2/4`), and for
    ce/cbr `unshared` = [Linear(H, n) rows, Linear(H, n) cols] on the output of `layers.4` (no ReLU there)."""

    def __init__(self, in_dim: int, grid: int, mode: str = "l1", use_abs: bool = True, hidden: int = 512):
        super().__init__()
        self.mode = mode
        last = 2 if mode == "l1" else hidden
        self.layers = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, last))
        if mode == "l1":
            self.unshared = None
        else:
            n = grid if use_abs else 2 * grid - 1
            self.unshared = nn.ModuleList([nn.Linear(hidden, n) for _ in range(2)])

    def forward(self, pairs: torch.Tensor) -> list[torch.Tensor]:
        """pairs (B, m, 2C) -> [(B, m, 2)] for l1, [(B, m, n) rows, (B, m, n) cols] for ce/cbr."""
        first, second, last = self.layers[0], self.layers[2], self.layers[4]
        if self.unshared is None:
            return ref.pairwise_head(pairs, first.weight, first.bias, second.weight, second.bias,
                                     [(last.weight, last.bias)])
        return ref.pairwise_head(pairs, first.weight, first.bias, second.weight, second.bias,
                                 [(lin.weight, lin.bias) for lin in self.unshared], shared=(last.weight, last.bias))


class DrlocTask(AuxTask):
    name = "drloc"
    Config = DrlocConfig
    # C's single-scale `drloc` ModuleList (or a bare `drloc` module): drloc[.0].{layers,unshared}.* -> ours
    reference_rules = (Rule("C", r"drloc\.(?:0\.)?(layers|unshared)\.(\d+)\.(weight|bias)", r"drloc.head.\1.\2.\3"),)

    @classmethod
    def check(cls, section: DrlocConfig, cfg) -> list[tuple[str, bool, str]]:
        return [("tasks.drloc.pairs", section.pairs >= 1, "must be >= 1"),
                ("tasks.drloc.lambda0", section.lambda0 >= 0, "must be >= 0"),
                ("tasks.drloc.hidden", section.hidden >= 1, "must be >= 1")]

    @classmethod
    def build(cls, cfg, embed_dim: int, grid: int) -> "DrlocTask":
        return cls(cfg.tasks.drloc, embed_dim, grid, cfg.optim.epochs, cfg.engine.kernels)

    @classmethod
    def epochs(cls, section: DrlocConfig, epochs: int) -> int:
        """optim.epochs, or at most 101 with tasks.drloc.stop_at_101 (the reference loop), whether or not drloc
        itself is enabled -- the reference's baseline runs stop there too. The LR schedule and lambda(e) keep
        optim.epochs as their horizon."""
        return min(epochs, REFERENCE_STOP_EPOCH) if section.stop_at_101 else epochs

    def __init__(self, cfg, embed_dim: int, grid: int, total_epochs: int, kernels: str = "auto"):
        """kernels: engine.kernels — 'auto' (Triton on CUDA when triton is installed, PyTorch elsewhere), 'triton'
        or 'torch'."""
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels
        self.grid = grid
        self.total_epochs = total_epochs
        self.head = DrlocHead(embed_dim, grid, cfg.mode, cfg.use_abs, cfg.hidden)

    def weight(self, epoch: float) -> float:
        return drloc_weight(schedule_epoch(epoch, self.cfg.weight_per_step), self.cfg.lambda0, self.total_epochs)

    def peak_weight(self) -> float:
        return self.cfg.lambda0

    def targets(self, out: ModelOutput, seed: int = 0):
        """-> p_i, p_j (B, m) flat positions and their offsets (B, m, 2) (float for l1, class indices otherwise),
        drawn as a pure function of (seed, image, pair) by the kernels dispatcher (same values on every backend)."""
        if out.grid != self.grid:
            raise ValueError(f"drloc head built for a {self.grid}x{self.grid} grid, the model gave {out.grid}")
        return dispatch.drloc_pairs_and_targets(out.tokens.shape[0], out.grid, self.cfg.pairs, self.cfg.use_abs,
                                                seed, out.tokens.device, self.kernels,
                                                float_targets=self.cfg.mode == "l1")

    def pass_loss(self, out: ModelOutput, seed: int = 0) -> torch.Tensor:
        """Unweighted L_drloc of one pass: scalar (the fused Triton head on CUDA, the PyTorch reference elsewhere)."""
        p_i, p_j, target = self.targets(out, seed)
        return dispatch.drloc_pair_loss(out.patch_tokens, p_i, p_j, target, dispatch.HeadParams.from_module(self.head),
                                        self.cfg.mode, self.kernels)

    def compute(self, outputs: list[ModelOutput], batch: Batch, epoch: float, seed: int = 0,
                weight: Optional[torch.Tensor] = None) -> TaskOutput:
        """loss = lambda(e) * mean over passes of L_drloc(pass); raw = that mean; metrics: per-pass losses.
        Pass v draws its pairs from seed*4 + v, so the two passes never share positions by construction. seed: a
        Python int or a 0-dim int64 device tensor (the graphed step's); the low 63 bits are kept with a mask, which
        gives the same value for both (an int64 tensor wraps at 2**64, and `% 2**63` on it would turn negative)."""
        per_pass = [self.pass_loss(out, (seed * 4 + v) & (2**63 - 1)) for v, out in enumerate(outputs)]
        raw = torch.stack(per_pass).mean()
        w = self.weight(epoch) if weight is None else weight
        metrics = {f"pass{i}": loss.detach() for i, loss in enumerate(per_pass)} if len(per_pass) > 1 else {}
        return TaskOutput(loss=w * raw, raw=raw.detach(), weight=w, metrics=metrics)
