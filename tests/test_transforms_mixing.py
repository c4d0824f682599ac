"""Mixup/CutMix (timm Mixup, mode 'batch') and random erasing (the reference's) against plain references."""
import numpy as np
import pytest
import torch
from scipy import stats

from loaders.transforms.erasing import erase_params, random_erase, random_erase_reference
from loaders.transforms.mixing import beta_from_keys, mix_batch, mix_params, smooth_one_hot
from loaders.transforms.rng import sample_keys


def _keys(n, seed=0):
    return sample_keys(seed, 0, torch.arange(n))


def test_beta_draws_follow_beta_distribution():
    keys = _keys(40_000)
    for alpha in (1.0, 0.4, 2.0):
        lam = beta_from_keys(keys, 8, alpha).numpy()
        assert stats.kstest(lam, "beta", args=(alpha, alpha)).pvalue > 1e-3, alpha
        assert np.all((lam >= 0) & (lam <= 1))


def test_mix_choice_frequencies_and_lambda_distribution():
    n = 40_000
    p = mix_params(_keys(n, 1), 32, 32, mixup_alpha=1.0, cutmix_alpha=1.0, prob=0.5, switch_prob=0.5)
    kind = p["kind"].numpy()
    freq = np.bincount(kind, minlength=3) / n
    assert np.allclose(freq, [0.5, 0.25, 0.25], atol=0.01)
    assert np.all(p["lam"].numpy()[kind == 0] == 1.0)
    mix_lam = p["lam"].numpy()[kind == 1]
    assert stats.kstest(mix_lam, "uniform").pvalue > 1e-3                   # Beta(1, 1)
    box = p["box"].numpy()[kind == 2]
    area = (box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])
    assert np.allclose(p["lam"].numpy()[kind == 2], 1 - area / 1024)          # lam corrected to the pasted area
    assert np.all(box[:, 0] <= box[:, 1]) and np.all(box[:, 1] <= 32)


def _timm_reference(x, y, kind, lam, box, num_classes, smoothing):
    """timm Mixup._mix_batch + mixup_target with our drawn (kind, lam, box)."""
    x = x.clone()
    if kind == 2:
        t, b, l, r = box
        x[:, :, t:b, l:r] = x.flip(0)[:, :, t:b, l:r]
    elif kind == 1:
        x_flipped = x.flip(0).mul_(1.0 - lam)
        x.mul_(lam).add_(x_flipped)
    off = smoothing / num_classes
    y1 = torch.full((len(y), num_classes), off).scatter_(1, y[:, None], 1 - smoothing + off)
    y2 = torch.full((len(y), num_classes), off).scatter_(1, y.flip(0)[:, None], 1 - smoothing + off)
    return x, y1 * lam + y2 * (1.0 - lam)


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (6, 3, 31, 33), (4, 3, 64, 64)])
def test_mix_batch_equals_timm_on_drawn_params(shape):
    seen = set()
    for step in range(40):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(step))
        y = torch.randint(0, 10, (shape[0],), generator=torch.Generator().manual_seed(step + 100))
        key = sample_keys(0, 0, torch.tensor([step]), view=77)
        out, soft, p = mix_batch(x, y, key, 10, 1.0, 1.0, 0.5, 0.5, 0.1)
        kind, lam = int(p["mix_kind"][0]), float(p["mix_lam"][0])
        lam64 = float(mix_params(key, shape[2], shape[3], 1.0, 1.0, 0.5)["lam"][0])
        ref_x, ref_y = _timm_reference(x, y, kind, lam64, p["mix_box"][0].tolist(), 10, 0.1)
        assert torch.equal(out, ref_x)
        assert torch.allclose(soft, ref_y, atol=1e-6) and torch.allclose(soft.sum(1), torch.ones(shape[0]))
        seen.add(kind)
        assert abs(lam - lam64) < 1e-6
    assert seen == {0, 1, 2}


def test_smooth_one_hot():
    y = smooth_one_hot(torch.tensor([2, 0]), 4, 0.1)
    assert torch.allclose(y[0], torch.tensor([0.025, 0.025, 0.925, 0.025]))


@pytest.mark.parametrize("size", [(32, 32), (31, 33), (64, 64)])
def test_erasing_matches_reference_fill_and_box_rules(size):
    h, w = size
    n = 8_000
    keys = _keys(n, 2)
    boxes = erase_params(keys, h, w, p=0.25)
    erased = boxes[:, 2] > 0
    assert abs(erased.double().mean().item() - 0.25) < 0.015
    b = boxes[erased]
    assert torch.all(b[:, 2] < h) and torch.all(b[:, 3] < w)
    assert torch.all(b[:, 0] + b[:, 2] <= h) and torch.all(b[:, 1] + b[:, 3] <= w)
    area = (b[:, 2] * b[:, 3]).double() / (h * w)
    assert area.min() >= 0.01 and area.max() <= 0.45
    # the top offset is uniform over {0..H-h}: (top + V) / (H-h+1) with V ~ U(0, 1) is then exactly U(0, 1)
    jitter = torch.from_numpy(np.random.default_rng(0).random(len(b)))
    frac = (b[:, 0].double() + jitter) / (h - b[:, 2] + 1).double()
    assert stats.kstest(frac.numpy(), "uniform").pvalue > 1e-4
    x = torch.randn(64, 3, h, w)
    mean = [0.4914, 0.4822, 0.4465]
    y, bx = random_erase(x, keys[:64], 0.25, "reference", mean)
    ref = torch.stack([random_erase_reference(x[i], bx[i].tolist(), mean) for i in range(64)])
    assert torch.equal(y, ref)
    yc, _ = random_erase(x, keys[:64], 0.25, "const")
    assert torch.equal(yc, torch.stack([random_erase_reference(x[i], bx[i].tolist(), [0.0] * 3) for i in range(64)]))


def test_erasing_pixel_mode_is_normal_noise():
    x = torch.zeros(400, 3, 32, 32)
    y, boxes = random_erase(x, _keys(400, 3), 1.0, "pixel")
    noise = y[y != 0]
    assert noise.numel() > 10_000
    assert abs(noise.mean().item()) < 0.05 and abs(noise.std().item() - 1) < 0.05
