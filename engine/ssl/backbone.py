"""The multi-crop wrapper DINO trains (METHODS.md B): the backbone runs once per run of same-size crops.

    backbone = MultiCropBackbone(create_model("vit_cifar", num_classes=0))
    feats = backbone(batch.crops)            # [2 x (B,3,32,32), 8 x (B,3,16,16)] -> (10B, 192), 2 forwards

The embedding itself, at any crop size, is the model's own `pooled_features(x, pos_embed_resize=...)`
(engine/models: ViT/CaiT CLS after the final norm, Swin the mean of the last stage; docs/design.md).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from engine.models.pos_embed import (POS_EMBED_RESIZES, PosEmbedResize, interpolate_pos_embed,  # noqa: F401
                                     truncate_pos_embed)


def _check_backbone(model: nn.Module) -> None:
    if not callable(getattr(model, "pooled_features", None)):
        raise TypeError(f"pooled_features: {type(model).__name__} is not a ViT, CaiT or Swin model")


def pooled_features(model: nn.Module, x: torch.Tensor, pos_embed_resize: PosEmbedResize = "interpolate"
                    ) -> torch.Tensor:
    """x (B, 3, H, W) -> (B, D): `model.pooled_features`, for any registered model; TypeError for another."""
    _check_backbone(model)
    return model.pooled_features(x, pos_embed_resize=pos_embed_resize)


# ------------------------------------------------------------------------------------------------ multi-crop
def resolution_runs(crops: Sequence[torch.Tensor]) -> list[tuple[int, int]]:
    """[(start, end)] index ranges of consecutive crops with the same (H, W), in order."""
    runs, start = [], 0
    for i in range(1, len(crops) + 1):
        if i == len(crops) or crops[i].shape[-2:] != crops[start].shape[-2:]:
            runs.append((start, i))
            start = i
    return runs


class MultiCropBackbone(nn.Module):
    """DINO's MultiCropWrapper minus the head: `forward(crops)` with crops [(B_i, 3, H_i, W_i)] -> (sum B_i, D),
    the rows in input order (crop 0's batch first). Each run of consecutive same-size crops is concatenated and
    goes through the backbone in ONE forward (2 forwards for 2 global + 8 local crops).

    The model (built with num_classes=0 for pretraining, though a classifier model works too: only its pre-logits
    are used) is held as `backbone`, so this module's state dict carries DINO's `backbone.` prefix, which
    engine.models.pretrained strips. `embed_dim` is D: 192 for ViT/CaiT, the last stage width (384) for Swin.
    """

    def __init__(self, backbone: nn.Module, pos_embed_resize: PosEmbedResize = "interpolate"):
        super().__init__()
        _check_backbone(backbone)
        if pos_embed_resize not in POS_EMBED_RESIZES:
            raise ValueError(f"pos_embed_resize: {pos_embed_resize!r} is not 'interpolate' or 'truncate'")
        self.backbone = backbone
        self.embed_dim = backbone.num_features
        self.pos_embed_resize = pos_embed_resize

    def forward(self, crops: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        if not crops:
            raise ValueError("MultiCropBackbone: no crops given")
        outputs = [pooled_features(self.backbone, torch.cat(list(crops[start:end])), self.pos_embed_resize)
                   for start, end in resolution_runs(crops)]
        return torch.cat(outputs)
