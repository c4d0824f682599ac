"""DINO multi-crop views: crop boxes, resize and colour ops against torchvision with fixed parameters."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from scipy import stats
from torchvision.transforms import InterpolationMode

from engine.config import DataConfig
from loaders.transforms.autoaugment import contrast, rgb_to_grayscale, saturation, solarize
from loaders.transforms.multicrop import (MultiCrop, adjust_hue, blend, blur_kernel_size, color_jitter, crop_boxes,
                                          gaussian_blur, jitter_factors, resized_crop)
from loaders.transforms.pipeline import TrainTransform
from loaders.transforms.rng import sample_keys

SIZES = [((32, 32), 32, (0.7, 1.0)), ((32, 32), 16, (0.2, 0.5)), ((31, 33), 16, (0.2, 0.5)),
         ((64, 64), 64, (0.5, 1.0)), ((64, 64), 32, (0.2, 0.4))]


def _images(n, h, w, seed=0):
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape,size,scale", SIZES)
def test_resized_crop_equals_torchvision(shape, size, scale):
    h, w = shape
    x = _images(24, h, w)
    boxes = crop_boxes(sample_keys(0, 0, torch.arange(24)), h, w, scale)
    y = resized_crop(x, boxes, size)
    ref = torch.stack([TF.resized_crop(x[i], *boxes[i].tolist(), [size, size], InterpolationMode.BICUBIC,
                                       antialias=True) for i in range(24)])
    diff = (y.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 1e-3          # float summation order only


@pytest.mark.parametrize("shape,scale", [((32, 32), (0.7, 1.0)), ((31, 33), (0.2, 0.5)), ((64, 64), (0.5, 1.0))])
def test_crop_boxes_follow_random_resized_crop(shape, scale):
    h, w = shape
    n = 20_000
    boxes = crop_boxes(sample_keys(1, 0, torch.arange(n)), h, w, scale).double()
    top, left, bh, bw = boxes.unbind(1)
    assert torch.all((top >= 0) & (left >= 0) & (top + bh <= h) & (left + bw <= w))
    area = bh * bw / (h * w)
    assert area.min() >= scale[0] * 0.85 and area.max() <= scale[1] * 1.0 + 0.1
    aspect = bw / bh
    assert aspect.min() >= 0.6 and aspect.max() <= 1.6
    # torchvision draws the same way: compare the area distribution with torchvision's own get_params
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    ref = np.array([np.prod(RandomResizedCrop.get_params(img, list(scale), [3 / 4, 4 / 3])[2:]) / (h * w)
                    for _ in range(4000)])
    assert stats.ks_2samp(area.numpy(), ref).pvalue > 1e-3
    ok = bh < h
    # offsets uniform over {0..H-h}: (top + V) / (H-h+1) with V ~ U(0, 1) is then exactly U(0, 1)
    jitter = torch.from_numpy(np.random.default_rng(0).random(int(ok.sum())))
    frac = (top[ok] + jitter) / (h - bh[ok] + 1)
    assert stats.kstest(frac.numpy(), "uniform").pvalue > 1e-4


def test_colour_ops_equal_torchvision():
    x = _images(16, 31, 33, seed=2)
    f = torch.linspace(0.6, 1.4, 16, dtype=torch.float64)
    for ours, theirs in ((lambda a, k: blend(a, torch.zeros_like(a), k), TF.adjust_brightness),
                         (contrast, TF.adjust_contrast), (saturation, TF.adjust_saturation)):
        ref = torch.stack([theirs(x[i], float(f[i])) for i in range(16)])
        assert torch.equal(ours(x, f), ref)
    hue = torch.linspace(-0.1, 0.1, 16, dtype=torch.float64)
    assert torch.equal(adjust_hue(x, hue), torch.stack([TF.adjust_hue(x[i], float(hue[i])) for i in range(16)]))
    assert torch.equal(rgb_to_grayscale(x).expand_as(x), TF.rgb_to_grayscale(x, 3))
    assert torch.equal(solarize(x, torch.full((16,), 128.0, dtype=torch.float64)), TF.solarize(x, 128))
    sig = torch.linspace(0.1, 2.0, 16, dtype=torch.float64)
    for size in (16, 32):
        k = blur_kernel_size(size)
        xs = _images(16, size, size, seed=3)
        ref = torch.stack([TF.gaussian_blur(xs[i], [k, k], [float(sig[i])] * 2) for i in range(16)])
        assert (gaussian_blur(xs, sig, k).int() - ref.int()).abs().max() <= 1


@pytest.mark.parametrize("sync_free", [False, True])
def test_color_jitter_order_and_factors_match_torchvision_sequence(sync_free):
    x = _images(32, 16, 16, seed=4)
    u = torch.rand(32, 4, generator=torch.Generator().manual_seed(5))
    order_u = torch.rand(32, 4, generator=torch.Generator().manual_seed(6))
    apply = torch.rand(32, generator=torch.Generator().manual_seed(7)) < 0.8
    y = color_jitter(x, apply, u, order_u, sync_free=sync_free)
    fac = jitter_factors(u)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(32):
        ref = x[i]
        if apply[i]:
            for op in torch.argsort(order_u[i]).tolist():
                ref = fns[op](ref, float(fac[i, op]))
        assert torch.equal(y[i], ref)


def test_multicrop_views_shapes_probabilities_and_pipeline():
    mc = MultiCrop(32, 16)
    x = _images(8, 32, 32, seed=8)
    views = mc(x, 0, 0, torch.arange(8))
    assert len(views) == 10
    assert [tuple(v.shape[-2:]) for v in views] == [(32, 32)] * 2 + [(16, 16)] * 8
    again = mc(x, 0, 0, torch.arange(8))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    assert not torch.equal(views[0], views[1])
    data = DataConfig(multicrop=True)
    t = TrainTransform(data, [0.5] * 3, [0.25] * 3, seed=0)
    batch = t(x, torch.zeros(8, dtype=torch.int64), torch.arange(8))
    assert len(batch.crops) == 10 and batch.crops[2].dtype == torch.float32
    # grayscale rate of the views: about 0.2 (jitter can't make all channels equal)
    many = _images(4000, 8, 8, seed=9)
    g = MultiCrop(8, 4, local_crops=0)(many, 3, 0, torch.arange(4000))[0]
    is_gray = (g[:, 0] == g[:, 1]).all((1, 2)) & (g[:, 1] == g[:, 2]).all((1, 2))
    assert abs(is_gray.double().mean().item() - 0.2) < 0.03
