"""Pad-crop, flip and the composed training pipeline against per-image references; their statistics."""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF

from engine.config import DataConfig
from loaders.transforms.perceptibility import PerceptibilityTransform
from loaders.transforms.basic import normalize, random_crop, random_flip
from loaders.transforms.pipeline import TrainTransform
from loaders.transforms.rng import sample_keys
from loaders.torchvision_loader import augment_one

SIZES = [(32, 32), (31, 33), (64, 64)]


@pytest.mark.parametrize("size", SIZES)
def test_crop_and_flip_equal_torchvision_per_image(size):
    h, w = size
    x = torch.randint(0, 256, (20, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h))
    keys = sample_keys(0, 1, torch.arange(20))
    cropped, offsets = random_crop(x, keys, 4)
    flipped, mask = random_flip(cropped, keys)
    for i in range(20):
        ref = TF.crop(TF.pad(x[i], [4], fill=0), int(offsets[i, 0]), int(offsets[i, 1]), h, w)
        assert torch.equal(cropped[i], ref)
        assert torch.equal(flipped[i], TF.hflip(ref) if mask[i] else ref)


def test_flip_rate_and_crop_offsets_uniform():
    n = 50_000
    keys = sample_keys(4, 0, torch.arange(n))
    _, mask = random_flip(torch.zeros(n, 1, 1, 1), keys)
    assert abs(mask.double().mean().item() - 0.5) < 0.01
    _, offsets = random_crop(torch.zeros(n, 1, 2, 2), keys, 4)
    for col in (0, 1):
        counts = np.bincount(offsets[:, col].numpy(), minlength=9)
        assert len(counts) == 9
        assert ((counts - n / 9) ** 2 / (n / 9)).sum() < 30       # 8 dof
    # flip and crop independent
    assert abs(np.corrcoef(mask.numpy(), offsets[:, 1].numpy())[0, 1]) < 0.02


def test_composed_pipeline_equals_per_image_reference():
    """uint8 stage batched == per-image torchvision (augment_one); then normalize/erase/mix/perceptibility."""
    data = DataConfig(auto_augment="cifar10", erasing_prob=0.25, mixup_alpha=1.0, cutmix_alpha=1.0)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    perc = PerceptibilityTransform(kind="both", fill="mean")
    t = TrainTransform(data, mean, std, seed=3, num_classes=10, batch_transforms=[perc])
    x = torch.randint(0, 256, (16, 3, 31, 33), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 10, (16,))
    index = torch.arange(100, 116)
    batch = t(x, labels, index, epoch=2)
    keys = t.keys(index, 2)
    per_image = torch.stack([augment_one(x[i], keys[i], data) for i in range(16)])
    ref = t.finish(per_image, labels, index, keys, t.batch_key(index, 2), {})
    assert torch.equal(batch.images, ref.images)
    assert torch.equal(batch.views["transformed"], ref.views["transformed"])
    assert torch.equal(batch.soft_labels, ref.soft_labels)
    assert batch.params["scale_idx"].shape == (16, 1)
    # with nothing random after normalization, the images are just the normalized augmented pixels
    plain = TrainTransform(DataConfig(auto_augment="cifar10"), mean, std, seed=3)(x, labels, index, epoch=2)
    assert torch.equal(plain.images, normalize(per_image, torch.tensor(mean), torch.tensor(std)))


def test_dtype_and_channels_last():
    t = TrainTransform(DataConfig(), [0.5] * 3, [0.25] * 3, seed=0, dtype=torch.bfloat16, channels_last=True,
                       batch_transforms=[PerceptibilityTransform()])
    b = t(torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8), torch.zeros(4, dtype=torch.int64), torch.arange(4))
    assert b.images.dtype == torch.bfloat16 and b.images.is_contiguous(memory_format=torch.channels_last)
    assert b.views["transformed"].dtype == torch.bfloat16
