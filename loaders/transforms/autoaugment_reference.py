"""AutoAugment as the reference repositories run it (the PIL port), batched on uint8 images on the device.

B (vits-for-small-scale-datasets) and D (SPT_LSA_ViT), and A through its copies of both, build CIFAR10Policy /
SVHNPolicy / ImageNetPolicy from their utils/autoaug.py: the widely copied DeepVoltaire port, whose ops are PIL calls
(utils/transforms.py). Its sub-policy tables (ops, probabilities, magnitude bins) are the paper's, the same as
torchvision's (loaders.transforms.autoaugment.POLICIES); its ops and magnitudes are not:

    op                 the reference (PIL)                                       torchvision's family
    ShearX/Y           affine about the top-left corner, BICUBIC, fill 128       nearest, fill 0
    TranslateX/Y       m * W (or H) pixels unrounded, NEAREST (source            int(m * W) pixels, fill 0
                       floor(x + t + 0.5)), fill 128
    Rotate             counter-clockwise only (no random sign), NEAREST in       random sign, fill 0
                       16.16 fixed point, fill 128
    Solarize           thresholds linspace(256, 0, 10) (bin 0 inverts nothing)   linspace(255, 0, 10)
    Brightness, Color, ImageEnhance: PIL's blend in float32, truncated; the      torchvision's blend and grey
    Contrast,          grey is ITU-R 601 in 16-bit fixed point, rounded;         (float weights, truncated)
    Sharpness          contrast's mean is rounded to an integer; SMOOTH is
                       PIL's 3x3 filter in float32
    AutoContrast       PIL's lookup table in doubles: int(v * scale + offset)    float32 (v - lo) * scale
    Posterize, Equalize, Invert: the same in both (torchvision reproduces PIL's)
    apply rule         random.random() < p                                       u <= p

Every op here repeats PIL's computation in the same arithmetic (integers where PIL uses integers, float32 where it
uses float, float64 where it uses double, the operations in its order), so the results equal the reference's pixel
for pixel (tests/test_transforms_autoaugment_reference.py, against PIL and against vectors made by running the
reference module). Magnitudes are np.linspace values, as the reference computes them.

Batching and random slots are those of loaders.transforms.autoaugment (dispatch_ops: sub-batches on the CPU, one
sync-free pass elsewhere; slots 8 sub-policy, 9-10 apply draws, 11-12 signs). The five geometric ops become
per-size tables of source taps (PIL's sampling positions, computed once per image size): the sync-free form
resamples every image by its own table row in one pass.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import numpy as np
import torch

from loaders.transforms.autoaugment import (GEOMETRIC_OPS, OP_INDEX, OP_NAMES, dispatch_ops, equalize, invert,
                                            policy_draws, policy_params, posterize, stage_ops)

FILL = 128                                    # the reference's fillcolor (128, 128, 128), Rotate's grey too
SIGNED_OPS = frozenset({"ShearX", "ShearY", "TranslateX", "TranslateY", "Color", "Contrast", "Sharpness",
                        "Brightness"})        # random.choice([-1, 1]) in the op; Rotate has none
ENHANCE_OPS = ("Brightness", "Color", "Contrast", "Sharpness")
CUBIC_OPS = ("ShearX", "ShearY")


# ----------------------------------------------------------------------------------------- magnitude tables
@lru_cache(maxsize=1)
def ranges() -> dict[str, tuple[float, ...]]:
    """op -> its 10 magnitudes, SubPolicy's `ranges` (np.linspace in float64; the ops without one: 0)."""
    def lin(start: float, stop: float) -> tuple[float, ...]:
        return tuple(float(v) for v in np.linspace(start, stop, 10))

    return {
        "Identity": (0.0,) * 10, "ShearX": lin(0, 0.3), "ShearY": lin(0, 0.3),
        "TranslateX": lin(0, 150 / 331), "TranslateY": lin(0, 150 / 331), "Rotate": lin(0, 30),
        "Color": lin(0.0, 0.9), "Contrast": lin(0.0, 0.9), "Sharpness": lin(0.0, 0.9), "Brightness": lin(0.0, 0.9),
        "Posterize": tuple(float(v) for v in np.round(np.linspace(8, 4, 10), 0).astype(int)),
        "Solarize": lin(256, 0), "AutoContrast": (0.0,) * 10, "Equalize": (0.0,) * 10, "Invert": (0.0,) * 10,
    }


def signed_values(op: str) -> tuple[float, ...]:
    """The table a magnitude index points into: bins 0..9, then 10..19 negated (the ops of SIGNED_OPS)."""
    values = ranges()[op]
    return values + (tuple(-v for v in values) if op in SIGNED_OPS else ())


@lru_cache(maxsize=64)
def _op_table(op: str, device: str) -> torch.Tensor:
    """Per magnitude index, what the op takes: the enhance factor float32(1 + m) (Image.blend's alpha is a C
    float), Posterize's bits (int64), Solarize's first inverted value ceil(threshold) (int16: i < t <=> i < ceil t)."""
    values = signed_values(op)
    if op in ENHANCE_OPS:
        return torch.tensor([1.0 + v for v in values], dtype=torch.float64).to(torch.float32).to(device)
    if op == "Posterize":
        return torch.tensor([int(v) for v in values], dtype=torch.int64).to(device)
    if op == "Solarize":
        return torch.tensor([math.ceil(v) for v in values], dtype=torch.int16).to(device)
    raise ValueError(op)


# ------------------------------------------------------------------------------------------ enhance, PIL's
def pil_blend(degenerate: torch.Tensor, images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Image.blend(degenerate, image, alpha) (ImagingBlend): uint8(clip(in1 + alpha * (in2 - in1))) in float32,
    truncated. degenerate, images uint8 (b, C, H, W) (degenerate may broadcast); alpha (b,) float32."""
    diff = (images.to(torch.int16) - degenerate.to(torch.int16)).to(torch.float32)
    out = degenerate.to(torch.float32) + alpha.view(-1, 1, 1, 1) * diff
    return out.clamp(0, 255).to(torch.uint8)


def pil_grey(images: torch.Tensor) -> torch.Tensor:
    """convert('L'): (R*19595 + G*38470 + B*7471 + 0x8000) >> 16, uint8 (b, 3, H, W) -> int32 (b, 1, H, W)."""
    r, g, b = images.to(torch.int32).unbind(dim=-3)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(-3)


def color(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Color: blend with the image's grey (convert('L').convert('RGB'))."""
    return pil_blend(pil_grey(images).to(torch.uint8), images, alpha)


def contrast(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Contrast: blend with a flat image at int(mean(grey) + 0.5) (ImageStat: sum / count, doubles)."""
    h, w = images.shape[-2:]
    total = pil_grey(images).sum(dim=(-3, -2, -1), keepdim=True, dtype=torch.int64).to(torch.float64)
    mean = torch.floor(torch.div(total, torch.full_like(total, float(h * w))) + 0.5)     # a true division
    return pil_blend(mean.to(torch.uint8), images, alpha)


def brightness(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Brightness: blend with black."""
    return pil_blend(torch.zeros_like(images[:, :1]), images, alpha)


@lru_cache(maxsize=8)
def _smooth_weights(device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ImageFilter.SMOOTH's weights as ImagingFilter holds them, float32(1) / 13 and float32(5) / 13, and its
    rounding offset 0.5 (0-dim float32 each)."""
    one, five, thirteen = (torch.tensor(v, dtype=torch.float32) for v in (1.0, 5.0, 13.0))
    return (one / thirteen).to(device), (five / thirteen).to(device), torch.tensor(0.5).to(device)


def smooth(images: torch.Tensor) -> torch.Tensor:
    """image.filter(ImageFilter.SMOOTH) (ImagingFilter3x3): kernel rows y+1, y, y-1 summed into 0.5 in float32 in
    PIL's order, clipped and truncated; the border rows and columns copied. Images under 3 pixels: a copy."""
    h, w = images.shape[-2:]
    if h < 3 or w < 3:
        return images
    k1, k5, half = _smooth_weights(str(images.device))
    f = images.to(torch.float32)

    def row(rows: torch.Tensor, centre: torch.Tensor) -> torch.Tensor:       # KERNEL1x3 over the interior columns
        return (rows[..., :-2] * k1 + rows[..., 1:-1] * centre) + rows[..., 2:] * k1

    ss = half + row(f[..., 2:, :], k1)
    ss = ss + row(f[..., 1:-1, :], k5)
    ss = ss + row(f[..., :-2, :], k1)
    out = images.clone()
    out[..., 1:-1, 1:-1] = ss.clamp(0, 255).to(torch.uint8)
    return out


def sharpness(images: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """ImageEnhance.Sharpness: blend with the SMOOTH-filtered image."""
    return pil_blend(smooth(images), images, alpha)


def solarize(images: torch.Tensor, first_inverted: torch.Tensor) -> torch.Tensor:
    """ImageOps.solarize: values >= threshold inverted; first_inverted (b,) = ceil(threshold), up to 256."""
    return torch.where(images.to(torch.int16) >= first_inverted.view(-1, 1, 1, 1), 255 - images, images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    """ImageOps.autocontrast(cutoff=0): per channel lo, hi; int(v * scale + offset) with scale = 255.0 / (hi - lo),
    offset = -lo * scale in doubles, clipped; a flat channel (hi <= lo) unchanged."""
    lo = images.amin(dim=(-2, -1), keepdim=True).to(torch.float64)
    hi = images.amax(dim=(-2, -1), keepdim=True).to(torch.float64)
    flat = hi <= lo
    span = torch.where(flat, 1.0, hi - lo)
    scale = torch.div(torch.full_like(span, 255.0), span)                  # a true division, not a reciprocal
    offset = -lo * scale
    mapped = (images.to(torch.float64) * scale + offset).trunc().clamp(0, 255).to(torch.uint8)
    return torch.where(flat, images, mapped)


# ----------------------------------------------------------------------------------------- geometric, PIL's
def _shear_taps(op: str, a: float, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image.transform(AFFINE, (1, a, 0, 0, 1, 0) for ShearX or (1, 0, 0, a, 1, 0) for ShearY, BICUBIC): output
    pixel (x, y) samples at xin = x + 0.5 + a (y + 0.5) (ShearX; the transposed for ShearY) in doubles
    (affine_transform), outside [0, W) x [0, H) keeps the fill; otherwise PIL's cubic (bicubic_filter32RGB) along
    the sheared axis at offset d from tap 1 of 4 edge-clamped taps (the other axis sits on pixel centres: d = 0
    there, so it contributes its centre tap exactly). Returns flat taps (4, h*w), d (h*w,) float64, inside."""
    x = (torch.arange(w, dtype=torch.float64) + 0.5).view(1, w).expand(h, w)
    y = (torch.arange(h, dtype=torch.float64) + 0.5).view(h, 1).expand(h, w)
    xin, yin = (x + a * y, y) if op == "ShearX" else (x, a * x + y)
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    along, size = (xin, w) if op == "ShearX" else (yin, h)
    u = along - 0.5
    base = torch.floor(u)
    d = u - base
    taps = (base.to(torch.int64) - 1 + torch.arange(4).view(4, 1, 1)).clamp(0, size - 1)     # (4, h, w)
    rows = torch.arange(h).view(1, h, 1)
    cols = torch.arange(w).view(1, 1, w)
    flat = rows * w + taps if op == "ShearX" else taps * w + cols
    return flat.reshape(4, h * w), d.reshape(h * w), inside.reshape(h * w)


def _scale_affine_positions(t: float, n: int) -> list[int]:
    """ImagingScaleAffine's pretabulated source positions along an axis shifted by t pixels: pos = t + 0.5,
    stepping by 1.0 in doubles, COORD (-1 below 0, else truncation); -1 where outside 0..n-1."""
    pos, out = t + 1 * 0.5, []
    for _ in range(n):
        i = -1 if pos < 0.0 else int(pos)
        out.append(i if 0 <= i < n else -1)
        pos += 1.0
    return out


def _translate_source(op: str, magnitude: float, h: int, w: int) -> torch.Tensor:
    """Image.transform(AFFINE, (1, 0, t, 0, 1, 0) or (1, 0, 0, 0, 1, t), NEAREST) with t = magnitude * W (or H)
    pixels, signed: flat source index (h*w,), -1 outside."""
    t = magnitude * (w if op == "TranslateX" else h)
    cols = torch.tensor(_scale_affine_positions(t if op == "TranslateX" else 0.0, w)).view(1, w)
    rows = torch.tensor(_scale_affine_positions(t if op == "TranslateY" else 0.0, h)).view(h, 1)
    return torch.where((rows >= 0) & (cols >= 0), rows * w + cols, -1).reshape(h * w)


def _rotate_source(angle: float, h: int, w: int) -> torch.Tensor:
    """image.rotate(angle) (NEAREST, about the centre, no expand): Image.rotate's inverse matrix in doubles, then
    affine_fixed's 16.16 fixed point (source = (A2 + y A1 + x A0) >> 16, ...). Flat source index (h*w,), -1 outside
    (transparent in the reference, then composited onto the grey)."""
    angle = angle % 360.0
    ys, xs = torch.arange(h).view(h, 1), torch.arange(w).view(1, w)
    if angle == 0:
        return (ys * w + xs).reshape(h * w)
    if angle in (90.0, 180.0, 270.0):
        raise ValueError(f"Rotate by {angle}: PIL transposes there; the reference's magnitudes stay in 0..30")
    cx, cy = w / 2, h / 2
    rad = -math.radians(angle)
    m = [round(math.cos(rad), 15), round(math.sin(rad), 15), 0.0, round(-math.sin(rad), 15),
         round(math.cos(rad), 15), 0.0]
    m[2], m[5] = m[0] * -cx + m[1] * -cy + m[2], m[3] * -cx + m[4] * -cy + m[5]
    m[2] += cx
    m[5] += cy
    corners = ((0, 0), (w, h), (0, h), (w, 0))
    if not all(abs(x * m[0] + y * m[1] + m[2]) < 32768.0 and abs(x * m[3] + y * m[4] + m[5]) < 32768.0
               for x, y in corners):
        raise ValueError(f"Rotate: {w}x{h} images are past PIL's fixed-point range")

    def fix(v: float) -> int:
        return math.floor(v * 65536.0 + 0.5)

    a0, a1, a3, a4 = fix(m[0]), fix(m[1]), fix(m[3]), fix(m[4])
    a2, a5 = fix(m[2] + m[0] * 0.5 + m[1] * 0.5), fix(m[5] + m[3] * 0.5 + m[4] * 0.5)
    xin = (a2 + ys * a1 + xs * a0) >> 16
    yin = (a5 + ys * a4 + xs * a3) >> 16
    inside = (xin >= 0) & (xin < w) & (yin >= 0) & (yin < h)
    return torch.where(inside, yin * w + xin, -1).reshape(h * w)


def _geometric_rows(op: str, h: int, w: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(taps (4, h*w), d (h*w,), inside (h*w,)) per magnitude index of a geometric op; a nearest op's taps are its
    source pixel four times with d = 0 (the cubic then returns that pixel exactly)."""
    rows = []
    for v in signed_values(op):
        if op in CUBIC_OPS:
            rows.append(_shear_taps(op, v, h, w))
            continue
        source = _rotate_source(v, h, w) if op == "Rotate" else _translate_source(op, v, h, w)
        rows.append((source.clamp(min=0).expand(4, h * w), torch.zeros(h * w, dtype=torch.float64), source >= 0))
    return rows


@lru_cache(maxsize=16)
def geometric_table(h: int, w: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The five geometric ops at every magnitude index for (h, w) images, op after op (GEOMETRIC_OPS order):
    taps (K, 4, h*w) int64 flat source indices, d (K, h*w) float64, inside (K, h*w) bool; and starts (15,) int64,
    per op id the row of its magnitude index 0 (0 for the other ops)."""
    rows, starts = [], [0] * len(OP_NAMES)
    for op in GEOMETRIC_OPS:
        starts[OP_INDEX[op]] = len(rows)
        rows += _geometric_rows(op, h, w)
    taps, d, inside = (torch.stack(part).to(device) for part in zip(*rows))
    return taps, d, inside, torch.tensor(starts, dtype=torch.int64).to(device)


def _row_start(op: str) -> int:
    """geometric_table's row of `op`'s magnitude index 0."""
    before = GEOMETRIC_OPS[:GEOMETRIC_OPS.index(op)]
    return sum(len(signed_values(o)) for o in before)


def resample(images: torch.Tensor, taps: torch.Tensor, d: torch.Tensor, inside: torch.Tensor,
             cubic: bool = True) -> torch.Tensor:
    """PIL's sampling of uint8 images (B, C, H, W) at per-image tables taps (B, 4, H*W), d (B, H*W), inside
    (B, H*W): BICUBIC's p1 + d (p2 + d (p3 + d p4)) in doubles on the 4 taps (integer p's, as PIL's), clipped and
    truncated, or (cubic=False) the nearest tap alone (the same result where d = 0); outside pixels FILL."""
    b, c, h, w = images.shape
    flat = images.reshape(b, c, h * w)

    def tap(k: int) -> torch.Tensor:
        return flat.gather(2, taps[:, k].unsqueeze(1).expand(b, c, h * w))

    if cubic:
        v1, v2, v3, v4 = (tap(k).to(torch.int32) for k in range(4))
        p2 = (v3 - v1).to(torch.float64)
        p3 = (2 * (v1 - v2) + v3 - v4).to(torch.float64)
        p4 = (v2 - v1 - v3 + v4).to(torch.float64)
        dd = d.unsqueeze(1)
        value = v2.to(torch.float64) + dd * (p2 + dd * (p3 + dd * p4))
        out = value.clamp(0, 255).to(torch.uint8)
    else:
        out = tap(1)
    return torch.where(inside.unsqueeze(1), out, FILL).view(b, c, h, w)


# ---------------------------------------------------------------------------------------------- batched ops
def apply_op(images: torch.Tensor, op: str, mag_idx: torch.Tensor) -> torch.Tensor:
    """One op on a batch uint8 (b, 3, H, W) with magnitude indices (b,) into signed_values(op)."""
    device = str(images.device)
    if op in GEOMETRIC_OPS:
        taps, d, inside, _ = geometric_table(images.shape[-2], images.shape[-1], device)
        rows = mag_idx + _row_start(op)
        return resample(images, taps[rows], d[rows], inside[rows], cubic=op in CUBIC_OPS)
    if op in ("Identity", "AutoContrast", "Equalize", "Invert"):
        return {"Identity": lambda x: x, "AutoContrast": autocontrast, "Equalize": equalize,
                "Invert": invert}[op](images)
    value = _op_table(op, device)[mag_idx]
    enhance = {"Brightness": brightness, "Color": color, "Contrast": contrast, "Sharpness": sharpness}
    if op in enhance:
        return enhance[op](images, value)
    return posterize(images, value) if op == "Posterize" else solarize(images, value)


def _resample_chosen(images: torch.Tensor, op_ids: torch.Tensor, mag_idx: torch.Tensor,
                     chosen: torch.Tensor) -> torch.Tensor:
    """Every geometric op in one resampling pass, each image by its own table row (the sync-free form)."""
    taps, d, inside, starts = geometric_table(images.shape[-2], images.shape[-1], str(images.device))
    rows = torch.where(chosen, starts[op_ids] + mag_idx, 0)
    return resample(images, taps[rows], d[rows], inside[rows])


def apply_ops(images: torch.Tensor, op_ids: torch.Tensor, mag_idx: torch.Tensor, ops: Sequence[str] = OP_NAMES,
              sync_free: Optional[bool] = None) -> torch.Tensor:
    """Each image i gets the reference's op OP_NAMES[op_ids[i]] at magnitude index mag_idx[i] (see
    loaders.transforms.autoaugment.dispatch_ops for ops and sync_free)."""
    return dispatch_ops(images, op_ids, mag_idx, ops, apply_op, _resample_chosen, sync_free)


def params_from_draws(policy: str, pid: torch.Tensor, u: torch.Tensor, sign: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference's decisions for the draws (loaders.transforms.autoaugment.policy_draws): sub-policy `pid`
    (random.randint), stage i applied when u_i < p_i (random.random() < p), the ops of SIGNED_OPS negated when the
    sign draw is 0 (random.choice([-1, 1]) picking -1). Returns policy_params' dict; 'mag_idx' points into
    signed_values."""
    return policy_params(policy, pid, u, sign, signed_ops=SIGNED_OPS, strict=True)


def auto_augment_params(keys: torch.Tensor, policy: str) -> dict[str, torch.Tensor]:
    """params_from_draws of the keys' draws (slots 8-12)."""
    return params_from_draws(policy, *policy_draws(keys, policy))


def apply_policy(images: torch.Tensor, params: dict[str, torch.Tensor], policy: str,
                 sync_free: Optional[bool] = None) -> torch.Tensor:
    """The two stages of each image's sub-policy as `params` decided them (see params_from_draws)."""
    for stage in range(2):
        images = apply_ops(images, params["op"][:, stage], params["mag_idx"][:, stage], stage_ops(policy, stage),
                           sync_free)
    return images


def auto_augment(images: torch.Tensor, keys: torch.Tensor, policy: str, sync_free: Optional[bool] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """uint8 (B, 3, H, W) -> the reference's CIFAR10Policy / SVHNPolicy / ImageNetPolicy ('cifar10', 'svhn',
    'imagenet') per image, and the draws (see params_from_draws)."""
    params = auto_augment_params(keys, policy)
    return apply_policy(images, params, policy, sync_free), params
