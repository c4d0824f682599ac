"""The one batch contract every loader yields (ffcv, dali, resident, torchvision).

All tensors live on the training device. Units:
- images: (B, 3, H, W) float, normalized with the dataset's mean/std from the sidecar, in the model's dtype and
  memory format (channels_last on CUDA).
- labels: (B,) int64 class indices, always the original (unmixed) labels.
- soft_labels: (B, num_classes) float, set when mixup/cutmix mixed the batch (rows sum to 1), else None. They
  already carry label smoothing (timm semantics), so the class loss on them is the plain soft-target CE.
- index: (B,) int64 positions of the samples in the dataset (before repeats), for exact-once checks and resume.
- params: the random draws of the augmentation, each (B, ...) on the device: the uint8 and mixing stages' (crop,
  flip, ...) and those an auxiliary task's batch transform records as its targets (named in its own module).
- views: {name: (B, 3, H, W)} extra views of the images that the auxiliary tasks' batch transforms made (in the
  images' dtype and layout); empty when no task asks for one. The tasks name the views they read.
- crops: multi-crop views for self-supervised pretraining: [global_1, global_2, local_1..local_n], each
  (B, 3, h, w); None unless asked for.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    soft_labels: Optional[torch.Tensor] = None
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    views: dict[str, torch.Tensor] = field(default_factory=dict)
    crops: Optional[list[torch.Tensor]] = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def targets(self) -> torch.Tensor:
        """What the class loss compares with: soft labels after mixing, else the int labels."""
        return self.soft_labels if self.soft_labels is not None else self.labels
