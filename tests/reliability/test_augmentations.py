"""Batched augmentations against torchvision, and their random parameters against the reference distributions.

The op-by-op suites (tests/test_transforms_*.py) test every op and policy in depth; this is the item's gate: one
pass over the augmentations a training batch goes through, on odd sizes too, and the samplers' distributions.
"""
import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy import stats

from loaders.transforms.rng import sample_keys


@pytest.mark.parametrize("size", [(32, 32), (31, 33), (7, 5)])
def test_item11_batched_augmentations_equal_torchvision_and_samplers_follow_the_reference(size):
    """Item 11: with the parameters a batch drew, batched crop + flip and the composed uint8 pipeline (crop, flip,
    AutoAugment) equal torchvision per image exactly; the float stages (normalization, the translation/scale
    affine) are within 1/255 of torchvision's. Samplers: mixup's lambda passes a KS test against Beta(a, a), the
    crop offsets a chi-square test against the uniform 0..2p, the flip a binomial test at 1/2."""
    from engine.config import DataConfig
    from loaders.torchvision_loader import augment_one
    from loaders.transforms.basic import normalize, random_crop, random_flip
    from loaders.transforms.mixing import beta_from_keys
    from loaders.transforms.perceptibility import translate_scale, translate_scale_reference
    from loaders.transforms.pipeline import TrainTransform

    h, w = size
    n = 24
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(h * w))
    keys = sample_keys(7, 2, torch.arange(n))
    cropped, offsets = random_crop(x, keys, 4)
    flipped, mask = random_flip(cropped, keys)
    for i in range(n):
        ref = TF.crop(TF.pad(x[i], [4], fill=0), int(offsets[i, 0]), int(offsets[i, 1]), h, w)
        assert torch.equal(flipped[i], TF.hflip(ref) if mask[i] else ref), i

    data = DataConfig(auto_augment="cifar10")
    t = TrainTransform(data, [0.49, 0.48, 0.45], [0.25, 0.24, 0.26], seed=7)
    index = torch.arange(50, 50 + n)
    keys = t.keys(index, 2)
    per_image = torch.stack([augment_one(x[i], keys[i], data) for i in range(n)])
    batch = t(x, torch.zeros(n, dtype=torch.int64), index, epoch=2)
    mean, std = torch.tensor([0.49, 0.48, 0.45]), torch.tensor([0.25, 0.24, 0.26])
    assert torch.equal(batch.images, normalize(per_image, mean, std))       # uint8 stage exact
    ref = torch.stack([TF.normalize(img.float() / 255, mean.tolist(), std.tolist()) for img in per_image])
    assert (batch.images - ref).abs().max() * std.min() <= 1 / 255          # float stage, in pixel units

    xf = per_image.float() / 255
    moved, params = translate_scale(xf, sample_keys(7, 3, torch.arange(n)), "both", fill="faithful")
    assert (moved - translate_scale_reference(xf, params, "both", fill="faithful")).abs().max() <= 1 / 255

    m = 40_000
    many = sample_keys(11, 0, torch.arange(m))
    for alpha in (0.4, 1.0):
        assert stats.kstest(beta_from_keys(many, 8, alpha).numpy(), "beta", args=(alpha, alpha)).pvalue > 1e-3
    _, offs = random_crop(torch.zeros(m, 1, 2, 2, dtype=torch.uint8), many, 4)
    for col in (0, 1):
        assert stats.chisquare(np.bincount(offs[:, col].numpy(), minlength=9)).pvalue > 1e-3
    _, flips = random_flip(torch.zeros(m, 1, 1, 1), many)
    assert stats.binomtest(int(flips.sum()), m, 0.5).pvalue > 1e-3
