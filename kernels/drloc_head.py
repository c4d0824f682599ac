"""The fused drloc pairwise head + loss as one `torch.autograd.Function` (METHODS.md C), with two sets of ops:
Triton kernels (kernels/drloc_triton.py) and their plain-PyTorch twins (`TorchPairOps`, used for gradcheck and as
the readable statement of what each kernel does).

Algebra: the first Linear on concat(e_i, e_j) is W_a e_i + W_b e_j with w1 = [W_a | W_b] (H, 2C), so every token is
projected once, P = tokens @ [W_a; W_b]^T (B*N, 2H), and each pair only gathers and adds two rows of P:
    h1 = relu(P[b, p_i, :H] + P[b, p_j, H:] + b1)             (B*m, H)   fused kernel (P kept in fp32)
    h2 = relu(h1 @ w2^T + b2)                                 (B*m, H)   cuBLAS
    h3 = h2 @ w3^T + b3          (ce/cbr only; l1: h3 = h2)   (B*m, H)   cuBLAS (C's shared `layers.4`)
    y  = h3 @ w_out^T + b_out                                 (B*m, 2n)  cuBLAS (l1: n = 1; ce/cbr: rows | cols)
    loss, dL/dy = pair_loss(y, target)                        fused kernel (the gradient is computed in forward)
Backward: matmuls for the dense layers, then the pair gradients are scatter-added (atomics) back onto dP (B*N, 2H),
dw1 = [dP[:, :H]^T tokens | dP[:, H:]^T tokens], dtokens = dP @ [W_a; W_b], db1 = column sums of dP[:, :H].

Determinism: the Triton scatter uses atomic adds (summation order varies run to run); under
torch.use_deterministic_algorithms(True) the backward uses the torch scatter (index_add_) instead.

Dtypes: matmuls run in the compute dtype (bf16 or fp32, or fp64 for gradcheck); gathers, the loss and the
scatter accumulate in fp32 (fp64 for fp64). Gradients come back in each input's own dtype.
"""
from __future__ import annotations

import warnings
from types import ModuleType

import torch

MODES = ("l1", "ce", "cbr")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


_MM_OUT_DTYPE = [True]


def _matmul_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (low-precision inputs) with the result in the accumulation dtype: a bf16 P rounded per half and then
    summed would round twice where the reference's Linear on concat(e_i, e_j) rounds once."""
    acc = _acc(a.dtype)
    if a.dtype == acc:
        return a @ b
    if a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=acc)      # bf16 tensor cores, fp32 output
        except (RuntimeError, TypeError) as err:      # a torch/GPU without aten::mm.dtype for these dtypes
            _MM_OUT_DTYPE[0] = False
            warnings.warn(f"drloc: torch.mm(out_dtype=float32) unavailable ({err}); projecting in fp32 instead")
    return a.to(acc) @ b.to(acc)                      # CPU (interpreter tests): same math, upcast inputs


class TorchPairOps:
    """Plain-PyTorch twins of the three Triton kernels, same signatures and dtypes."""

    @staticmethod
    def gather_add_bias_relu(proj: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor, b1: torch.Tensor,
                             n_tokens: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        h = proj.shape[1] // 2
        out_dtype = out_dtype or proj.dtype
        base = torch.arange(p_i.shape[0], device=p_i.device)[:, None] * n_tokens
        acc = _acc(out_dtype)
        a = proj[(base + p_i).reshape(-1), :h].to(acc) + proj[(base + p_j).reshape(-1), h:].to(acc)
        return torch.relu(a + b1.to(acc)).to(out_dtype)

    @staticmethod
    def scatter_pairs(dh1: torch.Tensor, h1: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor, batch: int,
                      n_tokens: int) -> torch.Tensor:
        h = h1.shape[1]
        acc = _acc(h1.dtype)
        dz = torch.where(h1 > 0, dh1.to(acc), 0.0)
        base = torch.arange(batch, device=p_i.device)[:, None] * n_tokens
        dp = torch.zeros(batch * n_tokens, 2 * h, dtype=acc, device=h1.device)
        dp[:, :h].index_add_(0, (base + p_i).reshape(-1), dz)
        dp[:, h:].index_add_(0, (base + p_j).reshape(-1), dz)
        return dp

    @staticmethod
    def pair_loss(outputs: torch.Tensor, target: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """outputs (R, 2n), target (R, 2) -> per-row loss (R,), dL/doutputs (R, 2n), both already divided by the
        mean's count (l1: 2R, ce/cbr: R per axis)."""
        rows, width = outputs.shape
        n = width // 2
        acc = _acc(outputs.dtype)
        x = outputs.to(acc).reshape(rows, 2, n)
        t = target.reshape(rows, 2)
        if mode == "l1":
            d = x[..., 0] - t.to(acc)
            return d.abs().sum(1) / (2 * rows), torch.sign(d).reshape(rows, width) / (2 * rows)
        p = torch.softmax(x, dim=-1)
        if mode == "ce":
            lse = torch.logsumexp(x, dim=-1)
            x_t = x.gather(-1, t.long()[..., None])[..., 0]
            onehot = torch.nn.functional.one_hot(t.long(), n).to(acc)
            return (lse - x_t).sum(1) / rows, (p - onehot).reshape(rows, width) / rows
        c = torch.arange(n, dtype=acc, device=outputs.device)
        mu = (p * c).sum(-1)
        dev = c - mu[..., None]
        var0 = (p * dev * dev).sum(-1)
        var = var0 + 1e-8
        err = mu - t.to(acc)
        loss = err * err / var + 0.001 * torch.log(var)
        dl_dmu = 2.0 * err / var
        dl_dvar = 0.001 / var - err * err / (var * var)
        grad = p * (dl_dmu[..., None] * dev + dl_dvar[..., None] * (dev * dev - var0[..., None]))
        return loss.sum(1) / rows, grad.reshape(rows, width) / rows


class FusedPairLoss(torch.autograd.Function):
    """loss = drloc loss of the pairwise head on tokens gathered at (p_i, p_j); see the module docstring.

    Inputs: ops (TorchPairOps or the Triton module), mode, compute dtype, tokens (B, N, C), p_i/p_j (B, m) int64,
    target (B, m, 2) (int64, or float for l1), w1 (H, 2C), b1 (H,), w2 (H, H), b2 (H,), w3 (H, H) and b3 (H,)
    (ce/cbr; None for l1), w_out (2n, H), b_out (2n,).
    Returns the scalar loss in the accumulation dtype (fp32; fp64 for fp64 inputs).
    """

    @staticmethod
    def forward(ctx, ops, mode: str, dtype: torch.dtype, tokens, p_i, p_j, target, w1, b1, w2, b2, w3, b3, w_out,
                b_out):
        batch, n_tokens, c = tokens.shape
        h = w1.shape[0]
        with torch.autocast(tokens.device.type, enabled=False):
            x = tokens.to(dtype).reshape(batch * n_tokens, c)
            w_proj = torch.cat([w1[:, :c], w1[:, c:]], 0).to(dtype)                   # (2H, C) = [W_a; W_b]
            proj = _matmul_acc(x, w_proj.T)                                              # (B*N, 2H) fp32
            h1 = ops.gather_add_bias_relu(proj, p_i, p_j, b1, n_tokens, dtype)           # (R, H)
            del proj
            w2c, w_outc = w2.to(dtype), w_out.to(dtype)
            h2 = torch.relu_(torch.addmm(b2.to(dtype), h1, w2c.T))
            w3c = None if w3 is None else w3.to(dtype)
            h3 = h2 if w3c is None else torch.addmm(b3.to(dtype), h2, w3c.T)             # (R, H)
            y = torch.addmm(b_out.to(dtype), h3, w_outc.T)                                # (R, 2n)
            loss_rows, dy = ops.pair_loss(y, target.reshape(-1, 2), mode)
        ctx.save_for_backward(x, w_proj, h1, h2, h3, w2c, w3c, w_outc, dy, p_i, p_j)
        ctx.ops, ctx.mode, ctx.dtype = ops, mode, dtype
        ctx.shape = (batch, n_tokens, c, h)
        ctx.in_dtypes = (tokens.dtype, w1.dtype, b1.dtype, w2.dtype, b2.dtype,
                         None if w3 is None else w3.dtype, None if b3 is None else b3.dtype, w_out.dtype, b_out.dtype)
        return loss_rows.sum()

    @staticmethod
    def backward(ctx, grad_loss):
        x, w_proj, h1, h2, h3, w2c, w3c, w_outc, dy, p_i, p_j = ctx.saved_tensors
        batch, n_tokens, c, h = ctx.shape
        dtype = ctx.dtype
        need = ctx.needs_input_grad
        with torch.autocast(x.device.type, enabled=False):
            dy = dy * grad_loss.to(dy.dtype)
            db_out = dy.sum(0)
            dyc = dy.to(dtype)
            dw_out = dyc.T @ h3
            dh3 = dyc @ w_outc
            dw3 = db3 = None
            if w3c is None:
                dh2 = dh3
            else:
                db3 = dh3.sum(0, dtype=_acc(dtype))
                dw3 = dh3.T @ h2
                dh2 = dh3 @ w3c
            dh2 = torch.where(h2 > 0, dh2, 0.0)
            db2 = dh2.sum(0, dtype=_acc(dtype))
            dw2 = dh2.T @ h1
            dh1 = dh2 @ w2c
            # atomics sum in a run-dependent order; torch's index_add_ has a deterministic mode
            scatter = (TorchPairOps.scatter_pairs if torch.are_deterministic_algorithms_enabled()
                       else ctx.ops.scatter_pairs)
            dp = scatter(dh1, h1, p_i, p_j, batch, n_tokens)                              # (B*N, 2H) acc dtype
            db1 = dp[:, :h].sum(0)
            dpc = dp.to(dtype)
            del dp
            dw1 = dtokens = None
            if need[7]:
                dw_proj = dpc.T @ x                                                       # (2H, C)
                dw1 = torch.cat([dw_proj[:h], dw_proj[h:]], 1)
            if need[3]:
                dtokens = (dpc @ w_proj).reshape(batch, n_tokens, c)
        t_dt, w1_dt, b1_dt, w2_dt, b2_dt, w3_dt, b3_dt, wo_dt, bo_dt = ctx.in_dtypes
        cast = lambda g, dt: None if g is None else g.to(dt)  # noqa: E731
        return (None, None, None, cast(dtokens, t_dt), None, None, None, cast(dw1, w1_dt), cast(db1, b1_dt),
                cast(dw2, w2_dt), cast(db2, b2_dt), cast(dw3, w3_dt), cast(db3, b3_dt), cast(dw_out, wo_dt),
                cast(db_out, bo_dt))


def fused_pair_loss(tokens: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor, target: torch.Tensor,
                    w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
                    out_weights: list[tuple[torch.Tensor, torch.Tensor]], mode: str,
                    ops: type[TorchPairOps] | ModuleType = TorchPairOps,
                    dtype: torch.dtype | None = None,
                    shared: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """The drloc loss through FusedPairLoss. out_weights: [(w, b)] for l1 (w (2, H)), [(w_rows, b_rows),
    (w_cols, b_cols)] for ce/cbr (each (n, H)); shared: (w3 (H, H), b3 (H,)), the third Linear ce/cbr need
    (None for l1). dtype: compute dtype (default: the autocast dtype inside an autocast region, else tokens.dtype)."""
    if mode not in MODES:
        raise ValueError(f"drloc mode must be one of {MODES}, got {mode!r}")
    if (shared is None) != (mode == "l1"):
        raise ValueError(f"drloc mode {mode!r} {'takes no' if mode == 'l1' else 'needs the'} shared third Linear")
    if dtype is None:
        dev = tokens.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else tokens.dtype
    if len(out_weights) == 1:
        w_out, b_out = out_weights[0]
    else:
        w_out = torch.cat([w for w, _ in out_weights], 0)
        b_out = torch.cat([b for _, b in out_weights], 0)
    w3, b3 = shared if shared is not None else (None, None)
    return FusedPairLoss.apply(ops, mode, dtype, tokens, p_i, p_j, target, w1, b1, w2, b2, w3, b3, w_out, b_out)
