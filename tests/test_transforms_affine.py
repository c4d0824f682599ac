"""The perceptibility transform (METHODS.md A) against torchvision's per-image F.affine, bit for bit."""
import numpy as np
import pytest
import torch

from loaders.transforms.perceptibility import (GRID_STEPS, translate_scale, translate_scale_reference,
                                               translate_grid)
from loaders.transforms.rng import sample_keys

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", [(32, 32), (31, 33), (64, 64), (7, 5)])
@pytest.mark.parametrize("kind", ["translate", "scale", "both"])
@pytest.mark.parametrize("fill", ["faithful", "mean"])
def test_equals_torchvision_affine_per_image(device, size, kind, fill):
    h, w = size
    x = torch.randn(48, 3, h, w, generator=torch.Generator().manual_seed(h * w)).to(device)
    keys = sample_keys(3, 1, torch.arange(48, device=device))
    y, params = translate_scale(x, keys, kind, fill=fill)
    ref = translate_scale_reference(x, params, kind, fill=fill)
    assert torch.equal(y, ref)


def test_fill_values_and_params():
    x = torch.zeros(64, 3, 16, 16)
    keys = sample_keys(0, 0, torch.arange(64))
    y, p = translate_scale(x, keys, "translate", fill="faithful")
    # every translation is at least 0.022 * 16 px: some border pixels take the fill, the rest stay 0
    assert set(torch.unique(y).tolist()) == {0.0, 128.0}
    y_mean, _ = translate_scale(x + 1.0, keys, "translate", fill="mean")
    assert set(torch.unique(y_mean).tolist()) == {0.0, 1.0}
    assert p["translate"].shape == (64, 2) and p["translate"].dtype == torch.float32
    assert p["translate_idx"].dtype == torch.int64 and int(p["translate_idx"].max()) <= 9
    grid = torch.from_numpy(translate_grid(0.2)).float()
    assert torch.equal(p["translate"], grid[p["translate_idx"]])
    _, ps = translate_scale(x, keys, "both")
    assert ps["scale"].shape == (64, 1) and set(ps) == {"translate", "translate_idx", "scale", "scale_idx"}


def test_shift_direction_is_positive_right_and_down():
    """A single bright pixel moves by round-to-nearest of (dx*W, dy*H) pixels, like the reference."""
    x = torch.zeros(200, 1, 20, 20)
    x[:, :, 10, 10] = 1.0
    keys = sample_keys(1, 0, torch.arange(200))
    y, p = translate_scale(x, keys, "translate", fill="mean")
    pos = torch.nonzero(y[:, 0] == 1.0)                   # (B, 3): image, row, col
    assert pos.shape[0] == 200
    dy = (pos[:, 1] - 10).float()
    dx = (pos[:, 2] - 10).float()
    assert torch.all((dx - p["translate"][:, 0] * 20).abs() <= 0.5 + 1e-6)
    assert torch.all((dy - p["translate"][:, 1] * 20).abs() <= 0.5 + 1e-6)


def test_grid_indices_uniform_and_independent():
    keys = sample_keys(7, 2, torch.arange(50_000))
    _, p = translate_scale(torch.zeros(50_000, 1, 2, 2), keys, "both")
    for col in (p["translate_idx"][:, 0], p["translate_idx"][:, 1], p["scale_idx"][:, 0]):
        counts = torch.bincount(col, minlength=GRID_STEPS).numpy()
        chi2 = ((counts - 5000) ** 2 / 5000).sum()
        assert chi2 < 30, counts                          # 9 dof: p ~ 4e-4
    joint = torch.bincount(p["translate_idx"][:, 0] * 10 + p["translate_idx"][:, 1], minlength=100).numpy()
    assert ((joint - 500) ** 2 / 500).sum() < 150         # 99 dof
    assert np.corrcoef(p["translate_idx"][:, 0].numpy(), p["scale_idx"][:, 0].numpy())[0, 1] < 0.02


def test_same_keys_same_result_regardless_of_batching():
    x = torch.randn(10, 3, 12, 12)
    keys = sample_keys(5, 3, torch.arange(10))
    whole, _ = translate_scale(x, keys, "both")
    halves = torch.cat([translate_scale(x[:4], keys[:4], "both")[0], translate_scale(x[4:], keys[4:], "both")[0]])
    assert torch.equal(whole, halves)
