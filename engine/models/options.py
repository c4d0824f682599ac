"""The details in which the references' networks of one family differ, as options every registered model takes.

    qkv_bias            bias on the attention's q, k, v projections (B's timm networks: yes; D's: no)
    norm_eps            eps of every LayerNorm in the blocks and the head norm (B: 1e-6; D: PyTorch's 1e-5)
    drop_path_schedule  'linear': block i of n drops with rate * i / (n - 1) (timm's ViT/Swin, B's ViT);
                        'constant': every block drops with `rate` (D's one shared DropPath; timm's/B's CaiT)
    init                'timm': timm's own init (ViT: cls_token normal(1e-6)); 'b': B's code (ViT: cls_token
                        trunc-normal(0.02); CaiT: the patch embedding, a Linear in B, trunc-normal(0.02));
                        'd': D's code (xavier-normal Linear weights, the patch embedding as the Linear(c*p*p, dim)
                        it is in D, zero biases, LayerNorm 1/0, pos_embed and cls_token standard normal)

Each registered model's defaults are its reference network's (B's for vit_*, swin_*, cait_*; D's for cait_d_*);
`model_kwargs(cfg.model)` turns the config's `model.*` keys into create_model keywords, leaving out what is at
'reference' so the model's own default stands.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
from timm.layers import DropPath, trunc_normal_
from torch import nn

REFERENCE = "reference"      # the config value meaning "what the registered model's reference network uses"
INITS = ("timm", "b", "d")
SCHEDULES = ("linear", "constant")


def norm_layer(eps: float):
    """LayerNorm with this eps, in the form timm's constructors take (`norm_layer=`)."""
    return partial(nn.LayerNorm, eps=eps)


def drop_path_rates(rate: float, depth: int, schedule: str) -> list[float]:
    """Per-block drop-path rates: linear 0 -> rate over `depth` blocks (timm's rule), or `rate` everywhere."""
    if schedule not in SCHEDULES:
        raise ValueError(f"model.drop_path_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return [rate] * depth
    return [x.item() for x in torch.linspace(0, rate, depth)] if depth else []


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


def set_drop_path(blocks: Sequence[nn.Module], rates: Sequence[float]) -> None:
    """Give block i drop-path rate rates[i], on every DropPath slot it has (timm: drop_path1/2 or drop_path)."""
    for block, rate in zip(blocks, rates, strict=True):
        for slot in ("drop_path", "drop_path1", "drop_path2"):
            if hasattr(block, slot):
                setattr(block, slot, _drop_path(rate))


def block_drop_path_rates(blocks: Sequence[nn.Module]) -> list[float]:
    """The rate each block drops its residual branches with (0 for Identity); the test-side reading of the above."""
    rates = []
    for block in blocks:
        slot = getattr(block, "drop_path1", None) or getattr(block, "drop_path", None)
        rates.append(float(getattr(slot, "drop_prob", 0.0)))
    return rates


def check_init(init: str, supported: Sequence[str], model_name: str) -> None:
    if init not in supported:
        raise ValueError(f"model.init={init!r} is not defined for {model_name} (it takes {', '.join(supported)})")


@torch.no_grad()
def init_b_vit(model: nn.Module) -> None:
    """B's ViT: timm's init except the cls_token, trunc-normal(0.02) (B's vit.py) instead of normal(1e-6)."""
    trunc_normal_(model.cls_token, std=0.02)


@torch.no_grad()
def init_b_cait(model: nn.Module) -> None:
    """B's CaiT: timm's init except the patch embedding, which B builds as Rearrange + Linear(3 p^2, dim) and so
    initialises trunc-normal(0.02) with a zero bias (timm's conv keeps PyTorch's default)."""
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        trunc_normal_(proj.weight, std=0.02)
        nn.init.zeros_(proj.bias)


def _xavier_normal_as_linear(weight: torch.Tensor) -> None:
    """Xavier-normal for the Linear(in = c*kh*kw, out) a patchify conv (out, c, kh, kw) stands for:
    std = sqrt(2 / (in + out)) (torch's own fan for a conv would count out*kh*kw)."""
    fan_out, fan_in = weight.shape[0], math.prod(weight.shape[1:])
    weight.normal_(0.0, math.sqrt(2.0 / (fan_in + fan_out)))


@torch.no_grad()
def init_d(model: nn.Module) -> None:
    """D's init (SPT_LSA_ViT models/vit.py, cait.py `init_weights` applied to every module, then kept):
    xavier-normal Linear weights and zero biases, LayerNorm weight 1 / bias 0, the non-SPT patch embedding as D's
    Linear(c*p*p, dim), pos_embed and cls_token N(0, 1). LSA temperatures, LayerScale and CaiT's head-mixing
    matrices keep their own (D's) values."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    proj = getattr(model.patch_embed, "proj", None)
    if isinstance(proj, nn.Conv2d):
        _xavier_normal_as_linear(proj.weight)
        nn.init.zeros_(proj.bias)
    for name in ("pos_embed", "cls_token"):
        param = getattr(model, name, None)
        if isinstance(param, torch.Tensor):
            param.normal_(0.0, 1.0)


def model_kwargs(model_cfg, **override) -> dict:
    """create_model keywords from a ModelConfig: drop_path, spt, lsa, the size overrides that are set (non-zero),
    and the reference options not at 'reference' (norm_eps: not 0; lsa_reference_diagonal: CaiT only, which
    engine.config.validate enforces). `override` wins (e.g. drop_path=0.0)."""
    kwargs = {"drop_path": model_cfg.drop_path, "spt": model_cfg.spt, "lsa": model_cfg.lsa}
    kwargs.update({k: getattr(model_cfg, k) for k in ("depth", "embed_dim", "num_heads") if getattr(model_cfg, k)})
    for key in ("qkv_bias", "drop_path_schedule", "init", "lsa_reference_diagonal"):
        value = getattr(model_cfg, key)
        if value != REFERENCE:
            kwargs[key] = value
    if model_cfg.norm_eps:
        kwargs["norm_eps"] = model_cfg.norm_eps
    kwargs.update(override)
    return kwargs
