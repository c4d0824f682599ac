"""Batch-wise Mixup / CutMix with label smoothing folded into soft labels, as timm's Mixup(mode='batch') does.

With probability `prob` a batch is mixed; then CutMix (Beta(cutmix_alpha)) with probability `switch_prob`, else
Mixup (Beta(mixup_alpha)) — when only one alpha is > 0, that one. The partner of image i is image B-1-i
(timm's x.flip(0)). CutMix pastes the partner's box, cut from timm's rand_bbox (centre uniform over the image,
sides int(H*sqrt(1-lam)), int(W*sqrt(1-lam)), clipped) and corrects lam to the pasted area. Soft labels:
lam * smooth(y) + (1 - lam) * smooth(y.flip(0)), smooth(y) = one-hot with 1 - eps + eps/K on y and eps/K
elsewhere — also for unmixed batches (lam = 1), as timm does, so the class loss is the same soft CE throughout.
The reference repos apply mixing per batch after normalization with per-sample CE on (y_a, y_b) pairs and label
smoothing; CE is linear in the target, so these soft labels give the same loss.

All batch-level draws come from one batch key (loaders.transforms.rng), so a batch mixes identically however
often it is replayed; everything stays on the device (no host sync).
Slots of the batch key: 0 mix?, 1 cutmix?, 2-3 box centre (y, x), 8.. the Beta draws.
"""
from __future__ import annotations

import math

import torch

from loaders.transforms.rng import uniform

_CANDIDATES = 12     # Marsaglia-Tsang candidates per gamma draw; all rejected has probability < 1e-15


def _normal(keys: torch.Tensor, slot: int, n: int) -> torch.Tensor:
    """(K, n) standard normals by Box-Muller from counter draws slot .. slot+2n-1."""
    u = uniform(keys, slot, 2 * n).to(torch.float64) + 2.0 ** -25
    return torch.sqrt(-2.0 * torch.log(u[:, :n])) * torch.cos(2.0 * math.pi * u[:, n:])


def gamma_from_keys(keys: torch.Tensor, slot: int, alpha: float) -> torch.Tensor:
    """(K,) float64 Gamma(alpha, 1) draws, one per key (Marsaglia-Tsang, vectorized rejection)."""
    boost = alpha < 1.0
    a = alpha + 1.0 if boost else alpha
    d = a - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    x = _normal(keys, slot, _CANDIDATES)                                           # (K, n)
    u = uniform(keys, slot + 2 * _CANDIDATES, _CANDIDATES).to(torch.float64) + 2.0 ** -25
    v = (1.0 + c * x) ** 3
    ok = (v > 0) & (torch.log(u) < 0.5 * x * x + d - d * v + d * torch.log(v.clamp(min=1e-300)))
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)                   # first accepted candidate
    g = (d * v).gather(1, first)[:, 0]
    if boost:
        w = uniform(keys, slot + 3 * _CANDIDATES, 1)[:, 0].to(torch.float64) + 2.0 ** -25
        g = g * w ** (1.0 / alpha)
    return g


def beta_from_keys(keys: torch.Tensor, slot: int, alpha: float) -> torch.Tensor:
    """(K,) float64 Beta(alpha, alpha); alpha = 1 is the uniform draw itself."""
    if alpha == 1.0:
        return uniform(keys, slot, 1)[:, 0].to(torch.float64)
    x = gamma_from_keys(keys, slot, alpha)
    y = gamma_from_keys(keys, slot + 4 * _CANDIDATES, alpha)
    return x / (x + y)


def mix_params(batch_keys: torch.Tensor, height: int, width: int, mixup_alpha: float, cutmix_alpha: float,
               prob: float, switch_prob: float = 0.5) -> dict[str, torch.Tensor]:
    """For K batch keys: 'kind' (K,) int64 0 none / 1 mixup / 2 cutmix, 'lam' (K,) float64 (area-corrected for
    CutMix, 1 when unmixed), 'box' (K, 4) int64 (top, bottom, left, right) rows/cols pasted (empty unless cutmix)."""
    k = batch_keys.shape[0]
    dev = batch_keys.device
    mixed = uniform(batch_keys, 0, 1)[:, 0] < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        cut = uniform(batch_keys, 1, 1)[:, 0] < switch_prob
    else:
        cut = torch.full((k,), cutmix_alpha > 0, device=dev)
    lam_mix = beta_from_keys(batch_keys, 8, mixup_alpha) if mixup_alpha > 0 else torch.ones(k, device=dev,
                                                                                            dtype=torch.float64)
    lam_cut = beta_from_keys(batch_keys, 200, cutmix_alpha) if cutmix_alpha > 0 else torch.ones(k, device=dev,
                                                                                              dtype=torch.float64)
    lam = torch.where(cut, lam_cut, lam_mix)
    ratio = torch.sqrt(1.0 - lam)
    cut_h = (height * ratio).to(torch.int64)
    cut_w = (width * ratio).to(torch.int64)
    centre = uniform(batch_keys, 2, 2)
    cy = torch.clamp((centre[:, 0] * height).to(torch.int64), max=height - 1)
    cx = torch.clamp((centre[:, 1] * width).to(torch.int64), max=width - 1)
    box = torch.stack([(cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height),
                       (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)], dim=1)
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    lam_cut_corrected = 1.0 - area.to(torch.float64) / float(height * width)
    use_cut = mixed & cut
    lam = torch.where(mixed, torch.where(cut, lam_cut_corrected, lam), torch.ones_like(lam))
    kind = torch.where(mixed, torch.where(cut, 2, 1), 0).to(torch.int64)
    box = torch.where(use_cut[:, None], box, torch.zeros_like(box))
    return {"kind": kind, "lam": lam, "box": box}


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """(B,) int -> (B, K) float32 with 1 - eps + eps/K on the label and eps/K elsewhere (timm's one_hot)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.view(-1, 1), 1.0 - smoothing + off)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, batch_key: torch.Tensor, num_classes: int,
              mixup_alpha: float = 1.0, cutmix_alpha: float = 1.0, prob: float = 0.5, switch_prob: float = 0.5,
              label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """images (B, C, H, W) float, labels (B,) int64, batch_key (1,) -> (mixed images, soft labels (B, K),
    params {'mix_kind' (1,), 'mix_lam' (1,) float32, 'mix_box' (1, 4)})."""
    b, _, h, w = images.shape
    p = mix_params(batch_key, h, w, mixup_alpha, cutmix_alpha, prob, switch_prob)
    lam = p["lam"][0]
    partner = images.flip(0)
    rows = torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device)
    box = p["box"][0]
    inside = (((rows >= box[0]) & (rows < box[1]))[:, None] & ((cols >= box[2]) & (cols < box[3]))[None, :])
    lam32 = lam.to(images.dtype)
    blended = images * lam32 + partner * (1.0 - lam).to(images.dtype)
    out = torch.where(p["kind"][0] == 2, torch.where(inside, partner, images),
                      torch.where(p["kind"][0] == 1, blended, images))
    y1 = smooth_one_hot(labels, num_classes, label_smoothing)
    soft = y1 * lam.to(torch.float32) + y1.flip(0) * (1.0 - lam).to(torch.float32)
    return out, soft, {"mix_kind": p["kind"], "mix_lam": p["lam"].to(torch.float32), "mix_box": p["box"]}
