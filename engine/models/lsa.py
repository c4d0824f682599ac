"""Locality Self-Attention (METHODS.md D; Lee et al. 2021) for each attention flavour we use.

LSA changes two things in softmax(Q K^T * scale):
  - the fixed scale becomes a learnable per-head temperature `temperature` (num_heads,), initialised to
    dim_head^-0.5, multiplying Q K^T;
  - the diagonal (each token with itself, CLS included) is masked out (-inf) before the softmax.

Each class subclasses the timm attention it replaces, so it drops into timm's `attn_layer=` / `attn_block=` slots
with the same constructor and parameter names (plus `temperature`). The temperature is folded into q before the
product (q * t) @ k^T == (q @ k^T) * t, which lets the fused scaled_dot_product_attention path take it with scale=1.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from timm.layers import Attention
from timm.models.cait import ClassAttn, TalkingHeadAttn
from timm.models.swin_transformer import WindowAttention

# What D's CaiT writes on the diagonal: -1e-9, i.e. practically 0 -- the mask is a no-op there (a reference bug).
REFERENCE_CAIT_DIAGONAL_FILL = -1e-9


def diagonal(n: int, device) -> torch.Tensor:
    """(n, n) bool, True on the diagonal: the entries LSA removes."""
    return torch.eye(n, dtype=torch.bool, device=device)


def _temperature(num_heads: int, head_dim: int) -> nn.Parameter:
    return nn.Parameter(torch.full((num_heads,), head_dim ** -0.5))


class LSAAttention(Attention):
    """timm ViT Attention with LSA. x (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.temperature = _temperature(num_heads, self.head_dim)

    def attention_probs(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, N) the attention weights (the plain reference path; tests read it)."""
        b, n, _ = x.shape
        q, k, _ = self._qkv(x)
        logits = (q @ k.transpose(-2, -1)) * self.temperature.view(1, -1, 1, 1)
        return logits.masked_fill(diagonal(n, x.device), float("-inf")).softmax(dim=-1)

    def _qkv(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("LSAAttention takes no extra attention mask")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if getattr(self, "gate", None) is not None else None
        q, k, v = self._qkv(x)
        q = q * self.temperature.view(1, -1, 1, 1).to(q.dtype)
        keep = ~diagonal(n, x.device)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=1.0,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q @ k.transpose(-2, -1)).masked_fill(~keep, float("-inf")).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        out = self.norm(out.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class LSAWindowAttention(WindowAttention):
    """timm Swin WindowAttention with LSA (D's Swin): temperature on q, diagonal -inf added to the relative
    position bias and the shifted-window mask. x (B*nW, N, C) -> (B*nW, N, C)."""

    def __init__(self, dim: int, num_heads: int, head_dim: Optional[int] = None, **kwargs):
        super().__init__(dim, num_heads, head_dim=head_dim, **kwargs)
        self.temperature = _temperature(num_heads, head_dim or dim // num_heads)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        b_, n, _ = x.shape
        qkv = self.qkv(x).reshape(b_, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q = q * self.temperature.view(1, -1, 1, 1).to(q.dtype)
        bias = self._get_rel_pos_bias()                                    # (1, heads, N, N)
        if mask is not None:
            num_win = mask.shape[0]
            bias = (bias.unsqueeze(1) + mask.view(1, num_win, 1, n, n)).expand(b_ // num_win, -1, -1, -1, -1)
            bias = bias.reshape(b_, self.num_heads, n, n)
        bias = bias.masked_fill(diagonal(n, x.device), float("-inf")).to(q.dtype)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1)
            out = self.attn_drop(attn) @ v
        out = out.transpose(1, 2).reshape(b_, n, -1)
        return self.proj_drop(self.proj(out))


class LSATalkingHeadAttn(TalkingHeadAttn):
    """timm CaiT patch attention (talking heads) with LSA. The diagonal is masked right before the softmax,
    after the pre-softmax head mixing `proj_l` (masking before a linear mix of heads would spread -inf into NaN).
    `reference_diagonal=True` reproduces D's CaiT instead: the diagonal logit is set to -1e-9 before the mixing,
    which leaves it practically unmasked."""

    reference_diagonal: bool = False

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.temperature = _temperature(num_heads, dim // num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.temperature.view(1, -1, 1, 1), qkv[1], qkv[2]
        attn = q @ k.transpose(-2, -1)
        diag = diagonal(n, x.device)
        if self.reference_diagonal:
            attn = attn.masked_fill(diag, REFERENCE_CAIT_DIAGONAL_FILL)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if not self.reference_diagonal:
            attn = attn.masked_fill(diag, float("-inf"))
        attn = attn.softmax(dim=-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        out = (attn @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))


class LSATalkingHeadAttnReference(LSATalkingHeadAttn):
    """D's CaiT diagonal quirk (see LSATalkingHeadAttn)."""

    reference_diagonal = True


class LSAClassAttn(ClassAttn):
    """timm CaiT class attention with the LSA temperature. No diagonal mask: the CLS query attends to
    [CLS, patches], and D's CaiT does not mask its class-attention blocks either."""

    def __init__(self, dim: int, num_heads: int = 8, **kwargs):
        super().__init__(dim, num_heads=num_heads, **kwargs)
        self.temperature = _temperature(num_heads, dim // num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h = self.num_heads
        q = self.q(x[:, 0]).unsqueeze(1).reshape(b, 1, h, c // h).permute(0, 2, 1, 3)
        k = self.k(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        v = self.v(x).reshape(b, n, h, c // h).permute(0, 2, 1, 3)
        q = q * self.temperature.view(1, -1, 1, 1).to(q.dtype)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, scale=1.0,
                                                 dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            out = self.attn_drop((q @ k.transpose(-2, -1)).softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(b, 1, c)
        return self.proj_drop(self.proj(out))
