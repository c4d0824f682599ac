"""Batched AutoAugment / RandAugment against torchvision, op by op and policy by policy, and their statistics."""
import pytest
import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.autoaugment import AutoAugment, AutoAugmentPolicy, _apply_op

from loaders.transforms.autoaugment import (OP_NAMES, POLICIES, RANDAUGMENT_OPS, apply_op, auto_augment,
                                            auto_augment_params, rand_augment, rand_augment_params,
                                            signed_values)
from loaders.transforms.rng import sample_keys

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SIZES = [(32, 32), (31, 33), (64, 64)]


def _images(n, h, w, seed=0):
    x = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    x[0] = x[0] // 3 + 50            # a narrow histogram (autocontrast, equalize)
    x[1] = 77                        # a flat image (autocontrast's max == min, equalize's step 0)
    x[2, 0] = 200                    # one flat channel
    return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("op", [o for o in OP_NAMES if o != "Identity"])
def test_each_op_equals_torchvision(device, size, op):
    """Every magnitude bin of every op, both signs: exact equality (uint8), geometric ops included."""
    h, w = size
    x = _images(6, h, w).to(device)
    values = signed_values(10, h, w, op)
    for fill in (None, 128.0):
        if fill is not None and op not in ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"):
            continue
        for mi, value in enumerate(values):
            y = apply_op(x, op, torch.full((6,), mi, dtype=torch.int64, device=device), 10, fill)
            ref = torch.stack([_apply_op(x[i], op, value, InterpolationMode.NEAREST,
                                         None if fill is None else [fill] * 3) for i in range(6)])
            assert torch.equal(y, ref), (op, value, fill, (y.int() - ref.int()).abs().max().item())


def test_mixed_magnitudes_in_one_call():
    x = _images(40, 31, 33, seed=1)
    idx = torch.randint(0, 20, (40,), generator=torch.Generator().manual_seed(2))
    for op in ("Rotate", "Contrast", "Posterize", "Solarize", "ShearY"):
        values = signed_values(10, 31, 33, op)
        mi = idx % len(values)
        ref = torch.stack([_apply_op(x[i], op, values[mi[i]], InterpolationMode.NEAREST, None) for i in range(40)])
        assert torch.equal(apply_op(x, op, mi, 10), ref), op


def _torchvision_policy(x, params, policy, size):
    """Apply torchvision's own op sequence for the sub-policies/decisions we drew, per image."""
    h, w = size
    rows = POLICIES[policy]
    out = []
    for i in range(x.shape[0]):
        img = x[i]
        for stage, (name, _, _) in enumerate(rows[int(params["policy"][i])]):
            if bool(params["applied"][i, stage]):
                value = signed_values(10, h, w, name)[int(params["mag_idx"][i, stage])]
                img = _apply_op(img, name, value, InterpolationMode.NEAREST, None)
        out.append(img)
    return torch.stack(out)


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize("policy", ["cifar10", "svhn", "imagenet"])
@pytest.mark.parametrize("size", [(32, 32), (31, 33)])
def test_policy_equals_torchvision_sequence(policy, size, sync_free):
    x = _images(96, *size, seed=3)
    keys = sample_keys(11, 4, torch.arange(96))
    y, params = auto_augment(x, keys, policy, sync_free=sync_free)
    assert torch.equal(y, _torchvision_policy(x, params, policy, size))


def test_policy_tables_match_torchvision():
    for name, enum in (("cifar10", AutoAugmentPolicy.CIFAR10), ("svhn", AutoAugmentPolicy.SVHN),
                       ("imagenet", AutoAugmentPolicy.IMAGENET)):
        assert [tuple(r) for r in POLICIES[name]] == [tuple(r) for r in AutoAugment(enum).policies]


def _chi2(counts, expected):
    return float(((counts - expected) ** 2 / expected).sum())


def test_policy_draw_frequencies_follow_torchvision():
    n = 100_000
    keys = sample_keys(0, 0, torch.arange(n))
    p = auto_augment_params(keys, "cifar10")
    counts = torch.bincount(p["policy"], minlength=25).double()
    assert _chi2(counts, n / 25) < 60                                   # 24 dof, p ~ 1e-4
    rows = POLICIES["cifar10"]
    probs = torch.tensor([[r[0][1], r[1][1]] for r in rows], dtype=torch.float64)[p["policy"]]
    rate = p["applied"].double().mean(0)
    assert torch.allclose(rate, probs.mean(0), atol=0.006)             # apply iff u <= p
    assert not p["applied"][probs == 0.0].any()
    # signs of signed ops: half negated (index >= 10)
    signed = torch.tensor([[r[0][0] in ("Rotate", "TranslateX", "ShearY", "Color", "Brightness", "Contrast",
                                        "Sharpness", "TranslateY", "ShearX")] for r in rows])[p["policy"], 0]
    signed = signed & p["applied"][:, 0]
    neg = (p["mag_idx"][:, 0] >= 10)[signed].double().mean()
    assert abs(float(neg) - 0.5) < 0.01
    assert not (p["mag_idx"][:, 0] >= 10)[~signed].any()


@pytest.mark.parametrize("sync_free", [False, True])
def test_randaugment_statistics_and_equality(sync_free):
    n = 70_000
    keys = sample_keys(1, 0, torch.arange(n))
    p = rand_augment_params(keys)
    for k in range(2):
        counts = torch.bincount(p["op"][:, k], minlength=len(OP_NAMES))
        used = counts[[OP_NAMES.index(o) for o in RANDAUGMENT_OPS]].double()
        assert counts.sum() == used.sum()                               # Invert never drawn
        assert _chi2(used, n / 14) < 45                                 # 13 dof
    assert (p["op"][:, 0] == p["op"][:, 1]).double().mean().sub(1 / 14).abs() < 0.01
    x = _images(64, 32, 32, seed=5)
    y, q = rand_augment(x, keys[:64], sync_free=sync_free)
    ref = []
    for i in range(64):
        img = x[i]
        for k in range(2):
            name = OP_NAMES[int(q["op"][i, k])]
            img = _apply_op(img, name, signed_values(31, 32, 32, name)[int(q["mag_idx"][i, k])],
                            InterpolationMode.NEAREST, None)
        ref.append(img)
    assert torch.equal(y, torch.stack(ref))


def test_draws_independent_of_batching():
    x = _images(20, 32, 32, seed=6)
    keys = sample_keys(2, 1, torch.arange(20))
    whole, _ = auto_augment(x, keys, "imagenet")
    parts = torch.cat([auto_augment(x[:7], keys[:7], "imagenet")[0], auto_augment(x[7:], keys[7:], "imagenet")[0]])
    assert torch.equal(whole, parts)
