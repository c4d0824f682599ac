"""The translation / scale perceptibility transform T (METHODS.md part A), batched.

Per image: dx, dy drawn independently from the 10 values linspace(-m, m, 10) (fractions of width/height) and/or
s from linspace(s_min, s_max, 10); the image is warped exactly as the reference does with
torchvision.transforms.functional.affine(img, angle=0, translate=(dx*W, dy*H), scale=s, shear=0,
interpolation=NEAREST, fill=fill): translate by (dx*W, dy*H) pixels (not rounded) and scale about the centre,
nearest sampling, outside pixels = fill. It runs on float images after normalization and mixing; the
reference's fill 128.0 lands in normalized space (far outside the data: a quirk kept as the faithful default);
`fill='mean'` uses 0.0, the dataset mean after normalization.

The grids are numpy linspace values (as the reference builds them); the warp matrices come from a table of all
10 x 10 x 10 (dx, dy, s) combinations computed once per image size in Python doubles, like torchvision.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from loaders.transforms.affine import inverse_affine_matrix, theta_table, warp_nearest
from loaders.transforms.rng import randint

GRID_STEPS = 10
SLOT_TRANSLATE = 200   # slots 200, 201: dx, dy grid indices
SLOT_SCALE = 202       # slot 202: scale grid index
FAITHFUL_FILL = 128.0


def translate_grid(max_shift: float) -> np.ndarray:
    """(10,) float64 dx/dy values: linspace(-m, m, 10), fractions of width/height."""
    return np.linspace(-max_shift, max_shift, GRID_STEPS)


def scale_grid(scale_min: float, scale_max: float) -> np.ndarray:
    """(10,) float64 scale factors: linspace(s_min, s_max, 10)."""
    return np.linspace(scale_min, scale_max, GRID_STEPS)


@lru_cache(maxsize=32)
def _thetas(height: int, width: int, shifts: tuple, scales: tuple, device: str) -> torch.Tensor:
    """All (dx, dy, s) inverse matrices (K, 2, 3) float32 on `device`, index (ix * n + iy) * n_scale + isc."""
    return theta_table([inverse_affine_matrix([0.0, 0.0], 0.0, [dx * width, dy * height], s, [0.0, 0.0])
                        for dx in shifts for dy in shifts for s in scales], device)


@lru_cache(maxsize=32)
def _grid_on(values: tuple, device: str) -> torch.Tensor:
    """(10,) float32 grid values on the device, made once (a host copy per batch otherwise)."""
    return torch.tensor(values, dtype=torch.float64).to(device, torch.float32)


def fill_value(fill: str | float) -> float:
    """'faithful' -> 128.0 (the reference), 'mean' -> 0.0 (the dataset mean in normalized space), or a number."""
    if fill == "faithful":
        return FAITHFUL_FILL
    if fill == "mean":
        return 0.0
    return float(fill)


def translate_scale(images: torch.Tensor, keys: torch.Tensor, kind: str = "translate", max_shift: float = 0.2,
                    scale_min: float = 0.5, scale_max: float = 1.5, fill: str | float = "faithful"
                    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """images (B, C, H, W) float (normalized) -> (T(images) (B, C, H, W), params).

    kind: 'translate' (dx, dy; s = 1), 'scale' (s; dx = dy = 0) or 'both'. params, on the images' device:
      'translate' (B, 2) float32 fractions dx, dy and 'translate_idx' (B, 2) int64 0..9   (translate, both)
      'scale' (B, 1) float32 and 'scale_idx' (B, 1) int64 0..9                              (scale, both)
    Targets for the auxiliary head are idx / 9.
    """
    if kind not in ("translate", "scale", "both"):
        raise ValueError(f"tasks.perceptibility.kind: expected translate, scale or both, got {kind!r}")
    b, _, h, w = images.shape
    dev = images.device
    params: dict[str, torch.Tensor] = {}
    shifts, scales = translate_grid(max_shift), scale_grid(scale_min, scale_max)
    if kind in ("translate", "both"):
        t_idx = randint(keys, SLOT_TRANSLATE, GRID_STEPS, n=2)                    # (B, 2)
        params["translate"] = _grid_on(tuple(shifts), str(dev))[t_idx]
        params["translate_idx"] = t_idx
        shift_values: tuple = tuple(shifts)
    else:
        t_idx = torch.zeros(b, 2, dtype=torch.int64, device=dev)
        shift_values = (0.0,)
    if kind in ("scale", "both"):
        s_idx = randint(keys, SLOT_SCALE, GRID_STEPS, n=1)                        # (B, 1)
        params["scale"] = _grid_on(tuple(scales), str(dev))[s_idx]
        params["scale_idx"] = s_idx
        scale_values: tuple = tuple(scales)
    else:
        s_idx = torch.zeros(b, 1, dtype=torch.int64, device=dev)
        scale_values = (1.0,)
    table = _thetas(h, w, shift_values, scale_values, str(dev))                     # (K, 2, 3)
    n_shift, n_scale = len(shift_values), len(scale_values)
    combo = (t_idx[:, 0] * n_shift + t_idx[:, 1]) * n_scale + s_idx[:, 0]
    return warp_nearest(images, table[combo], fill=fill_value(fill)), params


def translate_scale_reference(images: torch.Tensor, params: dict[str, torch.Tensor], kind: str,
                              max_shift: float = 0.2, scale_min: float = 0.5, scale_max: float = 1.5,
                              fill: str | float = "faithful") -> torch.Tensor:
    """The reference's per-image loop (torchvision F.affine per image) on given params: for tests and bench."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    shifts, scales = translate_grid(max_shift), scale_grid(scale_min, scale_max)
    out = []
    for i in range(images.shape[0]):
        dx = dy = 0.0
        s = 1.0
        if kind in ("translate", "both"):
            ix, iy = params["translate_idx"][i].tolist()
            dx, dy = shifts[ix], shifts[iy]
        if kind in ("scale", "both"):
            s = float(scales[int(params["scale_idx"][i, 0])])
        out.append(TF.affine(images[i], angle=0.0, translate=[dx * images.shape[-1], dy * images.shape[-2]],
                             scale=s, shear=[0.0, 0.0], interpolation=InterpolationMode.NEAREST,
                             fill=[fill_value(fill)] * images.shape[1]))
    return torch.stack(out) if out else images.clone()


VIEW = "transformed"   # the Batch.views entry T(x) goes into


class PerceptibilityTransform:
    """The pipeline's batch transform for translation / scale perceptibility (loaders.transforms.pipeline):
    T(x) of the normalized, mixed batch into Batch.views['transformed'], its draws into Batch.params
    ('translate', 'translate_idx', 'scale', 'scale_idx' as translate_scale() returns them).

    kind, max_shift, scale_min, scale_max, fill: as translate_scale() takes them (the task's config keys)."""

    def __init__(self, kind: str = "translate", max_shift: float = 0.2, scale_min: float = 0.5,
                 scale_max: float = 1.5, fill: str | float = "faithful"):
        self.kind, self.max_shift, self.fill = kind, max_shift, fill
        self.scale_min, self.scale_max = scale_min, scale_max

    @classmethod
    def from_config(cls, cfg) -> "PerceptibilityTransform":
        """From a config read by attribute (kind, max_shift, scale_min, scale_max, fill)."""
        return cls(cfg.kind, cfg.max_shift, cfg.scale_min, cfg.scale_max, cfg.fill)

    def __call__(self, images: torch.Tensor, keys: torch.Tensor
                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """images (B, C, H, W) float, keys (B,) -> ({'transformed': T(images)}, params)."""
        moved, params = translate_scale(images, keys, self.kind, self.max_shift, self.scale_min, self.scale_max,
                                        self.fill)
        return {VIEW: moved}, params
