"""AutoAugment (CIFAR10, SVHN, ImageNet policies) and RandAugment, batched on uint8 images.

Definitions are torchvision's (torchvision.transforms.AutoAugment / RandAugment, torchvision 0.29): the same
policy tables, magnitude bins, sign rule and op implementations (transforms/_functional_tensor.py), so each op
here equals torchvision.transforms.functional on the same parameters (tests/test_transforms_autoaugment.py).

Batching: every image draws its sub-policy / ops from its counter-based key. Each stage then runs one of two
bit-identical forms (loaders.transforms.sync_free: sub-batches on the CPU, sync-free elsewhere): the images that
drew the same op are gathered (index_select), transformed together by one batched op with per-image magnitudes,
and written back; or every op the stage can draw runs on the whole batch (the five geometric ops as one warp with
per-image matrices) and each image keeps its own (torch.where). No per-image Python: the Python loop runs over
the at most 15 op kinds.

Magnitudes are kept as indices into a per-op table of signed values (Python doubles, computed exactly as
torchvision computes them); geometric ops turn the table into inverse affine matrices once per image size.

Random slots used (loaders.transforms.rng): AutoAugment 8 (sub-policy), 9-10 (apply draws), 11-12 (signs);
RandAugment 16 + 2k (op of step k), 17 + 2k (sign of step k).
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from loaders.transforms.affine import inverse_affine_matrix, theta_table, warp_nearest
from loaders.transforms.rng import randint, uniform
from loaders.transforms.sync_free import per_image, use_sync_free

OP_NAMES = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
            "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize", "Invert")
OP_INDEX = {name: i for i, name in enumerate(OP_NAMES)}
RANDAUGMENT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color",
                   "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast", "Equalize")
GEOMETRIC_OPS = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
SLOT_AA_POLICY, SLOT_AA_APPLY, SLOT_AA_SIGN = 8, 9, 11
SLOT_RA = 16

POLICIES: dict[str, list] = {
    "imagenet": [
        (("Posterize", 0.4, 8), ("Rotate", 0.6, 9)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)), (("Posterize", 0.6, 7), ("Posterize", 0.6, 6)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Equalize", 0.4, None), ("Rotate", 0.8, 8)),
        (("Solarize", 0.6, 3), ("Equalize", 0.6, None)), (("Posterize", 0.8, 5), ("Equalize", 1.0, None)),
        (("Rotate", 0.2, 3), ("Solarize", 0.6, 8)), (("Equalize", 0.6, None), ("Posterize", 0.4, 6)),
        (("Rotate", 0.8, 8), ("Color", 0.4, 0)), (("Rotate", 0.4, 9), ("Equalize", 0.6, None)),
        (("Equalize", 0.0, None), ("Equalize", 0.8, None)), (("Invert", 0.6, None), ("Equalize", 1.0, None)),
        (("Color", 0.6, 4), ("Contrast", 1.0, 8)), (("Rotate", 0.8, 8), ("Color", 1.0, 2)),
        (("Color", 0.8, 8), ("Solarize", 0.8, 7)), (("Sharpness", 0.4, 7), ("Invert", 0.6, None)),
        (("ShearX", 0.6, 5), ("Equalize", 1.0, None)), (("Color", 0.4, 0), ("Equalize", 0.6, None)),
        (("Equalize", 0.4, None), ("Solarize", 0.2, 4)), (("Solarize", 0.6, 5), ("AutoContrast", 0.6, None)),
        (("Invert", 0.6, None), ("Equalize", 1.0, None)), (("Color", 0.6, 4), ("Contrast", 1.0, 8)),
        (("Equalize", 0.8, None), ("Equalize", 0.6, None)),
    ],
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ],
    "svhn": [
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)), (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ],
}


# ----------------------------------------------------------------------------------------- magnitude tables
@lru_cache(maxsize=64)
def augmentation_space(num_bins: int, height: int, width: int) -> dict[str, tuple[tuple[float, ...], bool]]:
    """op -> (magnitude per bin as Python floats, signed), computed with torchvision's exact expressions (on
    host tensors, once per size). The dict is shared: read it, never change it."""
    def lin(lo: float, hi: float) -> tuple[float, ...]:
        return tuple(float(v) for v in torch.linspace(lo, hi, num_bins).tolist())

    posterize = (8 - (torch.arange(num_bins) / ((num_bins - 1) / 4)).round().int()).tolist()
    return {
        "Identity": ((0.0,), False),
        "ShearX": (lin(0.0, 0.3), True), "ShearY": (lin(0.0, 0.3), True),
        "TranslateX": (lin(0.0, 150.0 / 331.0 * width), True), "TranslateY": (lin(0.0, 150.0 / 331.0 * height), True),
        "Rotate": (lin(0.0, 30.0), True), "Brightness": (lin(0.0, 0.9), True), "Color": (lin(0.0, 0.9), True),
        "Contrast": (lin(0.0, 0.9), True), "Sharpness": (lin(0.0, 0.9), True),
        "Posterize": (tuple(float(v) for v in posterize), False), "Solarize": (lin(255.0, 0.0), False),
        "AutoContrast": ((0.0,), False), "Equalize": ((0.0,), False), "Invert": ((0.0,), False),
    }


@lru_cache(maxsize=64)
def signed_values(num_bins: int, height: int, width: int, op: str) -> tuple[float, ...]:
    """Per op, the table a magnitude index points into: bins 0..n-1 positive, n..2n-1 negated (signed ops)."""
    values, signed = augmentation_space(num_bins, height, width)[op]
    return tuple(values) + (tuple(-v for v in values) if signed else ())


# ---------------------------------------------------------------------------------------------- batched ops
def _geometric_matrix(op: str, magnitude: float, height: int, width: int) -> list[float]:
    """The inverse matrix torchvision builds for a geometric op (tensor path)."""
    if op in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        center = [0.0 - width * 0.5, 0.0 - height * 0.5]            # F.affine(center=[0, 0]) on a tensor
        return inverse_affine_matrix(center, 0.0, [0.0, 0.0], 1.0,
                                     [shear, 0.0] if op == "ShearX" else [0.0, shear])
    if op == "TranslateX":
        return inverse_affine_matrix([0.0, 0.0], 0.0, [float(int(magnitude)), 0.0], 1.0, [0.0, 0.0])
    if op == "TranslateY":
        return inverse_affine_matrix([0.0, 0.0], 0.0, [0.0, float(int(magnitude))], 1.0, [0.0, 0.0])
    if op == "Rotate":
        return inverse_affine_matrix([0.0, 0.0], -magnitude, [0.0, 0.0], 1.0, [0.0, 0.0])
    raise ValueError(op)


@lru_cache(maxsize=256)
def _geometric_table(op: str, values: tuple, height: int, width: int, device: str) -> torch.Tensor:
    return theta_table([_geometric_matrix(op, v, height, width) for v in values], device)


@lru_cache(maxsize=256)
def _values_on(values: tuple, device: str) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).to(device)


def geometric(images: torch.Tensor, op: str, mag_idx: torch.Tensor, values: tuple,
              fill: Optional[float] = None) -> torch.Tensor:
    """ShearX/Y, TranslateX/Y, Rotate with per-image magnitudes values[mag_idx]; nearest, outside = fill or 0."""
    _, _, h, w = images.shape
    table = _geometric_table(op, values, h, w, str(images.device))
    return warp_nearest(images, table[mag_idx], fill=fill)


def _ratios(factor64: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio, 1 - ratio) as (b, 1, 1, 1) float32, the subtraction done in float64 as Python does."""
    r = factor64.view(-1, 1, 1, 1)
    return r.to(torch.float32), (1.0 - r).to(torch.float32)


def blend(img1: torch.Tensor, img2: torch.Tensor, factor64: torch.Tensor) -> torch.Tensor:
    """torchvision _blend on uint8 with a per-image ratio (b,) float64: ratio*img1 + (1-ratio)*img2, clamp, trunc."""
    r, q = _ratios(factor64)
    return (r * img1.to(torch.float32) + q * img2.to(torch.float32)).clamp(0, 255).to(img1.dtype)


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """uint8 (b, 3, H, W) -> uint8 (b, 1, H, W), torchvision's weights and truncation."""
    r, g, b = images.unbind(dim=-3)
    return (0.2989 * r + 0.587 * g + 0.114 * b).to(images.dtype).unsqueeze(dim=-3)


def brightness(images: torch.Tensor, factor64: torch.Tensor) -> torch.Tensor:
    return blend(images, torch.zeros_like(images), factor64)


def saturation(images: torch.Tensor, factor64: torch.Tensor) -> torch.Tensor:
    return blend(images, rgb_to_grayscale(images), factor64)


def contrast(images: torch.Tensor, factor64: torch.Tensor) -> torch.Tensor:
    mean = torch.mean(rgb_to_grayscale(images).to(torch.float32), dim=(-3, -2, -1), keepdim=True)
    return blend(images, mean, factor64)


@lru_cache(maxsize=8)
def _sharpness_kernel(device: str) -> torch.Tensor:
    """torchvision's (3, 3) smoothing kernel, made once per device (setting its centre per call is a host copy)."""
    kernel = torch.ones((3, 3), dtype=torch.float32)
    kernel[1, 1] = 5.0
    kernel /= kernel.sum()
    return kernel.to(device)


def sharpness(images: torch.Tensor, factor64: torch.Tensor) -> torch.Tensor:
    if images.shape[-1] <= 2 or images.shape[-2] <= 2:
        return images
    kernel = _sharpness_kernel(str(images.device))
    c = images.shape[-3]
    smooth = F.conv2d(images.to(torch.float32), kernel.expand(c, 1, 3, 3), groups=c)
    degenerate = images.clone()
    degenerate[..., 1:-1, 1:-1] = torch.round(smooth).to(images.dtype)
    return blend(images, degenerate, factor64)


def posterize(images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """Keep the top `bits` (b,) bits of each uint8 value."""
    mask = (256 - (1 << (8 - bits.to(torch.int64)))).to(torch.uint8).view(-1, 1, 1, 1)
    return images & mask


def solarize(images: torch.Tensor, threshold64: torch.Tensor) -> torch.Tensor:
    t = threshold64.to(torch.float32).view(-1, 1, 1, 1)
    return torch.where(images >= t, 255 - images, images)


def autocontrast(images: torch.Tensor) -> torch.Tensor:
    minimum = images.amin(dim=(-2, -1), keepdim=True).to(torch.float32)
    maximum = images.amax(dim=(-2, -1), keepdim=True).to(torch.float32)
    scale = 255.0 / (maximum - minimum)
    flat = ~torch.isfinite(scale)
    minimum = torch.where(flat, torch.zeros_like(minimum), minimum)
    scale = torch.where(flat, torch.ones_like(scale), scale)
    return ((images - minimum) * scale).clamp(0, 255).to(images.dtype)


def equalize(images: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel histogram equalization with torchvision's integer LUT."""
    b, c, h, w = images.shape
    flat = images.reshape(b * c, h * w).to(torch.int64)
    hist = torch.zeros(b * c, 256, dtype=torch.int64, device=images.device)
    hist.scatter_add_(1, flat, torch.ones_like(flat))
    top = hist.gather(1, flat.amax(dim=1, keepdim=True))                      # count of the last nonzero bin
    step = torch.div(h * w - top, 255, rounding_mode="floor")                 # (b*c, 1)
    safe = step.clamp(min=1)
    lut = torch.div(torch.cumsum(hist, 1) + torch.div(step, 2, rounding_mode="floor"), safe, rounding_mode="floor")
    lut = F.pad(lut, [1, 0])[:, :-1].clamp(0, 255)
    out = torch.where(step > 0, lut.gather(1, flat), flat)
    return out.to(torch.uint8).view(b, c, h, w)


def invert(images: torch.Tensor) -> torch.Tensor:
    return 255 - images


def apply_op(images: torch.Tensor, op: str, mag_idx: torch.Tensor, num_bins: int,
             fill: Optional[float] = None) -> torch.Tensor:
    """One op on a sub-batch uint8 (b, C, H, W) with magnitude indices (b,) into signed_values(...)."""
    h, w = images.shape[-2:]
    values = signed_values(num_bins, h, w, op)
    if op in GEOMETRIC_OPS:
        return geometric(images, op, mag_idx, values, fill)
    mag = _values_on(values, str(images.device))[mag_idx]
    colour: dict[str, Callable[[], torch.Tensor]] = {
        "Identity": lambda: images,
        "Brightness": lambda: brightness(images, 1.0 + mag),
        "Color": lambda: saturation(images, 1.0 + mag),
        "Contrast": lambda: contrast(images, 1.0 + mag),
        "Sharpness": lambda: sharpness(images, 1.0 + mag),
        "Posterize": lambda: posterize(images, mag.to(torch.int64)),
        "Solarize": lambda: solarize(images, mag),
        "AutoContrast": lambda: autocontrast(images),
        "Equalize": lambda: equalize(images),
        "Invert": lambda: invert(images),
    }
    return colour[op]()


def dispatch_ops(images: torch.Tensor, op_ids: torch.Tensor, mag_idx: torch.Tensor, ops: Sequence[str],
                 run_op: Callable[[torch.Tensor, str, torch.Tensor], torch.Tensor],
                 run_geometric: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                 sync_free: Optional[bool] = None) -> torch.Tensor:
    """Each image i gets op OP_NAMES[op_ids[i]] at magnitude index mag_idx[i], in one of the two forms.

    ops: the op kinds op_ids can hold (an image whose op is not listed is left as it is).
    run_op(x, op, m): `op` on a batch x (b, C, H, W) with magnitude indices m (b,).
    run_geometric(x, op_ids, mag_idx, chosen): the sync-free form's single pass for every geometric op at once,
        each image by its own op and magnitude (images where `chosen` (B,) is False: any result, it is dropped).
    sync_free: force the form (None: by device, loaders.transforms.sync_free.use_sync_free)."""
    if not use_sync_free(images.device, sync_free):
        out = images
        for op in ops:
            if op == "Identity":
                continue
            sel = torch.nonzero(op_ids == OP_INDEX[op]).flatten()
            if sel.numel() == 0:
                continue
            out = out.index_copy(0, sel, run_op(out.index_select(0, sel), op, mag_idx[sel]))
        return out
    # sync-free: every listed op on the whole batch, each image keeping its own op's result. Magnitude indices of
    # images that drew another op are replaced by 0 (any valid row; their result is dropped).
    out = images
    geometric = [op for op in ops if op in GEOMETRIC_OPS]
    if geometric:
        chosen = op_ids == OP_INDEX[geometric[0]]
        for op in geometric[1:]:
            chosen = chosen | (op_ids == OP_INDEX[op])
        out = per_image(chosen, run_geometric(images, op_ids, torch.where(chosen, mag_idx, 0), chosen), out)
    for op in ops:
        if op == "Identity" or op in GEOMETRIC_OPS:
            continue
        chosen = op_ids == OP_INDEX[op]
        out = per_image(chosen, run_op(images, op, torch.where(chosen, mag_idx, 0)), out)
    return out


def apply_ops(images: torch.Tensor, op_ids: torch.Tensor, mag_idx: torch.Tensor, num_bins: int,
              fill: Optional[float] = None, ops: Sequence[str] = OP_NAMES,
              sync_free: Optional[bool] = None) -> torch.Tensor:
    """Each image i gets op OP_NAMES[op_ids[i]] at magnitude index mag_idx[i]; one batched call per op kind
    (see dispatch_ops). The sync-free form runs the five geometric ops as one warp with per-image matrices."""
    def geometric(x: torch.Tensor, ids: torch.Tensor, mags: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        table, starts = _geometric_lookup(num_bins, x.shape[-2], x.shape[-1], str(x.device))
        return warp_nearest(x, table[torch.where(chosen, starts[ids] + mags, 0)], fill=fill)

    return dispatch_ops(images, op_ids, mag_idx, ops, lambda x, op, m: apply_op(x, op, m, num_bins, fill),
                        geometric, sync_free)


@lru_cache(maxsize=64)
def _geometric_lookup(num_bins: int, height: int, width: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The five geometric ops' matrices in one table (K, 2, 3) float32 (the rows of _geometric_table, op after
    op) and, per op id, the row its magnitude 0 sits at (15,) int64 (0 for the other ops)."""
    tables, starts, row = [], [0] * len(OP_NAMES), 0
    for op in GEOMETRIC_OPS:
        values = signed_values(num_bins, height, width, op)
        tables.append(_geometric_table(op, values, height, width, device))
        starts[OP_INDEX[op]] = row
        row += len(values)
    return torch.cat(tables), torch.tensor(starts, dtype=torch.int64).to(device)


# ----------------------------------------------------------------------------------------------- policies
TORCHVISION_SIGNED_OPS = frozenset(op for op, (_, signed) in augmentation_space(10, 32, 32).items() if signed)


@lru_cache(maxsize=16)
def _policy_tables(policy: str, device: str, signed_ops: frozenset
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(P, 2) op ids, (P, 2) apply probabilities, (P, 2) bin ids (0 for none), (P, 2) signed flags."""
    if policy not in POLICIES:
        raise ValueError(f"auto augment policy must be one of {sorted(POLICIES)}, got {policy!r}")
    rows = POLICIES[policy]
    ops = torch.tensor([[OP_INDEX[o[0]] for o in r] for r in rows], dtype=torch.int64)
    probs = torch.tensor([[o[1] for o in r] for r in rows], dtype=torch.float64)
    bins = torch.tensor([[o[2] if o[2] is not None else 0 for o in r] for r in rows], dtype=torch.int64)
    signed = torch.tensor([[o[0] in signed_ops for o in r] for r in rows], dtype=torch.bool)
    return ops.to(device), probs.to(device), bins.to(device), signed.to(device)


def policy_draws(keys: torch.Tensor, policy: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A policy's random numbers per image: sub-policy (B,) int64 uniform over its rows, apply draws u (B, 2)
    float64 in [0, 1), sign draws (B, 2) int64 in {0, 1} (0 = negative)."""
    pid = randint(keys, SLOT_AA_POLICY, len(POLICIES[policy]))[:, 0]
    return pid, uniform(keys, SLOT_AA_APPLY, 2).to(torch.float64), randint(keys, SLOT_AA_SIGN, 2, n=2)


def policy_params(policy: str, pid: torch.Tensor, u: torch.Tensor, sign: torch.Tensor,
                  signed_ops: frozenset = TORCHVISION_SIGNED_OPS, strict: bool = False) -> dict[str, torch.Tensor]:
    """What the draws (policy_draws) decide: stage i applies when u_i <= p_i (torchvision's rule) or, with
    `strict`, when u_i < p_i (random.random() < p, the reference port's rule); an op of `signed_ops` is negated
    when its sign draw is 0. Returns 'policy' (B,), 'op' (B, 2) op ids (0 = Identity when not applied),
    'mag_idx' (B, 2) magnitude indices (bin, + 10 when negated), 'applied' (B, 2) bool."""
    ops, probs, bins, signed = _policy_tables(policy, str(pid.device), signed_ops)
    applied = u < probs[pid] if strict else u <= probs[pid]
    negative = signed[pid] & (sign == 0)
    mag_idx = bins[pid] + 10 * negative.to(torch.int64)
    op = torch.where(applied, ops[pid], torch.zeros_like(ops[pid]))
    mag_idx = torch.where(applied, mag_idx, torch.zeros_like(mag_idx))
    return {"policy": pid, "op": op, "mag_idx": mag_idx, "applied": applied}


def auto_augment_params(keys: torch.Tensor, policy: str) -> dict[str, torch.Tensor]:
    """Per-image draws, torchvision's rule (see policy_params); 'mag_idx' points into signed_values(10, ...)."""
    return policy_params(policy, *policy_draws(keys, policy))


def stage_ops(policy: str, stage: int) -> tuple[str, ...]:
    """The op kinds stage 0 or 1 of `policy`'s sub-policies can hold, in table order."""
    return tuple(dict.fromkeys(row[stage][0] for row in POLICIES[policy]))


def auto_augment(images: torch.Tensor, keys: torch.Tensor, policy: str, fill: Optional[float] = None,
                 sync_free: Optional[bool] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """uint8 (B, C, H, W) -> AutoAugment(policy) applied per image, and the draws (see auto_augment_params).
    sync_free: see apply_ops."""
    p = auto_augment_params(keys, policy)
    for stage in range(2):
        images = apply_ops(images, p["op"][:, stage], p["mag_idx"][:, stage], 10, fill, stage_ops(policy, stage),
                           sync_free)
    return images, p


@lru_cache(maxsize=16)
def _rand_augment_tables(num_bins: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(14,) int64 ids into OP_NAMES of RANDAUGMENT_OPS and (14,) bool: whether each op is signed."""
    table = torch.tensor([OP_INDEX[o] for o in RANDAUGMENT_OPS], dtype=torch.int64)
    signed = torch.tensor([augmentation_space(num_bins, 32, 32)[o][1] for o in RANDAUGMENT_OPS], dtype=torch.bool)
    return table.to(device), signed.to(device)


def rand_augment_params(keys: torch.Tensor, num_ops: int = 2, magnitude: int = 9, num_bins: int = 31
                        ) -> dict[str, torch.Tensor]:
    """Per image and step: op uniform over RANDAUGMENT_OPS (14, Identity included), sign negative when the
    draw is 1 (torchvision). 'op' (B, num_ops) ids into OP_NAMES, 'mag_idx' (B, num_ops)."""
    table, signed = _rand_augment_tables(num_bins, str(keys.device))
    ops, mags = [], []
    for k in range(num_ops):
        choice = randint(keys, SLOT_RA + 2 * k, len(RANDAUGMENT_OPS))[:, 0]
        negative = signed[choice] & (randint(keys, SLOT_RA + 2 * k + 1, 2)[:, 0] == 1)
        ops.append(table[choice])
        mag = torch.where(signed[choice] | (table[choice] == OP_INDEX["Posterize"]) |
                          (table[choice] == OP_INDEX["Solarize"]), magnitude, 0)
        mags.append(mag + num_bins * negative.to(torch.int64))
    return {"op": torch.stack(ops, 1), "mag_idx": torch.stack(mags, 1)}


def rand_augment(images: torch.Tensor, keys: torch.Tensor, num_ops: int = 2, magnitude: int = 9,
                 num_bins: int = 31, fill: Optional[float] = None, sync_free: Optional[bool] = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """uint8 (B, C, H, W) -> RandAugment(num_ops, magnitude, num_bins) per image, and the draws.
    sync_free: see apply_ops."""
    p = rand_augment_params(keys, num_ops, magnitude, num_bins)
    for k in range(num_ops):
        images = apply_ops(images, p["op"][:, k], p["mag_idx"][:, k], num_bins, fill, RANDAUGMENT_OPS, sync_free)
    return images, p
