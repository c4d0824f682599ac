"""Vectors of the references' AutoAugment, made by running their own module; read by
tests/test_transforms_autoaugment_reference.py.

B (hananshafi/vits-for-small-scale-datasets) and D (aanna0701/SPT_LSA_ViT) hold the same utils/autoaug.py and
utils/transforms.py (git blobs 1b5204cd... and 243128ff...). This script imports them from a checkout of either
(nothing of them is copied here), runs every op at every magnitude bin and sign, and each policy under given draws,
on fixed images, and writes tests/fixtures/autoaugment_reference.json: the policies and magnitude tables as the
module holds them, the draws, and the SHA-256 (first 16 hex digits) of every output.

    python tests/autoaugment_reference_vectors.py /path/to/vits-for-small-scale-datasets

The module needs one shim: its `np.round(...).astype(np.int)` predates numpy 1.24, so `np.int` is set to `int`.
"""
from __future__ import annotations

import hashlib
import json
import platform
import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "autoaugment_reference.json"
OP_SIZES = [(32, 32), (31, 33), (64, 64), (5, 7)]                    # (H, W)
OP_IMAGES = 6
# (policy, H, W, images, seed, epoch) for the whole-policy vectors; the draws come from the keys of (seed, epoch)
POLICY_CASES = [("cifar10", 32, 32, 64, 11, 4), ("svhn", 32, 32, 64, 12, 0), ("imagenet", 32, 32, 64, 13, 2),
                ("imagenet", 64, 64, 24, 14, 1)]
# our op names -> the reference's SubPolicy names
REFERENCE_NAMES = {"ShearX": "shearX", "ShearY": "shearY", "TranslateX": "translateX", "TranslateY": "translateY",
                   "Rotate": "rotate", "Color": "color", "Posterize": "posterize", "Solarize": "solarize",
                   "Contrast": "contrast", "Sharpness": "sharpness", "Brightness": "brightness",
                   "AutoContrast": "autocontrast", "Equalize": "equalize", "Invert": "invert"}
REFERENCE_SIGNED = ("shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness")
POLICY_CLASSES = {"cifar10": "CIFAR10Policy", "svhn": "SVHNPolicy", "imagenet": "ImageNetPolicy"}


def fixture_images(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """uint8 (n >= 4, 3, h, w): a colour gradient, a narrow histogram (autocontrast, equalize), a flat image (the
    degenerate cases), one flat channel, then noise (every resampling tap shows). numpy's legacy RandomState:
    its stream is frozen, so the images are the same on every machine."""
    x = torch.from_numpy(np.random.RandomState(seed + 1000 * h + w).randint(0, 256, (n, 3, h, w)).astype(np.uint8))
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    for c, (a, b) in enumerate(((7, 3), (2, 11), (5, 5))):
        x[0, c] = ((xx * a + yy * b + 40 * c) % 256).to(torch.uint8)
    x[1] = x[1] // 3 + 50
    x[2] = 77
    x[3, 0] = 200
    return x


def digest(images: torch.Tensor) -> str:
    """First 16 hex digits of the SHA-256 of uint8 images (..., 3, H, W), C-contiguous bytes."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()[:16]


def size_key(h: int, w: int) -> str:
    return f"{h}x{w}"


# ------------------------------------------------------------------------------------ running the reference
@contextmanager
def replayed_random(pid: int, u: tuple[float, float], sign: tuple[int, int]) -> Iterator[None]:
    """Make the reference's calls to the `random` module return our draws: randint -> the sub-policy,
    random() -> u of stage 0 then of stage 1, choice(seq) inside stage k -> seq[sign[k]] (seq is [-1, 1])."""
    calls = {"random": 0}
    saved = random.randint, random.random, random.choice

    def next_u() -> float:
        calls["random"] += 1
        return float(u[calls["random"] - 1])

    random.randint = lambda a, b: int(pid)
    random.random = next_u
    random.choice = lambda seq: seq[int(sign[calls["random"] - 1])]
    try:
        yield
    finally:
        random.randint, random.random, random.choice = saved


def _to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))


def _from_pil(image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()


def make(checkout: Path) -> dict:
    np.int = int                                                     # the module's np.int (numpy < 1.24)
    sys.path.insert(0, str(checkout))
    from utils import autoaug                                        # the reference's own module

    from loaders.transforms.autoaugment import policy_draws
    from loaders.transforms.rng import sample_keys

    def run_op(sub, image: torch.Tensor, sign: int) -> torch.Tensor:
        with replayed_random(0, (0.0, 1.0), (sign, sign)):         # stage 0 applied (0 < 1.0), stage 1 not
            return _from_pil(sub(_to_pil(image)))

    ranges = {name: [float(autoaug.SubPolicy(0.0, name, b, 0.0, name, b).magnitude1) for b in range(10)]
              for name in REFERENCE_NAMES.values()}
    ops = {}
    for h, w in OP_SIZES:
        images = fixture_images(OP_IMAGES, h, w)
        for op, name in REFERENCE_NAMES.items():
            for b in range(10):
                sub = autoaug.SubPolicy(1.0, name, b, 0.0, name, b)
                for sign in ((0, 1) if name in REFERENCE_SIGNED else (1,)):
                    out = torch.stack([run_op(sub, image, sign) for image in images])
                    ops[f"{size_key(h, w)}/{op}/{b}/{'-' if sign == 0 else '+'}"] = digest(out)
    policies = {name: [[sp.p1, type(sp.operation1).__name__, float(sp.magnitude1),
                        sp.p2, type(sp.operation2).__name__, float(sp.magnitude2)]
                       for sp in getattr(autoaug, cls)().policies] for name, cls in POLICY_CLASSES.items()}
    cases = []
    for policy, h, w, n, seed, epoch in POLICY_CASES:
        pid, u, sign = policy_draws(sample_keys(seed, epoch, torch.arange(n)), policy)
        reference = getattr(autoaug, POLICY_CLASSES[policy])()
        images = fixture_images(n, h, w, seed)
        outputs = []
        for i in range(n):
            with replayed_random(int(pid[i]), tuple(u[i].tolist()), tuple(sign[i].tolist())):
                outputs.append(digest(_from_pil(reference(_to_pil(images[i])))))
        cases.append({"policy": policy, "height": h, "width": w, "images": n, "seed": seed, "epoch": epoch,
                      "pid": pid.tolist(), "u": u.tolist(), "sign": sign.tolist(), "digests": outputs})
    import PIL

    return {"source": {"files": {"utils/autoaug.py": "1b5204cda6c32cb6b13843459c2c2ba15820b931",
                                 "utils/transforms.py": "243128ff8d69de61a9b191837b761761789bd789"},
                       "repositories": ["hananshafi/vits-for-small-scale-datasets", "aanna0701/SPT_LSA_ViT"],
                       "pillow": PIL.__version__, "numpy": np.__version__, "python": platform.python_version(),
                       "machine": platform.machine()},
            "op_images": OP_IMAGES, "op_sizes": OP_SIZES, "ranges": ranges, "ops": ops, "policies": policies,
            "cases": cases}


def dumps(data: dict) -> str:
    """JSON with one op vector, one policy row or one case field per line (readable diffs)."""
    def block(value) -> str:
        if isinstance(value, dict):
            return "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items()) + "\n }"
        return json.dumps(value)

    parts = []
    for key, value in data.items():
        if key == "cases":
            value = "[\n" + ",\n".join(" " + block(case) for case in value) + "\n ]"
        else:
            value = block(value)
        parts.append(f" {json.dumps(key)}: {value}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "utils" / "autoaug.py").is_file():
        sys.exit("usage: python tests/autoaugment_reference_vectors.py CHECKOUT  (a checkout of B or D: it holds "
                 "utils/autoaug.py)")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    data = make(Path(sys.argv[1]).resolve())
    FIXTURE.parent.mkdir(exist_ok=True)
    tmp = FIXTURE.with_suffix(".json.tmp")
    tmp.write_text(dumps(data))
    tmp.replace(FIXTURE)
    print(f"wrote {FIXTURE} ({len(data['ops'])} op vectors, {sum(c['images'] for c in data['cases'])} policy "
          f"images)")
