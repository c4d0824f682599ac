"""Every registered model carries its own `pooled_features(x, pos_embed_resize=...)`, also when built through
timm's registry, and the position-embedding resize lives in engine/models/pos_embed.py."""
from __future__ import annotations

import pytest
import timm
import torch

from engine.models import create_model, list_models
from engine.models.pos_embed import interpolate_pos_embed, resize_pos_embed, truncate_pos_embed

TINY = {"vit": dict(depth=1, embed_dim=32, num_heads=2), "cait": dict(depth=1, embed_dim=32, num_heads=2),
        "swin": dict(depths=(1, 1, 1), embed_dim=16, num_heads=(1, 1, 1))}


def _tiny(name: str, build=create_model, **kw):
    family = "cait" if name.startswith("cait") else name.split("_")[0]
    torch.manual_seed(0)
    return build(name, num_classes=0, drop_path=0.0, **TINY[family], **kw).eval()


@pytest.mark.parametrize("name", list_models())
def test_every_model_pools_at_its_size_and_at_half_size(name):
    model = _tiny(name)
    size = model.patch_embed.img_size[0]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full = model.pooled_features(x)
        torch.testing.assert_close(full, model.forward_head(model.forward_features(x), pre_logits=True),
                                   rtol=0, atol=0)
        half = model.pooled_features(x[..., : size // 2, : size // 2])
    assert full.shape == half.shape == (2, model.num_features)
    assert torch.isfinite(half).all()


def test_a_model_from_timms_registry_has_the_method():
    model = _tiny("swin_cifar", build=timm.create_model, spt=True)
    with torch.no_grad():
        assert model.pooled_features(torch.randn(1, 3, 16, 16)).shape == (1, model.num_features)


def test_spt_patch_embedding_keeps_its_size_check_unless_switched_off():
    model = _tiny("vit_cifar", spt=True)
    with pytest.raises(ValueError, match="built for"):
        model.patch_embed(torch.randn(1, 3, 16, 16))
    model.patch_embed.strict_img_size = False
    assert model.patch_embed(torch.randn(1, 3, 16, 16)).shape == (1, 16, 32)


def test_resize_by_name():
    pos = torch.randn(1, 1 + 16, 4)
    assert torch.equal(resize_pos_embed(pos, (2, 2), 1, "interpolate"), interpolate_pos_embed(pos, 2, 1))
    assert torch.equal(resize_pos_embed(pos, (2, 2), 1, "truncate"), truncate_pos_embed(pos, 2, 1))
    with pytest.raises(ValueError, match="pos_embed_resize"):
        resize_pos_embed(pos, (2, 2), 1, "nearest")
