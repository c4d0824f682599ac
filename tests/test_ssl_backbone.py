"""The DINO embedding (engine/ssl/backbone.py): position-embedding interpolation against a hand-written bicubic,
full-size features equal to the classifier's pre-logits, half-size features equal to timm's own layers built or
switched for that size, and the multi-crop wrapper equal to per-crop calls with one forward per resolution."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.models import create_model
from engine.ssl.backbone import (MultiCropBackbone, interpolate_pos_embed, pooled_features, resolution_runs,
                                 truncate_pos_embed)

MODELS = ["vit_cifar", "vit_tiny_imagenet", "cait_cifar", "cait_tiny_imagenet", "swin_cifar", "swin_tiny_imagenet"]
VARIANTS = [dict(spt=False, lsa=False), dict(spt=True, lsa=True)]


def _build(name, **kw):
    """The model with CaiT's LayerScale (init 1e-5, which makes the blocks near-identities) raised to ~0.5, so the
    comparisons below see every block and the position embedding."""
    torch.manual_seed(0)
    model = create_model(name, drop_path=0.0, **kw).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "gamma" in pname:
                p.normal_(0.5, 0.1)
    return model


def _size(model):
    return model.patch_embed.img_size[0]


def _classifier(model):
    """The last linear layer (Swin's head pools first: its fc is the layer on the pooled features)."""
    return model.head.fc if hasattr(model.head, "fc") else model.head


# ------------------------------------------------------------------------------------------ interpolation
def _cubic(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
    if t < 2:
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a
    return 0.0


def _dino_resize_reference(pos: np.ndarray, k: int, gh: int, gw: int) -> np.ndarray:
    """DINO's formula by hand: (k, k, C) -> (gh, gw, C), scale s = (g + 0.1) / k per axis, source coordinate
    (dst + 0.5) / s - 0.5 (align_corners False), cubic convolution a = -0.75, edge samples clamped."""
    out = np.zeros((gh, gw, pos.shape[-1]))
    sh, sw = (gh + 0.1) / k, (gw + 0.1) / k
    for i in range(gh):
        y = (i + 0.5) / sh - 0.5
        y0 = math.floor(y)
        for j in range(gw):
            x = (j + 0.5) / sw - 0.5
            x0 = math.floor(x)
            for m in range(-1, 3):
                wy = _cubic(y - (y0 + m))
                for n in range(-1, 3):
                    wx = _cubic(x - (x0 + n))
                    out[i, j] += wy * wx * pos[min(max(y0 + m, 0), k - 1), min(max(x0 + n, 0), k - 1)]
    return out


@pytest.mark.parametrize("k, grid, prefix", [(8, 4, 1), (7, 3, 1), (5, 3, 0), (9, 4, 2), (3, 5, 1), (7, (3, 5), 1),
                                             (4, 2, 0)])
def test_interpolate_pos_embed_is_dinos_bicubic(k, grid, prefix):
    gen = torch.Generator().manual_seed(k)
    dim = 6
    pos = torch.randn(1, prefix + k * k, dim, generator=gen, dtype=torch.float64)
    out = interpolate_pos_embed(pos, grid, prefix)
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    assert out.shape == (1, prefix + gh * gw, dim)
    assert torch.equal(out[:, :prefix], pos[:, :prefix])                  # CLS rows untouched
    want = _dino_resize_reference(pos[0, prefix:].reshape(k, k, dim).numpy(), k, gh, gw)
    np.testing.assert_allclose(out[0, prefix:].reshape(gh, gw, dim).numpy(), want, rtol=1e-10, atol=1e-10)
    # the +0.1 scale factor, not size=(g, g), sets the sampling positions (they differ):
    by_size = torch.nn.functional.interpolate(pos[:, prefix:].reshape(1, k, k, dim).permute(0, 3, 1, 2),
                                              size=(gh, gw), mode="bicubic", align_corners=False)
    assert not torch.allclose(by_size.permute(0, 2, 3, 1).reshape(1, gh * gw, dim), out[:, prefix:])


def test_interpolate_pos_embed_same_grid_and_errors():
    pos = torch.randn(1, 1 + 16, 4)
    assert interpolate_pos_embed(pos, 4, 1) is pos
    with pytest.raises(ValueError, match="not a square grid"):
        interpolate_pos_embed(torch.randn(1, 1 + 15, 4), 2, 1)
    assert torch.equal(truncate_pos_embed(pos, 2, 1), pos[:, :5])


# ------------------------------------------------------------------------------------------ full size
@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "spt_lsa"])
@pytest.mark.parametrize("name", MODELS)
def test_full_size_is_the_classifiers_pre_logits(name, variant):
    model = _build(name, num_classes=10, **variant)
    x = torch.randn(2, 3, _size(model), _size(model))
    with torch.no_grad():
        feats = pooled_features(model, x)
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        assert torch.equal(feats, want)
        torch.testing.assert_close(_classifier(model)(feats), model(x), rtol=0, atol=0)
        torch.testing.assert_close(_classifier(model)(feats), model.forward_with_tokens(x).logits, rtol=1e-6, atol=1e-6)
    assert feats.shape == (2, 384 if name.startswith("swin") else 192)


def test_full_size_swin_with_ape_is_its_pre_logits():
    model = _build("swin_cifar", num_classes=10, ape=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(_classifier(model)(pooled_features(model, x)), model(x), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ half size
def _reference_at(model, name, half, variant, how="interpolate"):
    """timm's own ViT/CaiT built at the half size, with the DINO-resized position embedding loaded."""
    ref = _build(name, num_classes=0, img_size=half, **variant)
    state = model.state_dict()
    prefix = 1 if name.startswith("vit") else 0
    grid = ref.patch_embed.grid_size[0]
    resize = interpolate_pos_embed if how == "interpolate" else truncate_pos_embed
    state["pos_embed"] = resize(state["pos_embed"], grid, prefix)
    ref.load_state_dict(state)
    return ref


@pytest.mark.parametrize("variant", VARIANTS, ids=["plain", "spt_lsa"])
@pytest.mark.parametrize("name", ["vit_cifar", "vit_tiny_imagenet", "cait_cifar", "cait_tiny_imagenet"])
def test_half_size_vit_cait_equal_timm_built_for_that_size(name, variant):
    model = _build(name, num_classes=0, **variant)
    half = _size(model) // 2
    x = torch.randn(3, 3, half, half)
    ref = _reference_at(model, name, half, variant)
    with torch.no_grad():
        got = pooled_features(model, x)
        torch.testing.assert_close(got, ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
        assert got.shape == (3, 192)


def test_half_size_cait_truncate_is_bs_quirk():
    model = _build("cait_cifar", num_classes=0)
    x = torch.randn(2, 3, 16, 16)
    ref = _reference_at(model, "cait_cifar", 16, {}, how="truncate")
    with torch.no_grad():
        got = pooled_features(model, x, pos_embed_resize="truncate")
        torch.testing.assert_close(got, ref.forward_head(ref.forward_features(x), pre_logits=True),
                                   rtol=1e-5, atol=1e-5)
        assert (got - pooled_features(model, x)).abs().max() > 1e-3


def test_pretraining_network_takes_the_pos_embed_resize_from_config():
    """`ssl.pos_embed_resize=truncate` reaches the pretraining network: its local-crop features are B's truncation."""
    from engine.config import ConfigError, config_from_dict
    from engine.pretrain import build_network

    x = torch.randn(2, 3, 16, 16)
    for how in ("interpolate", "truncate"):
        cfg = config_from_dict({}, ["model.name=cait_cifar", f"ssl.pos_embed_resize={how}"])
        torch.manual_seed(0)
        network = build_network(cfg, 0.0).eval()
        with torch.no_grad():
            got = network.backbone([x])
            want = pooled_features(network.model, x, pos_embed_resize=how)
        assert torch.equal(got, want), how
    with pytest.raises(ConfigError, match="ssl.pos_embed_resize"):
        config_from_dict({}, ["ssl.pos_embed_resize=nearest"])


@pytest.mark.parametrize("variant", VARIANTS + [dict(spt=False, lsa=False, ape=True)], ids=["plain", "spt_lsa", "ape"])
@pytest.mark.parametrize("name", ["swin_cifar", "swin_tiny_imagenet"])
def test_half_size_swin_equals_timms_dynamic_size_swin(name, variant):
    """Reference: the same weights in timm's SwinTransformer built with strict_img_size=False (per-input shift
    masks, no size check; window sizes and shifts from the full-size build, small maps zero-padded)."""
    model = _build(name, num_classes=0, **variant)
    half = _size(model) // 2
    ref = _build(name, num_classes=0, strict_img_size=False, **variant)
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, half, half)
    if variant.get("spt"):   # our SPT stem checks the size; tokenize directly in the reference
        grid = half // ref.patch_embed.patch_size[0]
        ref.patch_embed.forward = lambda img: ref.patch_embed.spt(img).reshape(img.shape[0], grid, grid, -1)
    if variant.get("ape"):
        k, dim = model.absolute_pos_embed.shape[1], model.absolute_pos_embed.shape[-1]
        g = half // ref.patch_embed.patch_size[0]
        resized = interpolate_pos_embed(model.absolute_pos_embed.detach().reshape(1, k * k, dim), g, 0)
        ref.absolute_pos_embed = torch.nn.Parameter(resized.reshape(1, g, g, dim))
    with torch.no_grad():
        got = pooled_features(model, x)
        want = ref.forward_head(ref.forward_features(x), pre_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got.shape == (2, 384)
    # the call leaves the model as built: masks precomputed again, patch embedding strict again
    assert all(not block.dynamic_mask for stage in model.layers for block in stage.blocks)
    if not variant.get("spt"):
        assert model.patch_embed.strict_img_size


def test_half_size_swin_uses_the_built_windows_on_a_padded_last_stage():
    """The reference layout (B's Swin): at 16 px the stage grids are 8, 4, 2 and the windows stay 4, so the 2x2
    last-stage map is padded to one 4x4 window; stage-2 blocks keep their shift 2 (masked)."""
    model = _build("swin_cifar", num_classes=0)
    grids = []
    hooks = [stage.register_forward_hook(lambda m, i, o: grids.append(o.shape[1])) for stage in model.layers]
    with torch.no_grad():
        pooled_features(model, torch.randn(1, 3, 16, 16))
    for h in hooks:
        h.remove()
    assert grids == [8, 4, 2]
    assert [b.window_size for b in model.layers[2].blocks] == [(4, 4)] * 4
    assert [b.shift_size for b in model.layers[1].blocks][:2] == [(0, 0), (2, 2)]


def test_crop_not_divisible_by_patch_is_refused():
    model = _build("vit_cifar", num_classes=0)
    with pytest.raises(ValueError, match="not divisible by the patch size 4"):
        pooled_features(model, torch.randn(1, 3, 18, 18))
    with pytest.raises(TypeError, match="not a ViT, CaiT or Swin"):
        pooled_features(torch.nn.Linear(3, 3), torch.randn(1, 3, 16, 16))


# ------------------------------------------------------------------------------------------ multi-crop
def test_resolution_runs():
    crops = [torch.zeros(1, 3, s, s) for s in (32, 32, 16, 16, 16, 32, 16)]
    assert resolution_runs(crops) == [(0, 2), (2, 5), (5, 6), (6, 7)]


@pytest.mark.parametrize("name", ["vit_cifar", "cait_cifar", "swin_cifar"])
def test_multicrop_equals_per_crop_calls_with_one_forward_per_resolution(name):
    backbone = MultiCropBackbone(_build(name, num_classes=0))
    assert backbone.embed_dim == (384 if name.startswith("swin") else 192)
    gen = torch.Generator().manual_seed(1)
    crops = [torch.randn(3, 3, 32, 32, generator=gen) for _ in range(2)]
    crops += [torch.randn(3, 3, 16, 16, generator=gen) for _ in range(8)]
    calls = []
    hook = backbone.backbone.norm.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    with torch.no_grad():
        out = backbone(crops)
    hook.remove()
    assert calls == [6, 24]                                    # 2 forwards: the globals, then the locals
    assert out.shape == (30, backbone.embed_dim)
    with torch.no_grad():
        each = torch.cat([pooled_features(backbone.backbone, c) for c in crops])
    torch.testing.assert_close(out, each, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # interleaved sizes: one forward per consecutive run, rows still in input order
        mixed = [crops[2], crops[0], crops[1], crops[3]]
        torch.testing.assert_close(backbone(mixed), torch.cat([each[6:9], each[0:6], each[9:12]]),
                                   rtol=1e-5, atol=1e-5)


def test_multicrop_state_dict_has_dinos_backbone_prefix():
    backbone = MultiCropBackbone(_build("vit_cifar", num_classes=0))
    keys = list(backbone.state_dict())
    assert keys and all(k.startswith("backbone.") for k in keys)
    with pytest.raises(ValueError, match="pos_embed_resize"):
        MultiCropBackbone(_build("vit_cifar", num_classes=0), pos_embed_resize="nearest")


@pytest.mark.parametrize("name", ["vit_cifar", "cait_cifar", "swin_cifar"])
def test_gradient_reaches_every_backbone_parameter(name):
    model = _build(name, num_classes=0, **({"ape": True} if name.startswith("swin") else {})).train()
    backbone = MultiCropBackbone(model)
    gen = torch.Generator().manual_seed(2)
    crops = [torch.randn(2, 3, 32, 32, generator=gen), torch.randn(2, 3, 16, 16, generator=gen)]
    backbone(crops).square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    zero = [n for n, p in model.named_parameters() if p.grad is not None and not p.grad.abs().sum() > 0]
    assert not no_grad and not zero, (no_grad, zero)
