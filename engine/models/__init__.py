"""Registry of small-data model configs, timm style: `create_model("vit_cifar", num_classes=10)`.

Every model returns a `ModelOutput` from `forward_with_tokens(x)`: the class logits and the last block's tokens
before the final norm, so auxiliary tasks never need a second forward pass for their features.

Every registered model also has `forward(x) -> logits`, `embed_dim` (the channel count C of `ModelOutput.tokens`,
which for Swin is the last stage's width, not the stem's) and `grid_size` (k, the side of the token grid).
Registered: vit_cifar, vit_tiny_imagenet, swin_cifar, swin_tiny_imagenet, cait_cifar, cait_tiny_imagenet (B's
networks; D's ViT is vit_* with D's options, engine/models/options.py), cait_d_cifar, cait_d_tiny_imagenet (D's CaiT).
"""
from __future__ import annotations

from engine.models.registry import ModelOutput, create_model, list_models, register_model  # noqa: F401
from engine.models import cait, cait_d, swin, vit  # noqa: E402,F401  (registers)
from engine.models.timm_hub import register_all as _register_with_timm  # noqa: E402

_register_with_timm(list_models())
