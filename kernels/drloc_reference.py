"""Plain PyTorch reference of dense relative localization (METHODS.md C): pair sampling, offset targets,
the pairwise MLP head and the three losses. The Triton kernels beside it are tested against these functions.

Shapes: B images, N = k*k patch tokens on a k x k grid, C channels, m pairs per image, H hidden units.
Positions are flat grid indices p = row * k + col; offsets are in grid cells (not divided by k).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_pair_positions(batch: int, k: int, m: int, generator: torch.Generator | None = None,
                          device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """p_i, p_j: (B, m) int64 flat positions, each uniform over the k*k grid, independent, with replacement."""
    pos = torch.randint(0, k * k, (2, batch, m), generator=generator, device=device)
    return pos[0], pos[1]


def pair_offset_targets(p_i: torch.Tensor, p_j: torch.Tensor, k: int, use_abs: bool = True) -> torch.Tensor:
    """(B, m, 2) int64 offsets (rows, cols) of p_i relative to p_j.

    use_abs: |Δ| in 0..k-1; otherwise Δ + (k-1) in 0..2k-2 (so they index classes for 'ce'/'cbr').
    """
    delta = torch.stack([p_i // k - p_j // k, p_i % k - p_j % k], dim=-1)
    return delta.abs() if use_abs else delta + (k - 1)


def gather_pairs(tokens: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor) -> torch.Tensor:
    """tokens (B, N, C), positions (B, m) -> concat(e_i, e_j): (B, m, 2C)."""
    c = tokens.shape[-1]
    e_i = torch.gather(tokens, 1, p_i[..., None].expand(-1, -1, c))
    e_j = torch.gather(tokens, 1, p_j[..., None].expand(-1, -1, c))
    return torch.cat([e_i, e_j], dim=-1)


def pairwise_head(pairs: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                  out_weights: list[tuple[torch.Tensor, torch.Tensor]],
                  shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[torch.Tensor]:
    """The drloc MLP on (B, m, 2C) pairs (C's DenseRelativeLoc): Linear(2C,H) ReLU Linear(H,H) ReLU, then
    [the shared Linear(H,H), no ReLU,] then each output Linear.

    l1 mode: shared=None and one output Linear(H, 2) -> [(B, m, 2)].
    ce/cbr:  shared=(w3 (H, H), b3 (H,)) (C's `layers.4`) and two output Linear(H, n) -> [(B, m, n) rows,
             (B, m, n) cols].
    Weights follow nn.Linear: w (out, in), b (out,).
    """
    h = F.relu(F.linear(pairs, w1, b1))
    h = F.relu(F.linear(h, w2, b2))
    if shared is not None:
        h = F.linear(h, *shared)
    return [F.linear(h, w, b) for w, b in out_weights]


def _acc(t: torch.Tensor) -> torch.dtype:
    """The loss's accumulation dtype: float64 for float64 predictions (a true fp64 reference), float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def l1_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean |pred - target| over B*m*2; pred (B, m, 2) float, target (B, m, 2) int grid units. float32, or float64
    for float64 pred."""
    acc = _acc(pred)
    return (pred.to(acc) - target.to(acc)).abs().mean()


def ce_loss(logits_rows: torch.Tensor, logits_cols: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE(rows) + CE(cols); logits (B, m, n), target (B, m, 2) class indices. float32, or float64 for float64
    logits."""
    n = logits_rows.shape[-1]
    acc = _acc(logits_rows)
    return (F.cross_entropy(logits_rows.to(acc).reshape(-1, n), target[..., 0].reshape(-1))
            + F.cross_entropy(logits_cols.to(acc).reshape(-1, n), target[..., 1].reshape(-1)))


def cbr_loss(logits_rows: torch.Tensor, logits_cols: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Confidence-based regression, summed over rows and cols (METHODS.md C):
    p = softmax(logits); mu = sum p*c; var = sum p*(c-mu)^2 + 1e-8; mean(exp(-log var)*(mu-t)^2 + 0.001*log var).
    float32, or float64 for float64 logits.
    """
    acc = _acc(logits_rows)
    total = logits_rows.new_zeros((), dtype=acc)
    for axis, logits in enumerate((logits_rows, logits_cols)):
        n = logits.shape[-1]
        p = torch.softmax(logits.to(acc), dim=-1)
        c = torch.arange(n, device=logits.device, dtype=acc)
        mu = (p * c).sum(-1)
        var = (p * (c - mu[..., None]) ** 2).sum(-1) + 1e-8
        log_var = torch.log(var)
        t = target[..., axis].to(acc)
        total = total + (torch.exp(-log_var) * (mu - t) ** 2 + 0.001 * log_var).mean()
    return total


# ------------------------------------------------------------------------------ counter-based pair sampling
# The fused Triton kernel (kernels/drloc_triton.py) draws the same positions from the same counters, so the two
# paths agree bit for bit: every position is a pure function of (seed, image index, pair index, i|j), never of a
# generator's state or of how the work is split. All hash arithmetic is on 32-bit values (int64 tensors here,
# uint32 in the kernel).

MASK32 = 0xFFFFFFFF
DRLOC_SALT = 0x5D2A11C5      # separates drloc's stream from any other user of the same seed
COUNTER_MUL = 0x9E3779B9     # golden-ratio multiplier spreading consecutive counters before hashing


def hash32_int(x: int) -> int:
    """The 'lowbias32' integer hash of a Python int (its low 32 bits)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def hash32(x: torch.Tensor) -> torch.Tensor:
    """'lowbias32' on int64 tensors holding 32-bit values (products stay below 2**63)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def drloc_seed_key(seed: int | torch.Tensor) -> int | torch.Tensor:
    """The 32-bit key every pair of one draw derives from. All 64 low bits of `seed` count (engine step seeds are
    up to 2**63). A Python int gives an int (computed on the host, a kernel argument); a 0-dim int64 tensor gives
    a 0-dim tensor on its device, computed there without a host sync (a CUDA-graph-replayable seed)."""
    if isinstance(seed, torch.Tensor):
        seed = seed.to(torch.int64)
        return hash32(hash32(hash32(seed) ^ ((seed >> 32) & MASK32)) ^ DRLOC_SALT)
    return hash32_int(hash32_int(hash32_int(seed) ^ ((seed >> 32) & MASK32)) ^ DRLOC_SALT)


def counter_pair_positions(batch: int, k: int, m: int, seed: int | torch.Tensor,
                           device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """p_i, p_j: (B, m) int64 flat positions in [0, k*k), uniform, independent, with replacement.

    position(b, t, w) = (bits * k*k) >> 32 with bits = h(h(h(key ^ b) ^ (c * COUNTER_MUL)) ^ c), c = 2t + w,
    w = 0 for p_i and 1 for p_j, h = hash32, key = drloc_seed_key(seed). The multiply-shift maps 32 random bits
    to [0, k*k) with a bias below k*k / 2**32.
    """
    n = k * k
    if not 1 <= n < 2 ** 31:
        raise ValueError(f"grid side k={k} out of range for pair sampling")
    b = torch.arange(batch, dtype=torch.int64, device=device)
    key = drloc_seed_key(seed.to(device) if isinstance(seed, torch.Tensor) else seed)
    image_key = hash32(key ^ b)[:, None, None]                                           # (B, 1, 1)
    c = (2 * torch.arange(m, dtype=torch.int64, device=device))[:, None] + torch.arange(2, device=device)
    c = c[None]                                                                          # (1, m, 2)
    bits = hash32(hash32(image_key ^ ((c * COUNTER_MUL) & MASK32)) ^ c)                 # (B, m, 2)
    pos = (bits * n) >> 32
    return pos[..., 0], pos[..., 1]


def counter_pairs_and_targets(batch: int, k: int, m: int, use_abs: bool, seed: int | torch.Tensor,
                              device: torch.device | str = "cpu", float_targets: bool = False
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The torch twin of the fused sampling + target kernel: p_i, p_j (B, m) int64 and offsets (B, m, 2)
    in grid cells, int64 (class indices for 'ce'/'cbr') or float32 with float_targets (for 'l1')."""
    p_i, p_j = counter_pair_positions(batch, k, m, seed, device)
    target = pair_offset_targets(p_i, p_j, k, use_abs)
    return p_i, p_j, (target.to(torch.float32) if float_targets else target)
