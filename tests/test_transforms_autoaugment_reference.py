"""The references' AutoAugment family (loaders/transforms/autoaugment_reference.py) against the reference's own
op definitions: B's and D's utils/transforms.py and utils/autoaug.py (the same files in both; line numbers below
are of hananshafi/vits-for-small-scale-datasets at 22198429, blobs 243128ff and 1b5204cd).

Two sources, both demanded bit-exact on uint8:
1. PIL itself, each op called exactly as the reference calls it (`reference_op` below), on several sizes, odd
   included, every magnitude bin and both signs;
2. vectors made by running the reference module (tests/autoaugment_reference_vectors.py writes
   tests/fixtures/autoaugment_reference.json): every op at every bin and sign, the policy tables and magnitudes the
   module holds, and whole policies under recorded draws (sub-policy choice, apply draws, signs).
Plus the draws' statistics (uniform sub-policy, apply iff u < p, signs) and that both forms are equal.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageOps

from autoaugment_reference_vectors import (FIXTURE, POLICY_CLASSES, REFERENCE_NAMES, digest, fixture_images,
                                           size_key)
from loaders.transforms.autoaugment import OP_INDEX, POLICIES, policy_draws, policy_params
from loaders.transforms.autoaugment_reference import (SIGNED_OPS, apply_op, apply_ops, apply_policy,
                                                      auto_augment, auto_augment_params, params_from_draws,
                                                      ranges, signed_values)
from loaders.transforms.rng import sample_keys

OPS = tuple(REFERENCE_NAMES)
# the reference's ranges (utils/autoaug.py lines 170-185), as the test's own source for the PIL calls
REFERENCE_RANGES = {
    "ShearX": np.linspace(0, 0.3, 10), "ShearY": np.linspace(0, 0.3, 10),
    "TranslateX": np.linspace(0, 150 / 331, 10), "TranslateY": np.linspace(0, 150 / 331, 10),
    "Rotate": np.linspace(0, 30, 10), "Color": np.linspace(0.0, 0.9, 10),
    "Posterize": np.round(np.linspace(8, 4, 10), 0).astype(int), "Solarize": np.linspace(256, 0, 10),
    "Contrast": np.linspace(0.0, 0.9, 10), "Sharpness": np.linspace(0.0, 0.9, 10),
    "Brightness": np.linspace(0.0, 0.9, 10), "AutoContrast": [0] * 10, "Equalize": [0] * 10, "Invert": [0] * 10,
}


@pytest.fixture(scope="module")
def vectors() -> dict:
    return json.loads(FIXTURE.read_text())


def reference_op(image: torch.Tensor, op: str, magnitude, sign: int) -> torch.Tensor:
    """One op on one uint8 image (3, H, W) exactly as utils/transforms.py calls PIL, `sign` standing for its
    random.choice([-1, 1]); fillcolor (128, 128, 128) as SubPolicy passes it (utils/autoaug.py line 169).
    ShearX l.12-15, ShearY l.22-25: transform(size, AFFINE, (1, m*s, 0, 0, 1, 0) / (1, 0, 0, m*s, 1, 0), BICUBIC);
    TranslateX l.32-35, TranslateY l.42-45: transform(AFFINE, (1, 0, m*W*s, 0, 1, 0) / (..., m*H*s)), default
    NEAREST; Rotate l.51-53: RGBA rotate(m), composite onto (128,)*4; Color l.57, Contrast l.72, Sharpness l.77,
    Brightness l.82: ImageEnhance.X(x).enhance(1 + m*s); Posterize l.62, Solarize l.67, AutoContrast l.87,
    Equalize l.92, Invert l.97: ImageOps."""
    x = Image.fromarray(np.ascontiguousarray(image.permute(1, 2, 0).numpy()))
    fill = (128, 128, 128)
    if op == "ShearX":
        out = x.transform(x.size, Image.AFFINE, (1, magnitude * sign, 0, 0, 1, 0), Image.BICUBIC, fillcolor=fill)
    elif op == "ShearY":
        out = x.transform(x.size, Image.AFFINE, (1, 0, 0, magnitude * sign, 1, 0), Image.BICUBIC, fillcolor=fill)
    elif op == "TranslateX":
        out = x.transform(x.size, Image.AFFINE, (1, 0, magnitude * x.size[0] * sign, 0, 1, 0), fillcolor=fill)
    elif op == "TranslateY":
        out = x.transform(x.size, Image.AFFINE, (1, 0, 0, 0, 1, magnitude * x.size[1] * sign), fillcolor=fill)
    elif op == "Rotate":
        rot = x.convert("RGBA").rotate(magnitude)
        out = Image.composite(rot, Image.new("RGBA", rot.size, (128,) * 4), rot).convert(x.mode)
    elif op in ("Color", "Contrast", "Sharpness", "Brightness"):
        out = getattr(ImageEnhance, op)(x).enhance(1 + magnitude * sign)
    elif op == "Posterize":
        out = ImageOps.posterize(x, magnitude)
    elif op == "Solarize":
        out = ImageOps.solarize(x, magnitude)
    else:
        out = {"AutoContrast": ImageOps.autocontrast, "Equalize": ImageOps.equalize, "Invert": ImageOps.invert}[op](x)
    return torch.from_numpy(np.array(out, dtype=np.uint8)).permute(2, 0, 1)


def _signs(op: str) -> tuple[int, ...]:
    return (1, -1) if op in SIGNED_OPS else (1,)


def _index(bin_: int, sign: int) -> int:
    return bin_ + (10 if sign == -1 else 0)


@pytest.mark.parametrize("size", [(32, 32), (31, 33), (17, 16), (2, 5)])
@pytest.mark.parametrize("op", OPS)
def test_each_op_equals_pil_as_the_reference_calls_it(op, size):
    """Every bin, both signs where the reference draws one: torch.equal with PIL (no tolerance: the bicubic
    shear, PIL's fixed-point rotation, the float32 blends and the SMOOTH filter are reproduced exactly)."""
    h, w = size
    x = fixture_images(6, h, w, seed=5)
    for b in range(10):
        for sign in _signs(op):
            ours = apply_op(x, op, torch.full((6,), _index(b, sign)))
            ref = torch.stack([reference_op(x[i], op, REFERENCE_RANGES[op][b], sign) for i in range(6)])
            diff = (ours.int() - ref.int()).abs()
            assert torch.equal(ours, ref), (op, b, sign, int(diff.max()), int((diff > 0).sum()))


def test_the_family_is_not_torchvision_s():
    """The ops the issue names differ from torchvision's family on the same draws (the test above is not
    satisfied by torchvision's ops): fill, interpolation, rotation sign, solarize thresholds."""
    from loaders.transforms.autoaugment import apply_op as torchvision_op

    x = fixture_images(6, 32, 32, seed=5)
    for op, mag in (("ShearX", 9), ("TranslateY", 14), ("Rotate", 9), ("Solarize", 1), ("Color", 15)):
        idx = torch.full((6,), mag)
        assert not torch.equal(apply_op(x, op, idx), torchvision_op(x, op, idx, 10)), op
    assert signed_values("Rotate") == ranges()["Rotate"]                  # no negative rotations
    assert ranges()["Solarize"][0] == 256.0                               # bin 0 inverts nothing


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("size", [tuple(s) for s in json.loads(FIXTURE.read_text())["op_sizes"]])
def test_each_op_equals_the_reference_module(vectors, size, sync_free):
    """The outputs of the reference's own SubPolicy ops (run by tests/autoaugment_reference_vectors.py), every op
    at every bin and sign, through apply_ops in both forms."""
    h, w = size
    n = vectors["op_images"]
    x = fixture_images(n, h, w)
    wrong = []
    for op in OPS:
        for b in range(10):
            for sign in _signs(op):
                out = apply_ops(x, torch.full((n,), OP_INDEX[op]), torch.full((n,), _index(b, sign)), (op,),
                                sync_free)
                if digest(out) != vectors["ops"][f"{size_key(h, w)}/{op}/{b}/{'-' if sign == -1 else '+'}"]:
                    wrong.append((op, b, sign))
    assert wrong == []


def test_policies_and_magnitudes_are_the_reference_module_s(vectors):
    """The sub-policy lists (op, probability, magnitude) of CIFAR10Policy / SVHNPolicy / ImageNetPolicy and
    SubPolicy's ranges, as the reference module holds them, equal POLICIES with our magnitude tables."""
    for op, name in REFERENCE_NAMES.items():
        assert list(ranges()[op]) == vectors["ranges"][name], op
    for policy in POLICY_CLASSES:
        rows = vectors["policies"][policy]
        assert len(rows) == len(POLICIES[policy]) == 25
        for ours, (p1, op1, m1, p2, op2, m2) in zip(POLICIES[policy], rows):
            for (op, p, b), (ref_p, ref_op, ref_m) in zip(ours, ((p1, op1, m1), (p2, op2, m2))):
                assert (op, p) == (ref_op, ref_p)
                assert ranges()[op][b or 0] == ref_m                  # bin None: the op takes no magnitude (0)


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("case", range(4))
def test_policy_under_recorded_draws_equals_the_reference_module(vectors, case, sync_free):
    """Whole policies: the reference's CIFAR10Policy/SVHNPolicy/ImageNetPolicy called with its random module
    replaying our draws (random.randint -> the sub-policy, random.random -> u per stage, random.choice -> the
    sign) gives, image by image, what params_from_draws + apply_policy give."""
    c = vectors["cases"][case]
    x = fixture_images(c["images"], c["height"], c["width"], c["seed"])
    params = params_from_draws(c["policy"], torch.tensor(c["pid"]), torch.tensor(c["u"], dtype=torch.float64),
                               torch.tensor(c["sign"]))
    out = apply_policy(x, params, c["policy"], sync_free)
    wrong = [i for i in range(c["images"]) if digest(out[i]) != c["digests"][i]]
    assert wrong == [], [(i, c["pid"][i], params["op"][i].tolist()) for i in wrong]
    assert params["applied"].any(1).float().mean() > 0.5                  # the vectors exercise the ops


def test_keyed_draws_are_the_recorded_ones(vectors):
    """auto_augment on the keys of (seed, epoch, index) draws what the vectors recorded, so the keyed pipeline
    (whatever the batching, rank or resume point) is the one the reference module was run with."""
    for c in vectors["cases"]:
        keys = sample_keys(c["seed"], c["epoch"], torch.arange(c["images"]))
        pid, u, sign = policy_draws(keys, c["policy"])
        assert pid.tolist() == c["pid"] and u.tolist() == c["u"] and sign.tolist() == c["sign"]
        x = fixture_images(c["images"], c["height"], c["width"], c["seed"])
        out, params = auto_augment(x, keys, c["policy"])
        assert [digest(img) for img in out] == c["digests"]
        assert torch.equal(params["op"], auto_augment_params(keys, c["policy"])["op"])


def test_draws_follow_the_reference_rules():
    """Sub-policy uniform over the 25 rows; stage applied iff u < p (strict: u == p is not applied, as
    random.random() < p; torchvision applies it); the ops the reference gives a random sign negated half the time,
    Rotate never."""
    n = 100_000
    keys = sample_keys(3, 0, torch.arange(n))
    for policy in POLICY_CLASSES:
        p = auto_augment_params(keys, policy)
        counts = torch.bincount(p["policy"], minlength=25).double()
        assert float(((counts - n / 25) ** 2 / (n / 25)).sum()) < 60                # chi2, 24 dof, p ~ 1e-4
        probs = torch.tensor([[r[0][1], r[1][1]] for r in POLICIES[policy]], dtype=torch.float64)[p["policy"]]
        assert torch.allclose(p["applied"].double().mean(0), probs.mean(0), atol=0.006)
        assert not p["applied"][probs == 0].any() and p["applied"][probs == 1].all()
        signed_rows = torch.tensor([[op in SIGNED_OPS for op, _, _ in row] for row in POLICIES[policy]])
        for stage in range(2):
            signed = signed_rows[p["policy"], stage] & p["applied"][:, stage]
            negative = p["mag_idx"][:, stage] >= 10
            if signed.any():
                assert abs(float(negative[signed].double().mean()) - 0.5) < 0.02
            assert not negative[~signed].any()
            rotate = p["op"][:, stage] == OP_INDEX["Rotate"]
            assert not negative[rotate].any()
    pid = torch.tensor([3, 3])                                   # cifar10 row 3: ShearY 0.5, TranslateY 0.7
    u = torch.tensor([[0.5, 0.7], [0.5 - 2 ** -24, 0.7 - 2 ** -24]], dtype=torch.float64)
    sign = torch.zeros(2, 2, dtype=torch.int64)
    assert params_from_draws("cifar10", pid, u, sign)["applied"].tolist() == [[False, False], [True, True]]
    assert policy_params("cifar10", pid, u, sign)["applied"].tolist() == [[True, True], [True, True]]


def test_draws_independent_of_batching():
    x = fixture_images(20, 32, 32)
    keys = sample_keys(2, 1, torch.arange(20))
    whole, _ = auto_augment(x, keys, "cifar10")
    parts = torch.cat([auto_augment(x[:7], keys[:7], "cifar10")[0], auto_augment(x[7:], keys[7:], "cifar10")[0]])
    assert torch.equal(whole, parts)


def test_train_transform_runs_the_chosen_family():
    """data.auto_augment_impl picks the family in the pipeline (after pad-crop and flip, as B/D's main.py) and in
    the torchvision loader's per-image path; a bad value or RandAugment with it is refused naming the key."""
    from engine.config import DataConfig
    from loaders.torchvision_loader import augment_one
    from loaders.transforms import autoaugment
    from loaders.transforms.basic import random_crop, random_flip
    from loaders.transforms.pipeline import TrainTransform

    x = fixture_images(16, 32, 32, seed=8)
    mean, std = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]
    out = {}
    for impl, family in (("reference", auto_augment), ("torchvision", autoaugment.auto_augment)):
        data = DataConfig(auto_augment="svhn", auto_augment_impl=impl)
        t = TrainTransform(data, mean, std, seed=4)
        keys = t.keys(torch.arange(16), 3)
        out[impl], params = t.augment_uint8(x, keys)
        cropped = random_flip(random_crop(x, keys, 4)[0], keys, slot=2)[0]
        assert torch.equal(out[impl], family(cropped, keys, "svhn")[0])
        assert torch.equal(params["augment_op"], family(cropped, keys, "svhn")[1]["op"])
        assert torch.equal(out[impl], torch.stack([augment_one(x[i], keys[i], data) for i in range(16)]))
    assert not torch.equal(out["reference"], out["torchvision"])
    with pytest.raises(ValueError, match="data.auto_augment_impl"):
        TrainTransform(DataConfig(auto_augment="svhn", auto_augment_impl="pil"), mean, std, seed=4)
    with pytest.raises(ValueError, match="data.auto_augment_impl.*RandAugment"):
        TrainTransform(DataConfig(auto_augment="rand", auto_augment_impl="reference"), mean, std, seed=4)
