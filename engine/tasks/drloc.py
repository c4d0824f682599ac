"""Dense relative localization (METHODS.md C): predict the grid offset between two sampled patch tokens.

targets: pairs of positions per image and their offsets (B, m, 2) in grid cells.
head:    Linear(2C,512) ReLU Linear(512,512) ReLU Linear(512,2)   (l1)
         Linear(2C,512) ReLU Linear(512,512), then Linear(512,n) for rows and for cols   (ce, cbr)
loss:    l1 / ce / cbr from kernels.drloc_reference (or its Triton twin through the dispatcher).
weight:  lambda(e) = lambda0*e/20 for e <= 20, then lambda0*(1 - (e-20)/(E-20)).
"""
from __future__ import annotations

import torch
from torch import nn

from engine.models import ModelOutput
from engine.tasks.base import AuxTask, TaskOutput
from kernels import drloc_reference as ref
from loaders.batch import Batch


def drloc_weight(epoch: float, lambda0: float, total_epochs: int, ramp_epochs: int = 20) -> float:
    """lambda(e): linear ramp to lambda0 over the first 20 epochs, then linear decay to 0 at the last epoch."""
    if epoch <= ramp_epochs:
        return lambda0 * epoch / ramp_epochs
    if total_epochs <= ramp_epochs:
        return lambda0
    return max(0.0, lambda0 * (1.0 - (epoch - ramp_epochs) / (total_epochs - ramp_epochs)))


class DrlocHead(nn.Module):
    """The pairwise MLP. Parameter names follow the reference (`layers`, `unshared`) for checkpoint parity."""

    def __init__(self, in_dim: int, grid: int, mode: str = "l1", use_abs: bool = True, hidden: int = 512):
        super().__init__()
        self.mode = mode
        if mode == "l1":
            self.layers = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                        nn.ReLU(), nn.Linear(hidden, 2))
            self.unshared = None
        else:
            n = grid if use_abs else 2 * grid - 1
            self.layers = nn.Sequential(nn.Linear(2 * in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
            self.unshared = nn.ModuleList([nn.Linear(hidden, n) for _ in range(2)])

    def forward(self, pairs: torch.Tensor) -> list[torch.Tensor]:
        """pairs (B, m, 2C) -> [(B, m, 2)] for l1, [(B, m, n) rows, (B, m, n) cols] for ce/cbr."""
        first, second = self.layers[0], self.layers[2]
        if self.unshared is None:
            last = self.layers[4]
            return ref.pairwise_head(pairs, first.weight, first.bias, second.weight, second.bias,
                                     [(last.weight, last.bias)], final_relu=True)
        return ref.pairwise_head(pairs, first.weight, first.bias, second.weight, second.bias,
                                 [(lin.weight, lin.bias) for lin in self.unshared], final_relu=False)


class DrlocTask(AuxTask):
    name = "drloc"

    def __init__(self, cfg, embed_dim: int, grid: int, total_epochs: int):
        super().__init__()
        self.cfg = cfg
        self.grid = grid
        self.total_epochs = total_epochs
        self.head = DrlocHead(embed_dim, grid, cfg.mode, cfg.use_abs, cfg.hidden)

    def weight(self, epoch: float) -> float:
        return drloc_weight(epoch, self.cfg.lambda0, self.total_epochs)

    def targets(self, out: ModelOutput, generator: torch.Generator | None = None):
        """-> (p_i, p_j) (B, m) flat positions and offsets (B, m, 2) int64."""
        b = out.tokens.shape[0]
        p_i, p_j = ref.sample_pair_positions(b, out.grid, self.cfg.pairs, generator, out.tokens.device)
        return p_i, p_j, ref.pair_offset_targets(p_i, p_j, out.grid, self.cfg.use_abs)

    def loss(self, pred: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if self.cfg.mode == "l1":
            return ref.l1_loss(pred[0], target)
        if self.cfg.mode == "ce":
            return ref.ce_loss(pred[0], pred[1], target)
        return ref.cbr_loss(pred[0], pred[1], target)

    def compute(self, outputs: list[ModelOutput], batch: Batch, epoch: float,
                generator: torch.Generator | None = None) -> TaskOutput:
        """drloc on every pass (METHODS.md: with translation perceptibility it applies to both), averaged."""
        raws = []
        for out in outputs:
            p_i, p_j, target = self.targets(out, generator)
            pred = self.head(ref.gather_pairs(out.patch_tokens, p_i, p_j))
            raws.append(self.loss(pred, target))
        raw = torch.stack(raws).mean()
        w = self.weight(epoch)
        return TaskOutput(loss=w * raw, raw=raw.detach(), weight=w)
