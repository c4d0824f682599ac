"""Translation / scale perceptibility (METHODS.md A): from the clean and the transformed pass, predict where the
transformed image was moved (and/or how much it was scaled).

views:   [batch.views['transformed']] -- T(x), made on the device after every other augmentation by this task's
         batch transform (loaders/transforms/perceptibility.py: PerceptibilityTransform), which also records the
         grid indices in batch.params.
targets: each drawn value min-max normalized over its 10-value grid: idx / 9 in {0, 1/9, ..., 1}.
         translate (B, 2) from params['translate_idx'] (dx, dy); scale (B, 1) from params['scale_idx'].
features: mean over tokens of ModelOutput.perception_tokens (ViT/CaiT: all tokens incl. CLS of the last block
         before the final norm; Swin: the final-normed last stage), for the clean and the transformed pass.
head:    concat(mean(x), mean(Tx)) (B, 2D) -> LayerNorm(2D) -> Linear(2D, 384) -> GELU -> Linear(384, 2).
         One head per quantity; the scale head also has 2 outputs, compared with its (B, 1) target by
         broadcasting (as the reference's L1Loss does), i.e. both outputs regress s.
weight:  lambda(e) with peak init_weight, W = warmup_fraction * E: 0 if e > 0.9 E; init*e/W (capped) if e <= W;
         else init*(1 - (e-W)/(E-W)). e is the integer epoch unless tasks.perceptibility.weight_per_step.

compute() returns only this task's part of the loss (the class CE on the clean pass stays in the loop):
    translate: 1/2 * [alpha * CE(f(Tx)) + lambda(e) * L1_translate]
    scale:     1/2 * [alpha * CE(f(Tx)) + lambda(e) * L1_scale]
    both:      1/3 * [alpha * CE(f(Tx)) + L1_scale + lambda(e) * L1_translate]     (reference: no lambda on the
               scale term; lambda_on_scale=True puts lambda(e) on it too)
CE(f(Tx)) is the class loss on the transformed pass, label smoothing (optim.label_smoothing) and the batch's mixed
labels when mixup/cutmix ran (engine.tasks.base.class_ce). L1 = mean absolute error over the batch and outputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from engine.models import ModelOutput
from engine.models.reference_names import Rule
from engine.tasks.base import AuxTask, TaskOutput, class_ce, schedule_epoch
from loaders.batch import Batch
from loaders.transforms.perceptibility import GRID_STEPS, VIEW, PerceptibilityTransform

CUTOFF_FRACTION = 0.9    # lambda(e) = 0 in the last 10% of the schedule


@dataclass
class PerceptibilityConfig:
    """Translation / scale perceptibility (METHODS.md A): the tasks.perceptibility section."""
    enabled: bool = False
    kind: Literal["translate", "scale", "both"] = "translate"
    max_shift: float = 0.2             # m: dx, dy from linspace(-m, m, 10), fractions of width/height
    scale_min: float = 0.5
    scale_max: float = 1.5
    fill: Literal["faithful", "mean"] = "faithful"  # faithful = 128.0 in normalized space (the reference quirk)
    alpha: float = 0.4                 # weight of the CE on the transformed pass
    init_weight: float = 1.2           # peak of lambda(e)
    warmup_fraction: float = 0.2       # W = warmup_fraction * E
    lambda_on_scale: bool = False      # 'both': the reference leaves lambda off the scale term; True puts it on
    hidden: int = 384
    weight_per_step: bool = False      # False = reference: lambda from the integer epoch, constant within an epoch


def perceptibility_weight(epoch: float, init_weight: float, total_epochs: int, warmup_fraction: float = 0.2) -> float:
    """lambda(e): 0 past 0.9 E; linear ramp to init_weight over W = warmup_fraction * E; then linear decay."""
    warmup = warmup_fraction * total_epochs
    if epoch > CUTOFF_FRACTION * total_epochs:
        return 0.0
    if epoch <= warmup:
        return min(init_weight * epoch / warmup, init_weight)
    return init_weight * (1.0 - (epoch - warmup) / (total_epochs - warmup))


def grid_targets(index: torch.Tensor) -> torch.Tensor:
    """Grid indices 0..9 (any shape, int) -> min-max normalized targets idx / 9 (float32, same shape); GRID_STEPS
    is the loader transform's, the one definition of the grids."""
    return index.to(torch.float32) / (GRID_STEPS - 1)


class PerceptibilityHead(nn.Module):
    """(B, 2D) -> (B, 2): LayerNorm(2D) -> Linear(2D, hidden) -> GELU -> Linear(hidden, 2)."""

    def __init__(self, in_dim: int, hidden: int = 384, out_dim: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.fc1 = nn.Linear(in_dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out_dim)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(latent))))


class PerceptibilityTask(AuxTask):
    name = "perceptibility"
    Config = PerceptibilityConfig
    views = (VIEW,)
    # A's models/Auxiliary_sep.py, LayerNorm + Mlp(fc1, fc2) per quantity:
    # mlp_head_{trans,scale}.0.* / .1.fc1.* / .1.fc2.* -> {translate,scale}_head.norm / fc1 / fc2
    reference_rules = tuple(
        rule for theirs, ours in (("trans", "translate_head"), ("scale", "scale_head"))
        for rule in (Rule("A", rf"mlp_head_{theirs}\.0\.(weight|bias)", rf"perceptibility.{ours}.norm.\1"),
                     Rule("A", rf"mlp_head_{theirs}\.1\.(fc1|fc2)\.(weight|bias)", rf"perceptibility.{ours}.\1.\2")))

    @classmethod
    def check(cls, section: PerceptibilityConfig, cfg) -> list[tuple[str, bool, str]]:
        return [("tasks.perceptibility.max_shift", 0 < section.max_shift < 1, "must be in (0, 1)"),
                ("tasks.perceptibility.scale_min", 0 < section.scale_min < section.scale_max,
                 "must be > 0 and < tasks.perceptibility.scale_max"),
                ("tasks.perceptibility.alpha", section.alpha >= 0, "must be >= 0"),
                ("tasks.perceptibility.init_weight", section.init_weight >= 0, "must be >= 0"),
                ("tasks.perceptibility.warmup_fraction", 0 < section.warmup_fraction < 1, "must be in (0, 1)"),
                ("tasks.perceptibility.hidden", section.hidden >= 1, "must be >= 1")]

    @classmethod
    def build(cls, cfg, embed_dim: int, grid: int) -> "PerceptibilityTask":
        return cls(cfg.tasks.perceptibility, embed_dim, cfg.optim.epochs, cfg.optim.label_smoothing)

    @classmethod
    def batch_transform(cls, section: PerceptibilityConfig, data) -> PerceptibilityTransform:
        """T(x) into Batch.views['transformed'] and its grid indices into Batch.params."""
        return PerceptibilityTransform.from_config(section)

    def __init__(self, cfg, embed_dim: int, total_epochs: int, label_smoothing: float = 0.1):
        super().__init__()
        self.cfg = cfg
        self.kind = cfg.kind
        self.total_epochs = total_epochs
        self.label_smoothing = label_smoothing
        self.translate_head = PerceptibilityHead(2 * embed_dim, cfg.hidden) if cfg.kind != "scale" else None
        self.scale_head = PerceptibilityHead(2 * embed_dim, cfg.hidden) if cfg.kind != "translate" else None

    # ---------------------------------------------------------------------------------------------- parts
    def weight(self, epoch: float) -> float:
        e = schedule_epoch(epoch, self.cfg.weight_per_step)
        return perceptibility_weight(e, self.cfg.init_weight, self.total_epochs, self.cfg.warmup_fraction)

    def peak_weight(self) -> float:
        return self.cfg.init_weight

    def targets(self, batch: Batch) -> dict[str, torch.Tensor]:
        """{'translate': (B, 2), 'scale': (B, 1)} float32 in [0, 1], the keys this kind needs."""
        out = {}
        for key, head in (("translate", self.translate_head), ("scale", self.scale_head)):
            if head is None:
                continue
            idx = batch.params.get(f"{key}_idx")
            if idx is None:
                raise ValueError(f"tasks.perceptibility.kind={self.kind!r} needs batch.params['{key}_idx'] "
                                 f"(loaders/transforms/perceptibility.py records it)")
            out[key] = grid_targets(idx)
        return out

    @staticmethod
    def latent(clean: ModelOutput, moved: ModelOutput) -> torch.Tensor:
        """(B, 2D): concat(mean over tokens of the clean pass, of the transformed pass)."""
        return torch.cat([clean.perception_tokens.mean(dim=1), moved.perception_tokens.mean(dim=1)], dim=1)

    def predict(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        """{'translate': (B, 2), 'scale': (B, 2)} head outputs."""
        out = {}
        if self.translate_head is not None:
            out["translate"] = self.translate_head(latent)
        if self.scale_head is not None:
            out["scale"] = self.scale_head(latent)
        return out

    def combine(self, ce_transformed: torch.Tensor, l1: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
        """The METHODS.md A combination (see the module docstring) of the three terms."""
        alpha = self.cfg.alpha
        if self.kind == "translate":
            return (alpha * ce_transformed + lam * l1["translate"]) / 2
        if self.kind == "scale":
            return (alpha * ce_transformed + lam * l1["scale"]) / 2
        scale_weight = lam if self.cfg.lambda_on_scale else 1.0
        return (alpha * ce_transformed + scale_weight * l1["scale"] + lam * l1["translate"]) / 3

    def compute(self, outputs: list[ModelOutput], batch: Batch, epoch: float, seed: int = 0,
                weight: Optional[torch.Tensor] = None) -> TaskOutput:
        """outputs[0]: the pass on batch.images; outputs[1]: the pass on batch.views['transformed'].
        loss: the combination above; raw: the unweighted regression loss (sum of the L1 terms);
        metrics: ce_transformed, l1_translate / l1_scale."""
        if len(outputs) < 2:
            raise ValueError("tasks.perceptibility needs the pass on batch.views['transformed'] as outputs[1]")
        clean, moved = outputs[0], outputs[1]
        targets = self.targets(batch)
        preds = self.predict(self.latent(clean, moved))
        l1 = {key: (preds[key].float() - targets[key]).abs().mean() for key in targets}
        ce = class_ce(moved.logits, batch.labels, batch.soft_labels, self.label_smoothing)
        lam = self.weight(epoch) if weight is None else weight
        loss = self.combine(ce, l1, lam)
        raw = torch.stack(list(l1.values())).sum()
        metrics = {"ce_transformed": ce.detach(), **{f"l1_{k}": v.detach() for k, v in l1.items()}}
        return TaskOutput(loss=loss, raw=raw.detach(), weight=lam, metrics=metrics)
