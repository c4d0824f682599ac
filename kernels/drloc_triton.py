"""Triton kernels of the fused drloc path (METHODS.md C) and their launchers.

Do not import this module directly: `kernels.triton_runtime.load_kernels("kernels.drloc_triton", device, ...)`
loads it once in compiled mode and once in interpreter mode (Triton fixes the mode when `@triton.jit` runs, at
import), so a process can run the interpreter on CPU tensors and compiled kernels on CUDA tensors whatever was
imported first.

Kernels (R = B*m pair rows, N = k*k tokens per image, H hidden units):
- pairs_and_targets: counter-hashed p_i, p_j (B, m) and their offsets (B, m, 2), the twin of
  `drloc_reference.counter_pairs_and_targets` (same bits).
- gather_add_bias_relu: h1[r] = relu(P[b, p_i[r], :H] + P[b, p_j[r], H:] + b1), P = tokens @ [W_a; W_b]^T.
- scatter_pairs: dP[b, p_i[r], :H] += dz[r] and dP[b, p_j[r], H:] += dz[r], dz = dh1 * (h1 > 0) (atomic adds).
- pair_loss: per-row loss and its gradient w.r.t. the head outputs in one pass (l1, ce, cbr).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.drloc_reference import COUNTER_MUL, drloc_seed_key

MODE_IDS = {"l1": 0, "ce": 1, "cbr": 2}
_ACC = {torch.float64: tl.float64}   # accumulation dtype: fp64 for fp64 inputs (gradcheck), fp32 otherwise


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for inputs of `dtype`: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype: torch.dtype):
    return _ACC.get(dtype, tl.float32)


# tl.sum / tl.max / tl.zeros are @triton.jit functions of triton.language.standard, built in the mode that was on
# when triton was first imported (torch and timm import it early), and calling one from a kernel of the other mode
# fails. So this module uses only builtins (tl.reduce, tl.full) and picks its combine functions by its own mode:
# interpreted, the standard ones, which the interpreter recognises and reduces with numpy (only their identity is
# used); compiled, its own, which are what tl.sum / tl.max emit.
@triton.jit
def _add_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


if triton.knobs.runtime.interpret:
    _SUM_COMBINE, _MAX_COMBINE = tl.standard._sum_combine, tl.standard._elementwise_max
else:
    _SUM_COMBINE, _MAX_COMBINE = _add_combine, _max_combine


@triton.jit
def _row_sum(x):
    return tl.reduce(x, 1, _SUM_COMBINE)


@triton.jit
def _row_max(x):
    return tl.reduce(x, 1, _MAX_COMBINE)


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    # fp32 -> bf16 by round-to-nearest-even on the bits: what compiled Triton's .to() does, while the interpreter's
    # .to(tl.bfloat16) truncates (a bias of half a bf16 step against the PyTorch reference).
    if dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


# ------------------------------------------------------------------------------------------------ sampling
@triton.jit
def _hash32(x):
    # lowbias32 on uint32 (products wrap mod 2**32), identical to drloc_reference.hash32
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


@triton.jit(do_not_specialize=["seed_key"])
def _pairs_and_targets_kernel(pi_ptr, pj_ptr, tgt_ptr, seed_key, key_ptr, rows, m, k, KEY_IN_MEMORY: tl.constexpr,
                              USE_ABS: tl.constexpr, FLOAT_TARGETS: tl.constexpr, COUNTER_MUL: tl.constexpr,
                              BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = r < rows
    b = r // m
    t = r - b * m
    if KEY_IN_MEMORY:       # the key as a device scalar (int64 holding 32 bits): no host value baked into a graph
        key = tl.load(key_ptr).to(tl.uint32)
    else:
        key = seed_key.to(tl.uint32)
    image_key = _hash32(key ^ b.to(tl.uint32))
    c_i = (2 * t).to(tl.uint32)
    c_j = c_i + 1
    bits_i = _hash32(_hash32(image_key ^ (c_i * COUNTER_MUL).to(tl.uint32)) ^ c_i)
    bits_j = _hash32(_hash32(image_key ^ (c_j * COUNTER_MUL).to(tl.uint32)) ^ c_j)
    p_i = ((bits_i.to(tl.uint64) * (k * k)) >> 32).to(tl.int64)
    p_j = ((bits_j.to(tl.uint64) * (k * k)) >> 32).to(tl.int64)
    d_row = p_i // k - p_j // k
    d_col = p_i % k - p_j % k
    if USE_ABS:
        d_row = tl.abs(d_row)
        d_col = tl.abs(d_col)
    else:
        d_row = d_row + (k - 1)
        d_col = d_col + (k - 1)
    tl.store(pi_ptr + r, p_i, mask=mask)
    tl.store(pj_ptr + r, p_j, mask=mask)
    if FLOAT_TARGETS:
        d_row = d_row.to(tl.float32)
        d_col = d_col.to(tl.float32)
    tl.store(tgt_ptr + 2 * r, d_row, mask=mask)
    tl.store(tgt_ptr + 2 * r + 1, d_col, mask=mask)


def pairs_and_targets(batch: int, k: int, m: int, use_abs: bool, seed: int | torch.Tensor, device: torch.device,
                      float_targets: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p_i, p_j (B, m) int64 and targets (B, m, 2) int64 (or float32), equal to the torch twin's.
    seed: a Python int, or a 0-dim integer tensor (hashed on its device; read by the kernel from memory)."""
    if not 1 <= k * k < 2 ** 31:
        raise ValueError(f"grid side k={k} out of range for pair sampling")
    p_i = torch.empty(batch, m, dtype=torch.int64, device=device)
    p_j = torch.empty_like(p_i)
    target = torch.empty(batch, m, 2, dtype=torch.float32 if float_targets else torch.int64, device=device)
    rows = batch * m
    in_memory = isinstance(seed, torch.Tensor)
    key = drloc_seed_key(seed.to(device)).reshape(1) if in_memory else p_i   # p_i: an unread placeholder pointer
    if rows:
        block = 256
        _pairs_and_targets_kernel[(triton.cdiv(rows, block),)](
            p_i, p_j, target, 0 if in_memory else drloc_seed_key(seed), key, rows, m, k, KEY_IN_MEMORY=in_memory,
            USE_ABS=use_abs, FLOAT_TARGETS=float_targets, COUNTER_MUL=COUNTER_MUL, BLOCK=block)
    return p_i, p_j, target


# ---------------------------------------------------------------------------------------------- pair head
@triton.jit
def _gather_add_bias_relu_kernel(p_ptr, pi_ptr, pj_ptr, b1_ptr, h_ptr, rows, m, N, H, ACC: tl.constexpr,
                                 BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = r < rows
    cmask = c < H
    mask = rmask[:, None] & cmask[None, :]
    b = r // m
    p_i = tl.load(pi_ptr + r, mask=rmask, other=0)
    p_j = tl.load(pj_ptr + r, mask=rmask, other=0)
    row_i = (b * N + p_i) * (2 * H)          # P is (B*N, 2H): W_a e_i in [:H], W_b e_j in [H:]
    row_j = (b * N + p_j) * (2 * H) + H
    a = tl.load(p_ptr + row_i[:, None] + c[None, :], mask=mask, other=0.0).to(ACC)
    a += tl.load(p_ptr + row_j[:, None] + c[None, :], mask=mask, other=0.0).to(ACC)
    a += tl.load(b1_ptr + c, mask=cmask, other=0.0).to(ACC)[None, :]
    a = tl.maximum(a, 0.0)
    tl.store(h_ptr + r[:, None] * H + c[None, :], _round_to(a, h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scatter_pairs_kernel(dh_ptr, h_ptr, pi_ptr, pj_ptr, dp_ptr, rows, m, N, H, BLOCK_R: tl.constexpr,
                          BLOCK_H: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    rmask = r < rows
    cmask = c < H
    mask = rmask[:, None] & cmask[None, :]
    b = r // m
    p_i = tl.load(pi_ptr + r, mask=rmask, other=0)
    p_j = tl.load(pj_ptr + r, mask=rmask, other=0)
    offs = r[:, None] * H + c[None, :]
    h = tl.load(h_ptr + offs, mask=mask, other=0.0)
    dz = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(dp_ptr.dtype.element_ty)
    dz = tl.where(h > 0, dz, 0.0)
    row_i = (b * N + p_i) * (2 * H)
    row_j = (b * N + p_j) * (2 * H) + H
    tl.atomic_add(dp_ptr + row_i[:, None] + c[None, :], dz, mask=mask, sem="relaxed")  # order-free sums
    tl.atomic_add(dp_ptr + row_j[:, None] + c[None, :], dz, mask=mask, sem="relaxed")


def _block_h(h: int) -> int:
    return min(128, triton.next_power_of_2(max(h, 1)))


def gather_add_bias_relu(proj: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor, b1: torch.Tensor,
                         n_tokens: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """proj (B*N, 2H) contiguous, p_i/p_j (B, m) int64, b1 (H,) -> h1 (B*m, H) in out_dtype (default proj's),
    added in the accumulation dtype and rounded once."""
    h = proj.shape[1] // 2
    m = p_i.shape[1]
    rows = p_i.numel()
    out = torch.empty(rows, h, dtype=out_dtype or proj.dtype, device=proj.device)
    if rows and h:
        block_r, block_h = 16, _block_h(h)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(h, block_h))
        _gather_add_bias_relu_kernel[grid](proj, p_i.contiguous(), p_j.contiguous(), b1.contiguous(), out, rows,
                                           m, n_tokens, h, ACC=_tl_acc(out.dtype), BLOCK_R=block_r,
                                           BLOCK_H=block_h)
    return out


def scatter_pairs(dh1: torch.Tensor, h1: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor, batch: int,
                  n_tokens: int) -> torch.Tensor:
    """dh1, h1 (B*m, H) -> dP (B*N, 2H) in the accumulation dtype: the ReLU-masked pair gradients summed back
    onto the projected tokens ([:H] through p_i, [H:] through p_j)."""
    rows, h = h1.shape
    m = p_i.shape[1]
    dp = torch.zeros(batch * n_tokens, 2 * h, dtype=acc_dtype(h1.dtype), device=h1.device)
    if rows and h:
        block_r, block_h = 16, _block_h(h)
        grid = (triton.cdiv(rows, block_r), triton.cdiv(h, block_h))
        _scatter_pairs_kernel[grid](dh1.contiguous(), h1.contiguous(), p_i.contiguous(), p_j.contiguous(), dp,
                                    rows, m, n_tokens, h, BLOCK_R=block_r, BLOCK_H=block_h)
    return dp


# -------------------------------------------------------------------------------------------------- losses
@triton.jit
def _pair_loss_kernel(x_ptr, tgt_ptr, loss_ptr, grad_ptr, rows, n, denom, MODE: tl.constexpr, ACC: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    # x is (rows, 2n): the row-axis outputs in [:n], the col-axis outputs in [n:] (l1: n = 1, the two offsets).
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_N)
    rmask = r < rows
    cmask = c < n
    mask = rmask[:, None] & cmask[None, :]
    total = tl.full([BLOCK_R], 0.0, ACC)
    for axis in tl.static_range(2):
        offs = r[:, None] * (2 * n) + axis * n + c[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
        t = tl.load(tgt_ptr + 2 * r + axis, mask=rmask, other=0)
        if MODE == 0:      # l1: |x - t|, d/dx = sign(x - t)
            d = x - t.to(ACC)[:, None]
            loss = _row_sum(tl.where(mask, tl.abs(d), 0.0))
            grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0)).to(ACC)
        else:
            x = tl.where(cmask[None, :], x, float("-inf"))
            x_max = _row_max(x)
            e = tl.exp(x - x_max[:, None])
            s = _row_sum(e)
            p = e / s[:, None]
            if MODE == 1:  # ce: logsumexp - x_t, d/dx = p - onehot(t)
                onehot = c[None, :] == t.to(tl.int32)[:, None]
                x_t = _row_sum(tl.where(onehot & cmask[None, :], x, 0.0))
                loss = tl.log(s) + x_max - x_t
                grad = p - tl.where(onehot, 1.0, 0.0).to(ACC)
            else:          # cbr: (mu - t)^2 / var + 0.001 log var, var = sum p (c - mu)^2 + 1e-8
                cf = c.to(ACC)[None, :]
                mu = _row_sum(p * cf)
                dev = cf - mu[:, None]
                var0 = _row_sum(p * dev * dev)
                var = var0 + 1e-8
                err = mu - t.to(ACC)
                loss = err * err / var + 0.001 * tl.log(var)
                dl_dmu = 2.0 * err / var
                dl_dvar = 0.001 / var - err * err / (var * var)
                grad = p * (dl_dmu[:, None] * dev + dl_dvar[:, None] * (dev * dev - var0[:, None]))
        total += tl.where(rmask, loss, 0.0)
        tl.store(grad_ptr + offs, grad / denom, mask=mask)
    tl.store(loss_ptr + r, total / denom, mask=rmask)


def pair_loss(outputs: torch.Tensor, target: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """outputs (R, 2n) head outputs (l1: n = 1), target (R, 2) -> (per-row loss (R,), d loss / d outputs (R, 2n)),
    both in the accumulation dtype and already divided by the mean's count, so loss.sum() is the drloc loss."""
    rows, width = outputs.shape
    n = width // 2
    acc = acc_dtype(outputs.dtype)
    loss = torch.empty(rows, dtype=acc, device=outputs.device)
    grad = torch.empty(rows, width, dtype=acc, device=outputs.device)
    if rows:
        denom = 2 * rows if mode == "l1" else rows      # l1 averages over B*m*2, ce/cbr over B*m per axis
        block_n = max(triton.next_power_of_2(n), 2)
        block_r = max(2, min(64, 4096 // block_n))
        _pair_loss_kernel[(triton.cdiv(rows, block_r),)](
            outputs.contiguous(), target.contiguous(), loss, grad, rows, n, denom, MODE=MODE_IDS[mode],
            ACC=_tl_acc(outputs.dtype), BLOCK_R=block_r, BLOCK_N=block_n)
    return loss, grad
