"""The parameter updates of a DINO step besides the optimizer's: per-parameter gradient clipping and the
teacher's EMA, both in foreach kernels and with no host sync."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def clip_per_parameter(parameters, max_norm: float) -> None:
    """DINO's utils.clip_gradients: scale each parameter's gradient to norm <= max_norm (1e-6 in the divisor).
    The scale is chosen on the device: DINO's `if coef < 1` reads every norm on the host, a sync per parameter per
    step on CUDA. Where coef >= 1 the gradient is multiplied by exactly 1, which leaves its bits as they are.
    Foreach kernels: a handful of launches for all the tensors instead of four per tensor; `max_norm / x` on a
    tensor is torch's reciprocal(x) * max_norm, which the foreach ops repeat, so the result is DINO's bit for bit."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm(grads, 2.0)
    torch._foreach_add_(norms, 1e-6)
    coefs = torch._foreach_reciprocal(norms)
    torch._foreach_mul_(coefs, max_norm)   # max_norm / (norm + 1e-6), rounded as DINO's division is
    torch._foreach_clamp_max_(coefs, 1.0)
    torch._foreach_mul_(grads, coefs)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, matched by name, in foreach kernels. momentum: a
    float, or a 0-dim device tensor (the device-skip step sets it to 1 for a skipped step: teacher unchanged)."""
    student_params = dict(student.named_parameters())
    teacher_params, sources = [], []
    for name, t in teacher.named_parameters():
        teacher_params.append(t)
        sources.append(student_params[name].detach().to(t.dtype))
    torch._foreach_mul_(teacher_params, momentum)
    if isinstance(momentum, torch.Tensor):
        torch._foreach_add_(teacher_params, torch._foreach_mul(sources, 1.0 - momentum))
    else:
        torch._foreach_add_(teacher_params, sources, alpha=1.0 - momentum)
