"""The DINO self-distillation loss with its state (METHODS.md B): teacher centring and the teacher temperature.

Given student logits for all V views and teacher logits for the 2 global views of the same B images,

    loss = mean over pairs (t, s), t in {0, 1}, s in 0..V-1, s != t, of
           mean_b  sum_k  -softmax((teacher[t] - center) / tau_t)_bk * log_softmax(student[s] / tau_s)_bk

and after each step the centre moves towards the teacher's batch mean (over every rank):
center = m * center + (1 - m) * mean(teacher logits). Views are stacked along the batch: (V*B, K) in view order.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine.ssl.schedules import teacher_temp_at


def _full_precision(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits (autocast) -> fp32; fp32/fp64 unchanged. The softmaxes run at least in fp32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, global_views: int = 2, student_temp: float = 0.1,
                 warmup_teacher_temp: float = 0.04, teacher_temp: float = 0.07, warmup_teacher_temp_epochs: int = 10,
                 center_momentum: float = 0.9):
        super().__init__()
        self.global_views = global_views
        self.student_temp = student_temp
        self.warmup_teacher_temp, self.teacher_temp = warmup_teacher_temp, teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: int) -> float:
        return teacher_temp_at(epoch, self.warmup_teacher_temp, self.teacher_temp, self.warmup_teacher_temp_epochs)

    def teacher_probs(self, teacher_logits: torch.Tensor, epoch: int) -> torch.Tensor:
        """(G*B, K) teacher logits -> (G*B, K) centred, sharpened probabilities (no gradient)."""
        temp = self.teacher_temperature(epoch)
        return F.softmax((_full_precision(teacher_logits) - self.center) / temp, dim=-1).detach()

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, epoch: int) -> torch.Tensor:
        """student (V*B, K), teacher (G*B, K), integer epoch -> scalar loss. Does not update the centre."""
        views = student_logits.shape[0] // (teacher_logits.shape[0] // self.global_views)
        student = F.log_softmax(_full_precision(student_logits) / self.student_temp, dim=-1).chunk(views)
        teacher = self.teacher_probs(teacher_logits, epoch).chunk(self.global_views)
        total, pairs = 0.0, 0
        for t, q in enumerate(teacher):
            for s, log_p in enumerate(student):
                if s == t:
                    continue   # the same view seen by both networks
                total = total + torch.sum(-q * log_p, dim=-1).mean()
                pairs += 1
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """EMA of the teacher's batch mean (all ranks' batches), DINO's update_center."""
        batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)
        # a fill on the device, not torch.tensor(n, device=...): a host-to-device copy that waits for the device
        count = torch.full((), float(teacher_logits.shape[0]), device=teacher_logits.device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(batch_sum)
            count = count * dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1.0 - self.center_momentum)


@torch.no_grad()
def collapse_stats(teacher_probs: torch.Tensor, center: torch.Tensor) -> dict[str, torch.Tensor]:
    """Collapse monitors from the teacher's (N, K) output probabilities, as fractions of log K:
    teacher_entropy — mean per-sample entropy (-> 1: every output uniform, the flat collapse);
    teacher_batch_entropy — entropy of the batch-mean distribution (-> 0: every image on one prototype);
    center_norm — L2 norm of the centre."""
    k = teacher_probs.shape[-1]
    logk = math.log(k)
    p = teacher_probs.float().clamp_min(1e-12)
    per_sample = -(p * p.log()).sum(-1).mean() / logk
    mean = p.mean(0)
    batch = -(mean * mean.log()).sum() / logk
    return {"teacher_entropy": per_sample, "teacher_batch_entropy": batch, "center_norm": center.norm()}


def collapse_warning(stats: dict[str, float], flat: float = 0.98, single: float = 0.1) -> str:
    """'' or a sentence naming the collapse the monitors show (thresholds are fractions of log K)."""
    if stats["teacher_entropy"] > flat:
        return (f"teacher outputs are nearly uniform (entropy {stats['teacher_entropy']:.3f} of log K): flat "
                f"collapse — try a lower ssl.teacher_temp or a higher ssl.center_momentum")
    if stats["teacher_batch_entropy"] < single:
        return (f"teacher outputs concentrate on few prototypes (batch entropy {stats['teacher_batch_entropy']:.3f} "
                f"of log K): collapse to one dimension — centring is too weak")
    return ""
