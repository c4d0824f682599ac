"""DINO multi-crop views (METHODS.md part B), batched on uint8 images.

Views per image: 2 global crops (RandomResizedCrop to full size, scale `global_scale`, bicubic) and `local_crops`
local crops (half size, scale `local_scale`); each: flip 0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8
(brightness, contrast, saturation, hue in a random order per image, like torchvision's ColorJitter; sub-batches
per op on the CPU, the sync-free form elsewhere: loaders.transforms.sync_free), grayscale
p 0.2, Gaussian blur with sigma ~ U(0.1, 2) with p 1.0 (global 1), 0.1 (global 2), 0.5 (locals), and solarize
(threshold 128) with p 0.2 on global 2 only.

Definitions are torchvision's tensor ops: crop boxes follow RandomResizedCrop.get_params (10 tries, fallback to
a centre crop), the resize is the antialiased bicubic (a = -0.5) of F.resize(antialias=True) written as two
per-image interpolation matrices (rows (B, h_out, H) @ image @ columns (B, W, w_out)), so every crop of the batch
resizes in two batched matmuls; colour ops equal torchvision.transforms.functional (exact for brightness,
contrast, saturation, grayscale, solarize; <= 1 level for hue, blur and the resize, from float summation order).
The reference DINO code uses PIL (bicubic a = -0.5 as here; PIL's box-blur approximation of the Gaussian differs
slightly from the exact kernel used here).

Each view v has its own keys: sample_keys(seed, epoch, index, view=1 + v), with the repeat number folded in.
Slots per view: 0-39 crop tries, 40 flip, 41 jitter apply, 42-45 jitter factors, 46-49 jitter order,
50 grayscale, 51 blur apply, 52 blur sigma, 53 solarize.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from loaders.transforms.autoaugment import blend, contrast, rgb_to_grayscale, saturation, solarize
from loaders.transforms.rng import keys_for, uniform
from loaders.transforms.sync_free import per_image, use_sync_free

RATIO = (3.0 / 4.0, 4.0 / 3.0)
TRIES = 10


def crop_boxes(keys: torch.Tensor, height: int, width: int, scale: tuple, ratio: tuple = RATIO
               ) -> torch.Tensor:
    """RandomResizedCrop.get_params per key: (B, 4) int64 (top, left, h, w)."""
    u = uniform(keys, 0, 4 * TRIES).to(torch.float64).view(-1, TRIES, 4)
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[..., 1])
    w = torch.round(torch.sqrt(target * aspect)).to(torch.int64)
    h = torch.round(torch.sqrt(target / aspect)).to(torch.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.argmax(ok.to(torch.int8), dim=1, keepdim=True)
    found = ok.gather(1, first)[:, 0]
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]
    top = torch.minimum((u[..., 2].gather(1, first)[:, 0] * (height - h + 1)).to(torch.int64), height - h)
    left = torch.minimum((u[..., 3].gather(1, first)[:, 0] * (width - w + 1)).to(torch.int64), width - w)
    # fallback: the central crop with the ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fh, fw = height, int(round(height * ratio[1]))
    else:
        fw, fh = width, height
    fallback = ((height - fh) // 2, (width - fw) // 2, fh, fw)
    return torch.stack([torch.where(found, v, f) for v, f in zip((top, left, h, w), fallback)], 1)


def _cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def resize_matrix(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """(B, size_out, size_in) float64 antialiased-bicubic weights mapping the span [start, start+length) of an
    axis of size_in pixels onto size_out pixels (PyTorch's _upsample_bicubic2d_aa weights, a = -0.5)."""
    dev = start.device
    scale = length.to(torch.float64) / size_out                                       # (B,)
    support = torch.where(scale >= 1.0, 2.0 * scale, torch.full_like(scale, 2.0))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    i = torch.arange(size_out, device=dev, dtype=torch.float64)
    center = scale[:, None] * (i[None, :] + 0.5)                                      # (B, out)
    xmin = torch.clamp((center - support[:, None] + 0.5).to(torch.int64), min=0)
    xmax = torch.minimum((center + support[:, None] + 0.5).to(torch.int64), length[:, None])
    taps = int(math.ceil(2 * max(float(size_in) / size_out, 1.0) * 2)) + 2
    k = torch.arange(taps, device=dev)
    j = xmin[..., None] + k                                                            # (B, out, taps)
    valid = j < xmax[..., None]
    wts = _cubic((j.to(torch.float64) - center[..., None] + 0.5) * invscale[:, None, None])
    wts = torch.where(valid, wts, torch.zeros_like(wts))
    wts = wts / wts.sum(-1, keepdim=True)
    cols = (start[:, None, None] + j).clamp(max=size_in - 1)
    out = torch.zeros(start.shape[0], size_out, size_in, dtype=torch.float64, device=dev)
    return out.scatter_add_(2, cols, wts)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (B, C, H, W), boxes (B, 4) (top, left, h, w) -> uint8 (B, C, size, size), antialiased bicubic."""
    b, c, h, w = images.shape
    rows = resize_matrix(boxes[:, 0], boxes[:, 2], h, size).to(torch.float32)       # (B, size, H)
    cols = resize_matrix(boxes[:, 1], boxes[:, 3], w, size).to(torch.float32)       # (B, size, W)
    x = images.to(torch.float32)
    out = torch.matmul(torch.matmul(rows[:, None], x), cols[:, None].transpose(-1, -2))
    return out.clamp(0, 255).round().to(torch.uint8)


def _rgb2hsv(img: torch.Tensor) -> torch.Tensor:
    r, g, b = img.unbind(dim=-3)
    maxc = torch.max(img, dim=-3).values
    minc = torch.min(img, dim=-3).values
    eqc = maxc == minc
    cr = maxc - minc
    ones = torch.ones_like(maxc)
    s = cr / torch.where(eqc, ones, maxc)
    cr_divisor = torch.where(eqc, ones, cr)
    rc = (maxc - r) / cr_divisor
    gc = (maxc - g) / cr_divisor
    bc = (maxc - b) / cr_divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return torch.stack((h, s, maxc), dim=-3)


def _hsv2rgb(img: torch.Tensor) -> torch.Tensor:
    h, s, v = img.unbind(dim=-3)
    i = torch.floor(h * 6.0)
    f = (h * 6.0) - i
    i = i.to(dtype=torch.int32)
    p = torch.clamp((v * (1.0 - s)), 0.0, 1.0)
    q = torch.clamp((v * (1.0 - s * f)), 0.0, 1.0)
    t = torch.clamp((v * (1.0 - s * (1.0 - f))), 0.0, 1.0)
    i = i % 6
    mask = i.unsqueeze(dim=-3) == torch.arange(6, device=i.device).view(-1, 1, 1)
    a1 = torch.stack((v, q, p, p, t, v), dim=-3)
    a2 = torch.stack((t, v, v, q, p, p), dim=-3)
    a3 = torch.stack((p, p, t, v, v, q), dim=-3)
    a4 = torch.stack((a1, a2, a3), dim=-4)
    return torch.einsum("...ijk, ...xijk -> ...xjk", mask.to(dtype=img.dtype), a4)


def adjust_hue(images: torch.Tensor, hue: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W), hue (B,) in [-0.5, 0.5]: torchvision's HSV round trip, batched."""
    x = images.to(torch.float32) / 255.0
    hsv = _rgb2hsv(x)
    h, s, v = hsv.unbind(dim=-3)
    h = (h + hue.to(torch.float32).view(-1, 1, 1)) % 1.0
    rgb = _hsv2rgb(torch.stack((h, s, v), dim=-3))
    return rgb.mul(255.0 + 1.0 - 1e-3).to(torch.uint8)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """uint8 (B, C, H, W), sigma (B,) -> blurred uint8; torchvision's kernel (float32, normalized 1-D, outer
    product) and reflect padding, one grouped conv for the whole batch."""
    b, c, h, w = images.shape
    half = (kernel_size - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel_size, dtype=torch.float32, device=images.device)
    pdf = torch.exp(-0.5 * (x[None, :] / sigma.to(torch.float32)[:, None]).pow(2))   # (B, K)
    k1 = pdf / pdf.sum(-1, keepdim=True)
    k2 = k1[:, :, None] * k1[:, None, :]                                              # (B, K, K)
    weight = k2[:, None].expand(b, c, kernel_size, kernel_size).reshape(b * c, 1, kernel_size, kernel_size)
    pad = kernel_size // 2
    xin = F.pad(images.to(torch.float32).reshape(1, b * c, h, w), [pad, pad, pad, pad], mode="reflect")
    out = F.conv2d(xin, weight, groups=b * c).reshape(b, c, h, w)
    return torch.round(out).to(torch.uint8)


def blur_kernel_size(size: int, sigma_max: float = 2.0) -> int:
    """Odd kernel covering +-3 sigma_max, smaller than the image (reflect padding needs pad < size)."""
    k = 2 * math.ceil(3 * sigma_max) + 1
    while k // 2 >= size:
        k -= 2
    return max(k, 1)


class MultiCrop:
    """The DINO view maker: __call__(uint8 (B, 3, H, W), seed, epoch, index, repeat) -> [global_1, global_2,
    local_1..local_n], uint8, (B, 3, global_size, global_size) and (B, 3, local_size, local_size)."""

    def __init__(self, global_size: int, local_size: int, global_scale=(0.7, 1.0), local_scale=(0.2, 0.5),
                 local_crops: int = 8):
        self.global_size, self.local_size = global_size, local_size
        self.global_scale, self.local_scale = tuple(global_scale), tuple(local_scale)
        self.local_crops = local_crops

    @classmethod
    def from_config(cls, data) -> "MultiCrop":
        return cls(data.image_size, data.image_size // 2, data.global_crop_scale, data.local_crop_scale,
                   data.local_crops)

    def view(self, images: torch.Tensor, keys: torch.Tensor, size: int, scale: tuple, blur_p: float,
             solarize_p: float) -> torch.Tensor:
        b, _, h, w = images.shape
        x = resized_crop(images, crop_boxes(keys, h, w, scale), size)
        u = uniform(keys, 40, 14)                                                      # slots 40..53
        x = torch.where((u[:, 0] < 0.5)[:, None, None, None], x.flip(3), x)
        x = color_jitter(x, u[:, 1] < 0.8, u[:, 2:6], u[:, 6:10])
        gray = rgb_to_grayscale(x).expand_as(x)
        x = torch.where((u[:, 10] < 0.2)[:, None, None, None], gray, x)
        if blur_p > 0:
            sigma = 0.1 + 1.9 * u[:, 12].to(torch.float64)
            blurred = gaussian_blur(x, sigma, blur_kernel_size(size))
            x = torch.where((u[:, 11] < blur_p)[:, None, None, None], blurred, x)
        if solarize_p > 0:
            sol = solarize(x, torch.full((b,), 128.0, dtype=torch.float64, device=x.device))
            x = torch.where((u[:, 13] < solarize_p)[:, None, None, None], sol, x)
        return x

    def view_keys(self, seed: int, epoch: int, index: torch.Tensor, repeat: Optional[torch.Tensor] = None
                  ) -> list[torch.Tensor]:
        """The keys (B,) of each view, view v from sample_keys(seed, epoch, index, view=1 + v) + the repeats."""
        return [keys_for(seed, epoch, index, 1 + v, repeat) for v in range(2 + self.local_crops)]

    def views(self, images: torch.Tensor, keys: list[torch.Tensor]) -> list[torch.Tensor]:
        """The views cut with the given per-view keys (view_keys): [global_1, global_2, local_1..local_n]."""
        views = [self.view(images, keys[0], self.global_size, self.global_scale, 1.0, 0.0),
                 self.view(images, keys[1], self.global_size, self.global_scale, 0.1, 0.2)]
        for v in range(self.local_crops):
            views.append(self.view(images, keys[2 + v], self.local_size, self.local_scale, 0.5, 0.0))
        return views

    def __call__(self, images: torch.Tensor, seed: int, epoch: int, index: torch.Tensor,
                 repeat: Optional[torch.Tensor] = None) -> list[torch.Tensor]:
        return self.views(images, self.view_keys(seed, epoch, index, repeat))


@lru_cache(maxsize=8)
def _jitter_ranges(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    lo = torch.tensor([0.6, 0.6, 0.8, -0.1], dtype=torch.float64)
    hi = torch.tensor([1.4, 1.4, 1.2, 0.1], dtype=torch.float64)
    return lo.to(device), hi.to(device)


def jitter_factors(u: torch.Tensor) -> torch.Tensor:
    """(B, 4) uniforms -> (B, 4) float64 brightness U(0.6, 1.4), contrast U(0.6, 1.4), saturation U(0.8, 1.2),
    hue U(-0.1, 0.1) (ColorJitter(0.4, 0.4, 0.2, 0.1))."""
    lo, hi = _jitter_ranges(str(u.device))
    return lo + (hi - lo) * u.to(torch.float64)


def color_jitter(images: torch.Tensor, apply: torch.Tensor, u_factors: torch.Tensor, u_order: torch.Tensor,
                 sync_free: Optional[bool] = None) -> torch.Tensor:
    """ColorJitter on the images where apply (B,) holds; the 4 ops run in the per-image order argsort(u_order).
    sync_free: force the form (None: by device, loaders.transforms.sync_free.use_sync_free)."""
    factors = jitter_factors(u_factors)
    order = torch.argsort(u_order, dim=1)                                               # (B, 4) a permutation
    if use_sync_free(images.device, sync_free):
        return _color_jitter_everywhere(images, apply, factors, order)
    ops = [lambda x, f: blend(x, torch.zeros_like(x), f),
           lambda x, f: contrast(x, f),
           lambda x, f: saturation(x, f),
           lambda x, f: adjust_hue(x, f)]
    x = images
    for position in range(4):
        for op in range(4):
            sel = torch.nonzero(apply & (order[:, position] == op)).flatten()
            if sel.numel():
                x = x.index_copy(0, sel, ops[op](x.index_select(0, sel), factors[sel, op]))
    return x


def _color_jitter_everywhere(images: torch.Tensor, apply: torch.Tensor, factors: torch.Tensor,
                             order: torch.Tensor) -> torch.Tensor:
    """color_jitter's sync-free form. Brightness, contrast and saturation are all blend(x, other, f) with other
    = 0, the grey mean or the grey image, so at each position one blend with the per-image `other` serves the
    three (elementwise: the same bits as each op alone), and the hue shift runs on the whole batch beside it."""
    x = images
    for position in range(4):
        op = order[:, position]                                                        # (B,) 0..3
        f = factors.gather(1, op[:, None])[:, 0]                                       # (B,) float64
        grey = rgb_to_grayscale(x).to(torch.float32)                                   # (B, 1, H, W)
        mean = torch.mean(grey, dim=(-3, -2, -1), keepdim=True)                        # as contrast() takes it
        other = per_image(op == 0, torch.zeros_like(grey), per_image(op == 1, mean.expand_as(grey), grey))
        blended = blend(x, other, f)
        x = per_image(apply & (op == 3), adjust_hue(x, f), per_image(apply & (op < 3), blended, x))
    return x
