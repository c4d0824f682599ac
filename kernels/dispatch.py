"""One entry point per fused drloc op, choosing Triton or the PyTorch reference (config `engine.kernels`).

backend: 'auto'   -> Triton for CUDA tensors when the triton package is installed, the PyTorch reference
                     elsewhere (on CUDA without triton it falls back, saying so once in the log);
         'triton' -> Triton always: compiled on CUDA, Triton's interpreter on CPU when TRITON_INTERPRET=1
                     (anything else raises TritonUnavailableError saying so);
         'torch'  -> the plain reference (kernels/drloc_reference.py), autograd through it.

How DrlocHead / DrlocTask call it (per pass, tokens = out.patch_tokens (B, k*k, C), any dtype/strides):

    p_i, p_j, target = drloc_pairs_and_targets(B, k, m, use_abs, seed, tokens.device, backend,
                                               float_targets=(mode == "l1"))
    params = HeadParams.from_module(task.head)            # or HeadParams.from_linears(first, second, outs)
    loss = drloc_pair_loss(tokens, p_i, p_j, target, params, mode, backend)     # scalar fp32, differentiable

Positions must lie in [0, k*k) (the kernels do not bounds-check them). The Triton calls are excluded from
torch.compile graphs (torch.compiler.disable): compiling a step that calls them gives a graph break there.

`seed` must change every step and pass (e.g. a hash of run seed, step, pass index): the positions are a pure
function of (seed, image index in the batch, pair index), identical on both backends.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from kernels import drloc_reference as ref
from kernels.drloc_head import MODES, fused_pair_loss
from kernels.triton_runtime import TritonUnavailableError, load_kernels, triton_available  # noqa: F401

Backend = Literal["auto", "triton", "torch"]
BACKENDS = ("auto", "triton", "torch")
_SOURCE = "kernels.drloc_triton"
log = logging.getLogger("smallvit")


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """'auto' -> 'triton' on CUDA devices with triton installed, 'torch' elsewhere; 'triton'/'torch' pass through."""
    if backend not in BACKENDS:
        raise ValueError(f"kernels backend must be one of {BACKENDS} (config key engine.kernels), got {backend!r}")
    if backend == "auto":
        if torch.device(device).type != "cuda":
            return "torch"
        if not triton_available():
            _warn_no_triton()
            return "torch"
        return "triton"
    return backend


@functools.cache
def _warn_no_triton() -> None:
    log.warning("engine.kernels=auto: the triton package is not installed, so the drloc head runs the PyTorch "
                "reference on CUDA (slower; same losses). Install triton for the fused kernels, or set "
                "engine.kernels=torch to silence this.")


@dataclass(frozen=True)
class HeadParams:
    """The drloc head's weights in nn.Linear layout: w (out, in), b (out,).

    w1 (H, 2C), b1 (H,): first Linear on concat(e_i, e_j); w2 (H, H), b2 (H,): second Linear (ReLU after both);
    out: [(w (2, H), b (2,))] for l1, [(w_rows (n, H), b_rows), (w_cols (n, H), b_cols)] for ce/cbr;
    w3 (H, H), b3 (H,): ce/cbr only, the shared third Linear before the two outputs (C's `layers.4`), no ReLU.
    """
    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    out: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    w3: Optional[torch.Tensor] = None
    b3: Optional[torch.Tensor] = None

    @property
    def shared(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(w3, b3), or None (l1)."""
        return None if self.w3 is None else (self.w3, self.b3)

    @classmethod
    def from_linears(cls, first: nn.Linear, second: nn.Linear, outs: Sequence[nn.Linear],
                     shared: Optional[nn.Linear] = None) -> "HeadParams":
        return cls(first.weight, first.bias, second.weight, second.bias, tuple((o.weight, o.bias) for o in outs),
                   None if shared is None else shared.weight, None if shared is None else shared.bias)

    @classmethod
    def from_module(cls, head: nn.Module) -> "HeadParams":
        """From engine.tasks.drloc.DrlocHead (`layers` = Linear ReLU Linear ReLU Linear, `unshared` or None)."""
        layers = head.layers
        if getattr(head, "unshared", None) is None:
            return cls.from_linears(layers[0], layers[2], [layers[4]])
        return cls.from_linears(layers[0], layers[2], list(head.unshared), shared=layers[4])


def drloc_pairs_and_targets(batch: int, k: int, m: int, use_abs: bool, seed: int | torch.Tensor,
                            device: torch.device | str, backend: str = "auto", float_targets: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """p_i, p_j (B, m) int64 flat grid positions (row * k + col), uniform over the k*k grid, independent, with
    replacement; target (B, m, 2) offsets (rows, cols) of p_i relative to p_j in grid cells: |Δ| with use_abs,
    else Δ + (k-1); int64 class indices, or float32 with float_targets (the 'l1' regression targets).
    Both backends return the same values for the same seed. seed: a Python int, or a 0-dim integer tensor (on the
    device: hashed there and read by the kernel, so a CUDA-graph replay draws fresh pairs when the tensor changes)."""
    device = torch.device(device)
    if resolve_backend(backend, device) == "torch":
        return ref.counter_pairs_and_targets(batch, k, m, use_abs, seed, device, float_targets)
    return _triton_pairs_and_targets(batch, k, m, use_abs, seed, device, float_targets)


# Dynamo does not trace through the kernel loader or the launches: a graph break at the call, the kernels as they are.
@torch.compiler.disable
def _triton_pairs_and_targets(batch, k, m, use_abs, seed, device, float_targets):
    kernels = load_kernels(_SOURCE, device, "drloc_pairs_and_targets")
    return kernels.pairs_and_targets(batch, k, m, use_abs, seed, device, float_targets)


def _check(tokens: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor, target: torch.Tensor, params: HeadParams,
           mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"drloc mode must be one of {MODES} (config key tasks.drloc.mode), got {mode!r}")
    if tokens.dim() != 3:
        raise ValueError(f"drloc tokens must be (B, N, C), got shape {tuple(tokens.shape)}")
    b, _, c = tokens.shape
    if p_i.shape != p_j.shape or p_i.dim() != 2 or p_i.shape[0] != b:
        raise ValueError(f"drloc positions must both be (B={b}, m), got {tuple(p_i.shape)} and {tuple(p_j.shape)}")
    if p_i.dtype != torch.int64 or p_j.dtype != torch.int64:
        raise ValueError("drloc positions must be int64")
    if target.shape != (*p_i.shape, 2):
        raise ValueError(f"drloc target must be (B, m, 2) = {(*p_i.shape, 2)}, got {tuple(target.shape)}")
    if params.w1.shape[1] != 2 * c:
        raise ValueError(f"drloc head's first Linear takes {params.w1.shape[1]} features, tokens give 2*C = {2 * c}")
    if len(params.out) != (1 if mode == "l1" else 2):
        raise ValueError(f"drloc mode {mode!r} needs {1 if mode == 'l1' else 2} output Linear(s), "
                         f"got {len(params.out)}")
    if (params.w3 is None) != (mode == "l1") or (params.w3 is None) != (params.b3 is None):
        raise ValueError(f"drloc mode {mode!r} {'takes no' if mode == 'l1' else 'needs the'} shared third Linear "
                         f"(HeadParams.w3/b3: C's layers.4, ce and cbr only)")


def drloc_pair_loss(tokens: torch.Tensor, p_i: torch.Tensor, p_j: torch.Tensor, target: torch.Tensor,
                    params: HeadParams, mode: str, backend: str = "auto") -> torch.Tensor:
    """The drloc loss (scalar; float32, float64 for float64 inputs) of the pairwise head on the token pairs,
    differentiable w.r.t. tokens
    (B, N, C) and every head weight. Equals ref.{l1,ce,cbr}_loss(ref.pairwise_head(ref.gather_pairs(...)))."""
    _check(tokens, p_i, p_j, target, params, mode)
    out = list(params.out)
    if resolve_backend(backend, tokens.device) == "torch":
        pred = ref.pairwise_head(ref.gather_pairs(tokens, p_i, p_j), params.w1, params.b1, params.w2, params.b2,
                                 out, shared=params.shared)
        if mode == "l1":
            return ref.l1_loss(pred[0], target)
        loss_fn = ref.ce_loss if mode == "ce" else ref.cbr_loss
        return loss_fn(pred[0], pred[1], target)
    return _triton_pair_loss(tokens, p_i, p_j, target, params, out, mode)


@torch.compiler.disable
def _triton_pair_loss(tokens, p_i, p_j, target, params, out, mode):
    kernels = load_kernels(_SOURCE, tokens.device, "drloc_pair_loss")
    return fused_pair_loss(tokens, p_i, p_j, target, params.w1, params.b1, params.w2, params.b2, out, mode,
                           ops=kernels, shared=params.shared)
