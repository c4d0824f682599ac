"""Which parameters AdamW decays: the three conventions the references use, as `optim.no_decay`.

    none   every parameter decays: B's finetune.py, D's and A's main.py, A's finetune_affine.py build
           `AdamW(model.parameters(), weight_decay=wd)`
    dino   biases and 1-D parameters are exempt (DINO's utils.get_params_groups, B's utils/utils_ssl.py); pos_embed,
           cls_token and Swin's relative-position tables decay. C's optimizer.py (Swin's set_weight_decay) gives
           the same on a ViT, which defines no `no_weight_decay()`
    timm   biases, 1-D parameters and what each module's `no_weight_decay()` names are exempt (timm's
           param_groups_weight_decay with model.no_weight_decay(): pos_embed and cls_token of ViT/CaiT, Swin's
           relative_position_bias_table; C's set_weight_decay on its Swin too)

Groups come back as [decay, no decay] (the no-decay group left out when empty), parameters in module order, so
the decay group is always group 0 (pretraining's weight-decay schedule drives it).
"""
from __future__ import annotations

from torch import nn

CONVENTIONS = ("none", "dino", "timm")


def module_no_weight_decay(module: nn.Module) -> set[str]:
    """Qualified names of the parameters that the submodules' own `no_weight_decay()` (timm's API) exempt."""
    names = set()
    for prefix, sub in module.named_modules():
        method = getattr(sub, "no_weight_decay", None)
        if callable(method):
            names.update(f"{prefix}.{n}" if prefix else n for n in method())
    return names


def decays(name: str, param: nn.Parameter, convention: str, exempt: set[str] = frozenset()) -> bool:
    """Whether parameter `name` decays under `convention`; `exempt` is module_no_weight_decay (timm only)."""
    if convention == "none":
        return True
    if convention == "dino":
        return not (name.endswith(".bias") or param.ndim == 1)
    if convention == "timm":
        return not (param.ndim <= 1 or name.endswith(".bias") or name in exempt)
    raise ValueError(f"optim.no_decay must be one of {', '.join(CONVENTIONS)}, got {convention!r}")


def param_groups(module: nn.Module, weight_decay: float, convention: str = "timm") -> list[dict]:
    """AdamW parameter groups of `module`'s trainable parameters: [decay at weight_decay, no decay]."""
    exempt = module_no_weight_decay(module) if convention == "timm" else set()
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p, convention, exempt) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
