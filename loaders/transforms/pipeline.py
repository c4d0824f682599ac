"""The batched augmentation pipeline run on the training device after decoding: uint8 in, `Batch` out.

The loaders call `TrainTransform(images, labels, index, epoch, repeat=None)` on each decoded batch; every random
draw comes from counter-based keys (seed, epoch, sample index, repeat), so results do not depend on batching,
workers or resume. `data` is the run's data config (read by attribute: crop_padding, flip, ...); loaders never
import engine.

The training recipe, in the reference repos' order (SPT_LSA_ViT/main.py: flip, crop, AutoAugment, ToTensor,
Normalize, RandomErasing per image in the DataLoader; then Mixup/CutMix on the batch; then the translation
policy on the mixed batch):
    uint8:  pad-crop (slots 0-1) -> flip (slot 2) -> AutoAugment / RandAugment (slots 8-12 / 16-23); the
            policies' ops by data.auto_augment_impl: the references' PIL port or torchvision's
    float:  normalize -> random erasing (slots 64-464) -> Mixup/CutMix (batch key) -> the auxiliary tasks' batch
            transforms, in order (slots >= 200) -> cast to the model dtype / memory format -> Batch
Crop and flip commute in distribution with each other, so their order among themselves does not matter; erasing
comes before mixing as in the reference (erasing after mixing would erase both mixed images' content at once).
DINO multi-crop views (optional) are cut from the decoded uint8 images before any of the above, into Batch.crops.

Launches: the keys are a few fused hash ops (loaders.transforms.rng), made per batch from the host's epoch number;
everything after them is one body of tensors in, tensors out, which on CUDA is captured as a CUDA graph per batch
shape and replayed (loaders.transforms.captured; data.capture_transform), with outputs bit-equal to the eager call.

Batch transforms: the auxiliary tasks' loader side, built by each task (engine.tasks) and passed in as a list; the
pipeline calls every one alike, `transform(x, keys) -> (views, params)`, on the normalized, mixed float batch x
(B, 3, H, W) with the per-sample keys (B,): `views` {name: (B, 3, H, W)} go into Batch.views (cast to the model's
dtype / layout), `params` {name: (B, ...)} into Batch.params. A transform draws from its own key slots.

Repeated augmentation: an epoch of the plan holds each sample `repeats` times; the loader passes each sample's
repeat number (0..repeats-1) and it is hashed into the keys, so every repeat draws fresh augmentation. Repeat 0
keeps the plain (seed, epoch, index) keys.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from loaders.batch import Batch
from loaders.transforms import autoaugment_reference
from loaders.transforms.autoaugment import auto_augment, rand_augment
from loaders.transforms.captured import CapturedTransform
from loaders.transforms.basic import normalize, random_crop, random_flip
from loaders.transforms.erasing import random_erase
from loaders.transforms.mixing import mix_batch
from loaders.transforms.rng import keys_for, repeat_keys  # noqa: F401  (repeat_keys re-exported)

MIX_VIEW = 0x4D4958          # the batch key's view: separate from every per-sample stream


class EvalTransform:
    """uint8 (B, 3, H, W) -> normalized float in the model's dtype/memory format."""

    def __init__(self, mean, std, dtype: torch.dtype = torch.float32, channels_last: bool = False):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)
        self.dtype = dtype
        self.channels_last = channels_last

    def _stats_on(self, device: torch.device) -> None:
        if self.mean.device != device:
            self.mean, self.std = self.mean.to(device), self.std.to(device)

    def to_model(self, images: torch.Tensor) -> torch.Tensor:
        self._stats_on(images.device)
        return self.layout(normalize(images, self.mean, self.std, self.dtype))

    def layout(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x.contiguous()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int = 0,
                 repeat: Optional[torch.Tensor] = None) -> Batch:
        return Batch(images=self.to_model(images), labels=labels.to(torch.int64), index=index)


class TrainTransform(EvalTransform):
    """The training recipe, batched (see the module docstring for the order).

    data: the data config (attributes crop_padding, flip, auto_augment, auto_augment_impl, rand_augment_ops,
          rand_augment_magnitude, mixup_alpha, cutmix_alpha, mix_prob, erasing_prob, erasing_fill, multicrop, ...;
          missing optional attributes take their defaults).
    mean, std: (3,) dataset statistics, fractions of 255 (the sidecar's).
    seed: run seed (keys are (seed, epoch, index, repeat)).
    num_classes: needed when mixing is on (soft labels (B, num_classes)).
    label_smoothing: folded into the soft labels when mixing is on (the engine's optim.label_smoothing).
    batch_transforms: the auxiliary tasks' batch transforms (module docstring), called in order; () for none.
    """

    def __init__(self, data, mean, std, seed: int, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                 num_classes: int = 0, label_smoothing: float = 0.1, batch_transforms: Sequence = ()):
        super().__init__(mean, std, dtype, channels_last)
        self.data = data
        self.seed = seed
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        self.batch_transforms = list(batch_transforms)
        self.mixing = data.mixup_alpha > 0 or data.cutmix_alpha > 0
        if self.mixing and num_classes <= 0:
            raise ValueError("data.mixup_alpha/cutmix_alpha: mixing needs the number of classes (soft labels)")
        if data.auto_augment not in ("none", "rand", "cifar10", "svhn", "imagenet"):
            raise ValueError(f"data.auto_augment: unknown policy {data.auto_augment!r}")
        self.auto_augment_impl = getattr(data, "auto_augment_impl", "torchvision")
        if self.auto_augment_impl not in ("torchvision", "reference"):
            raise ValueError(f"data.auto_augment_impl: unknown family {self.auto_augment_impl!r} "
                             f"(reference or torchvision)")
        if self.auto_augment_impl == "reference" and data.auto_augment == "rand":
            raise ValueError("data.auto_augment_impl: the references' port has no RandAugment "
                             "(data.auto_augment=rand needs data.auto_augment_impl=torchvision)")
        self.multicrop = None
        if getattr(data, "multicrop", False):
            from loaders.transforms.multicrop import MultiCrop

            self.multicrop = MultiCrop.from_config(data)
        capture = getattr(data, "capture_transform", "auto")
        self._recipe_graphs = CapturedTransform(self._recipe_body, capture)
        self._finish_graphs = CapturedTransform(self._finish_body, capture)

    def keys(self, index: torch.Tensor, epoch: int, repeat: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B,) per-sample keys for `index` (B,) at `epoch`, each repeat of a sample with its own stream."""
        return keys_for(self.seed, epoch, index, 0, repeat)

    def batch_key(self, index: torch.Tensor, epoch: int, repeat: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(1,) key of the whole batch (mixing), from its first sample: the plan fixes which sample that is."""
        return keys_for(self.seed, epoch, index[:1], MIX_VIEW, None if repeat is None else repeat[:1])

    def augment_uint8(self, images: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The per-image uint8 stage: pad-crop, flip, AutoAugment/RandAugment, batched."""
        params: dict[str, torch.Tensor] = {}
        d = self.data
        if d.crop_padding:
            images, params["crop"] = random_crop(images, keys, d.crop_padding, slot=0)
        if d.flip:
            images, params["flip"] = random_flip(images, keys, slot=2)
        if d.auto_augment == "rand":
            images, aa = rand_augment(images, keys, getattr(d, "rand_augment_ops", 2),
                                      getattr(d, "rand_augment_magnitude", 9))
            params["augment_op"] = aa["op"]
        elif d.auto_augment != "none":
            family = autoaugment_reference.auto_augment if self.auto_augment_impl == "reference" else auto_augment
            images, aa = family(images, keys, d.auto_augment)
            params["augment_op"] = aa["op"]
        return images, params

    def _finish_tensors(self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor,
                        batch_key: torch.Tensor, params: dict) -> dict[str, torch.Tensor]:
        """The batch stage (normalize, erase, mix, batch transforms, layout) as a flat dict: 'images', optional
        'soft_labels', 'v_<name>' for each view and 'p_<name>' for each params entry (`params` first, in order)."""
        d = self.data
        x = normalize(images, self.mean, self.std, torch.float32)
        if d.erasing_prob > 0:
            x, params["erase"] = random_erase(x, keys, d.erasing_prob, getattr(d, "erasing_fill", "reference"),
                                              self.mean)
        out: dict[str, torch.Tensor] = {}
        if self.mixing:
            x, out["soft_labels"], mix = mix_batch(x, labels, batch_key, self.num_classes, d.mixup_alpha,
                                                   d.cutmix_alpha, d.mix_prob, 0.5, self.label_smoothing)
            params.update(mix)
        for transform in self.batch_transforms:
            views, tparams = transform(x, keys)
            params.update(tparams)
            out.update({f"v_{name}": self.layout(view) for name, view in views.items()})
        out["images"] = self.layout(x)
        out.update({f"p_{k}": v for k, v in params.items()})
        return out

    def _finish_body(self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor,
                     batch_key: torch.Tensor) -> dict[str, torch.Tensor]:
        return self._finish_tensors(images, labels, keys, batch_key, {})

    def _recipe_body(self, images: torch.Tensor, labels: torch.Tensor, keys: torch.Tensor, batch_key: torch.Tensor,
                     *view_keys: torch.Tensor) -> dict[str, torch.Tensor]:
        """Everything after the keys: multi-crop views ('crop<i>'), the uint8 stage, the batch stage."""
        out: dict[str, torch.Tensor] = {}
        if self.multicrop is not None:
            for i, view in enumerate(self.multicrop.views(images, list(view_keys))):
                out[f"crop{i}"] = self.layout(normalize(view, self.mean, self.std, torch.float32))
        images, params = self.augment_uint8(images, keys)
        out.update(self._finish_tensors(images, labels, keys, batch_key, params))
        return out

    @staticmethod
    def _batch(out: dict[str, torch.Tensor], labels: torch.Tensor, index: torch.Tensor, params: dict,
               crops: Optional[list] = None) -> Batch:
        views = [out[f"crop{i}"] for i in range(sum(k.startswith("crop") for k in out))]
        params = {**params, **{k[2:]: v for k, v in out.items() if k.startswith("p_")}}
        extra = {k[2:]: v for k, v in out.items() if k.startswith("v_")}
        return Batch(images=out["images"], labels=labels, index=index, soft_labels=out.get("soft_labels"),
                     params=params, views=extra, crops=views or crops)

    def finish(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, keys: torch.Tensor,
               batch_key: torch.Tensor, params: Optional[dict] = None, crops: Optional[list] = None) -> Batch:
        """The batch stage on augmented uint8 images: normalize, erase, mix, batch transforms, layout (captured on
        CUDA: loaders.transforms.captured). `params` (the uint8 stage's draws) lead Batch.params."""
        self._stats_on(images.device)
        labels = labels.to(torch.int64)
        return self._batch(self._finish_graphs(images, labels, keys, batch_key), labels, index, params or {}, crops)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, epoch: int = 0,
                 repeat: Optional[torch.Tensor] = None) -> Batch:
        """The whole recipe: the keys (a few fused hash launches), then everything else (captured on CUDA)."""
        self._stats_on(images.device)
        labels = labels.to(torch.int64)
        keys = self.keys(index, epoch, repeat)
        view_keys = [] if self.multicrop is None else self.multicrop.view_keys(self.seed, epoch, index, repeat)
        out = self._recipe_graphs(images, labels, keys, self.batch_key(index, epoch, repeat), *view_keys)
        return self._batch(out, labels, index, {})
