"""Our networks against the references' own definitions: D's ViT and CaiT (SPT_LSA_ViT) forward for forward on the
same weights (figures of D's code in tests/fixtures/reference_d.json, made by tests/fixtures/make_reference_d.py),
parameter counts, LayerNorm eps, drop-path per block, init statistics over large tensors, and B's init quirks."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from engine.models import create_model
from engine.models.cait_d import DTalkingHeadAttention
from engine.models.options import block_drop_path_rates
from engine.models.pretrained import load_backbone_weights

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "reference_d.json"
D_VIT = dict(qkv_bias=False, norm_eps=1e-5, drop_path_schedule="constant", init="d")   # D's ViT as vit_* options
# fixture case -> how D builds it (make_reference_d.py) and how we do
CASES = {
    "vit": {"family": "vit", "spt": False, "lsa": False, "ours": ("vit_cifar", D_VIT)},
    "vit_spt_lsa": {"family": "vit", "spt": True, "lsa": True, "ours": ("vit_cifar", D_VIT)},
    "cait": {"family": "cait", "spt": False, "lsa": False, "ours": ("cait_d_cifar", {})},
    "cait_spt_lsa": {"family": "cait", "spt": True, "lsa": True, "ours": ("cait_d_cifar", {})},   # D's diagonal
}
# parameter counts only: (family, image size, classes, spt, lsa)
COUNT_CASES = {"vit_c100_spt_lsa": ("vit", 32, 100, True, True), "vit_tiny_spt_lsa": ("vit", 64, 200, True, True),
               "cait_tiny_spt_lsa": ("cait", 64, 200, True, True), "cait_c100": ("cait", 32, 100, False, False)}
COUNT_MODELS = {"vit_c100_spt_lsa": ("vit_cifar", 100, D_VIT), "vit_tiny_spt_lsa": ("vit_tiny_imagenet", 200, D_VIT),
                "cait_tiny_spt_lsa": ("cait_d_tiny_imagenet", 200, {}), "cait_c100": ("cait_d_cifar", 100, {})}


def reference_weights(shapes: list) -> dict[str, torch.Tensor]:
    """One fixed tensor per [key, shape] in order (seed 0): N(0, 1/fan) for tensors of 2+ dims (fan = last dim),
    N(0, 0.25) for vectors. Both D's network (for the fixture) and ours (for the test) load exactly these."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for key, shape in shapes:
        t = torch.randn(shape, generator=gen)
        out[key] = t / math.sqrt(shape[-1]) if len(shape) >= 2 else 0.5 * t
    return out


def reference_input(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def figures() -> dict:
    return json.loads(FIXTURE.read_text())


def build(case: str, **kw) -> nn.Module:
    spec = CASES[case]
    name, options = spec["ours"]
    return create_model(name, num_classes=10, spt=spec["spt"], lsa=spec["lsa"], **options, **kw)


# ------------------------------------------------------------------------------------------ D's networks
@pytest.mark.parametrize("case", sorted(CASES))
def test_d_state_dict_loads_by_the_name_map_and_gives_ds_logits(figures, case):
    """D's whole state dict renames onto ours (nothing missing, unexpected or mismatched), and on the same
    weights and input our forward equals D's (its logits recorded by make_reference_d.py)."""
    want = figures["cases"][case]
    model = build(case, drop_path=0.1).eval()
    report = load_backbone_weights(model, reference_weights(want["state_dict"]))
    assert (report.missing, report.unexpected, report.mismatched) == ([], [], []), report.summary()
    assert report.references == ["D"] and len(report.renamed) == len(want["state_dict"]) - 1   # cls_token as is
    with torch.no_grad():
        logits = model(reference_input(32))
    torch.testing.assert_close(logits, torch.tensor(want["logits"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_parameter_counts_equal_ds(figures, case):
    assert count(build(case)) == figures["cases"][case]["params"]


@pytest.mark.parametrize("case", sorted(COUNT_CASES))
def test_parameter_counts_equal_ds_at_other_sizes(figures, case):
    name, classes, options = COUNT_MODELS[case]
    _, _, _, spt, lsa = COUNT_CASES[case]
    assert count(create_model(name, num_classes=classes, spt=spt, lsa=lsa, **options)) == figures["counts"][case]


def test_the_issues_parameter_counts():
    """D's ViT SPT+LSA and CaiT SPT+LSA for CIFAR-10, as D's code counts them."""
    assert count(create_model("vit_cifar", spt=True, lsa=True, **D_VIT)) == 2_729_878
    assert count(create_model("cait_d_cifar", spt=True, lsa=True)) == 9_058_066
    assert count(create_model("vit_cifar", spt=True, lsa=True)) == 2_735_062          # B's options: + qkv bias


def layer_norm_eps(model: nn.Module) -> set[float]:
    return {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}


@pytest.mark.parametrize("name,options,eps", [
    ("vit_cifar", D_VIT, 1e-5), ("cait_d_cifar", {}, 1e-5), ("vit_cifar", {}, 1e-6), ("cait_cifar", {}, 1e-6),
    ("swin_cifar", {}, 1e-6), ("vit_cifar", {"norm_eps": 1e-3}, 1e-3)])
def test_layer_norm_eps_in_blocks_and_head_norm(name, options, eps):
    model = create_model(name, **options)          # no SPT: its own LayerNorm is D's, eps 1e-5 always
    assert layer_norm_eps(model) == {eps}
    assert model.norm.eps == eps


def test_qkv_bias_follows_the_reference():
    assert all(b.attn.qkv.bias is None for b in create_model("vit_cifar", **D_VIT).blocks)
    assert all(b.attn.qkv.bias is not None for b in create_model("vit_cifar").blocks)
    cait = create_model("cait_d_cifar")
    assert all(b.attn.q.bias is None and b.attn.kv.bias is None for b in [*cait.blocks, *cait.blocks_token_only])


def test_drop_path_per_block():
    """D: one DropPath(0.1) in every block (CaiT's class blocks too); B's ViT: timm's linear 0 -> 0.1; B's CaiT:
    constant on the 24 patch blocks, none in the class blocks; the schedule switch flips either."""
    assert block_drop_path_rates(create_model("vit_cifar", **D_VIT).blocks) == pytest.approx([0.1] * 9)
    assert block_drop_path_rates(create_model("vit_cifar").blocks) == pytest.approx([i / 80 for i in range(9)])
    assert block_drop_path_rates(create_model("vit_cifar", drop_path_schedule="constant").blocks) == \
        pytest.approx([0.1] * 9)
    cait_d = create_model("cait_d_cifar")
    assert block_drop_path_rates([*cait_d.blocks, *cait_d.blocks_token_only]) == pytest.approx([0.1] * 26)
    cait_b = create_model("cait_cifar")
    assert block_drop_path_rates(cait_b.blocks) == pytest.approx([0.1] * 24)
    assert block_drop_path_rates(cait_b.blocks_token_only) == [0.0, 0.0]
    assert block_drop_path_rates(create_model("cait_cifar", drop_path_schedule="linear").blocks) == \
        pytest.approx([0.1 * i / 23 for i in range(24)])
    swin = create_model("swin_cifar", drop_path_schedule="constant")
    assert block_drop_path_rates([b for s in swin.layers for b in s.blocks]) == pytest.approx([0.1] * 12)


def test_d_cait_layer_shapes_layer_scale_and_temperature():
    model = create_model("cait_d_cifar", spt=True, lsa=True)
    attn = model.blocks[0].attn
    assert (attn.q.weight.shape, attn.kv.weight.shape, attn.proj.weight.shape) == ((256, 192), (512, 192), (192, 256))
    assert attn.mix_pre.shape == attn.mix_post.shape == (4, 4)
    assert not any("proj_l" in k or "proj_w" in k for k in model.state_dict())      # mixing without bias
    assert [float(b.gamma_1[0].detach()) for b in model.blocks] == pytest.approx([0.1] * 18 + [1e-5] * 6)
    assert [float(b.gamma_2[-1].detach()) for b in model.blocks_token_only] == pytest.approx([0.1, 0.1])
    temps = torch.stack([b.attn.temperature for b in [*model.blocks, *model.blocks_token_only]])
    assert torch.equal(temps, torch.full((26, 4), 0.125))                           # 64 ** -0.5
    assert model.blocks_token_only[0].mlp.fc1.out_features == 384


def test_d_cait_class_attention_reads_unnormed_patches_and_not_cls():
    """D's class block: q from norm1(cls); k, v from the patch tokens as given (no norm, no CLS among them)."""
    torch.manual_seed(0)
    model = create_model("cait_d_cifar", depth=1, depth_token_only=1).eval()
    block = model.blocks_token_only[0]
    x, cls = torch.randn(2, 64, 192), torch.randn(2, 1, 192)
    with torch.no_grad():
        got = block(x, cls)
        attn = block.attn(block.norm1(cls), context=x)
        y = cls + block.gamma_1 * attn
        torch.testing.assert_close(got, y + block.gamma_2 * block.mlp(block.norm2(y)))
        # scaling the patches changes the result (they are not normed before k, v)
        assert not torch.allclose(block(3 * x, cls), got)


def test_d_cait_lsa_masks_the_diagonal_after_mixing_unless_reference():
    torch.manual_seed(0)
    attn = DTalkingHeadAttention(16, num_heads=2, dim_head=8, lsa=True, mask_diagonal=True).eval()
    with torch.no_grad():
        attn.mix_pre.copy_(torch.eye(2))
        attn.mix_post.copy_(torch.eye(2))
    x = torch.randn(1, 5, 16)
    q = attn._heads(attn.q(x)) * attn.temperature.view(1, -1, 1, 1)
    k, v = (attn._heads(t) for t in attn.kv(x).chunk(2, dim=-1))
    logits = q @ k.transpose(-2, -1)
    masked = logits.masked_fill(torch.eye(5, dtype=torch.bool), float("-inf")).softmax(-1)
    want = attn.proj((masked @ v).transpose(1, 2).reshape(1, 5, 16))
    torch.testing.assert_close(attn(x), want)
    attn.reference_diagonal = True          # D's "mask": the diagonal logit becomes -1e-9 and keeps its weight
    kept = logits.masked_fill(torch.eye(5, dtype=torch.bool), -1e-9).softmax(-1)
    assert kept.diagonal(dim1=-2, dim2=-1).min() > 0.01
    torch.testing.assert_close(attn(x), attn.proj((kept @ v).transpose(1, 2).reshape(1, 5, 16)))


# -------------------------------------------------------------------------------------------- init
def std(t: torch.Tensor) -> float:
    return t.detach().double().std().item()


def test_d_init_statistics():
    """D: xavier-normal Linear weights (std sqrt(2 / (in + out))), zero biases, LayerNorm 1/0, the conv patch
    embedding as D's Linear(48, 192), pos_embed and cls_token N(0, 1); CaiT's mixing matrices N(0, 1)."""
    torch.manual_seed(0)
    vit = create_model("vit_cifar", embed_dim=768, num_heads=12, depth=1, **D_VIT)
    qkv = vit.blocks[0].attn.qkv.weight                                          # (2304, 768): 1.8M values
    assert std(qkv) == pytest.approx(math.sqrt(2 / (768 + 2304)), rel=0.01)
    assert abs(qkv.mean().item()) < 1e-3
    fc1 = vit.blocks[0].mlp.fc1
    assert std(fc1.weight) == pytest.approx(math.sqrt(2 / (768 + 1536)), rel=0.01) and not fc1.bias.any()
    assert std(vit.patch_embed.proj.weight) == pytest.approx(math.sqrt(2 / (48 + 768)), rel=0.02)
    assert std(vit.pos_embed) == pytest.approx(1.0, rel=0.02)                   # 65 x 768
    assert std(vit.cls_token) == pytest.approx(1.0, rel=0.1)                    # 768 values
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any()
               for m in vit.modules() if isinstance(m, nn.LayerNorm))
    spt = create_model("vit_cifar", spt=True, **D_VIT).patch_embed.spt.proj.weight           # Linear(240, 192)
    assert std(spt) == pytest.approx(math.sqrt(2 / (240 + 192)), rel=0.02)
    cait = create_model("cait_d_cifar", depth=24)
    mix = torch.stack([b.attn.mix_pre for b in cait.blocks])                      # 24 x 16 values
    assert std(mix) == pytest.approx(1.0, rel=0.15)
    assert std(cait.blocks[0].attn.kv.weight) == pytest.approx(math.sqrt(2 / (192 + 512)), rel=0.02)


def test_b_init_cls_token_and_caits_patch_embedding():
    """B's ViT draws its cls_token trunc-normal(0.02) (timm: normal(1e-6)); B's CaiT patch embedding is a Linear,
    trunc-normal(0.02) with a zero bias (timm's conv: PyTorch's default, std 1/sqrt(3*48))."""
    torch.manual_seed(0)
    b = create_model("vit_cifar", embed_dim=4096, num_heads=16, depth=1)
    assert std(b.cls_token) == pytest.approx(0.02, rel=0.05)
    timm_cls = create_model("vit_cifar", embed_dim=4096, num_heads=16, depth=1, init="timm").cls_token
    assert std(timm_cls) == pytest.approx(1e-6, rel=0.05)
    cait = create_model("cait_cifar", embed_dim=1024, num_heads=4, depth=1)
    assert std(cait.patch_embed.proj.weight) == pytest.approx(0.02, rel=0.02) and not cait.patch_embed.proj.bias.any()
    timm_patch = create_model("cait_cifar", embed_dim=1024, num_heads=4, depth=1, init="timm").patch_embed.proj
    assert std(timm_patch.weight) == pytest.approx(1 / math.sqrt(3 * 48), rel=0.02)


@pytest.mark.parametrize("name,init", [("swin_cifar", "d"), ("cait_cifar", "d"), ("cait_d_cifar", "b")])
def test_an_init_a_model_does_not_define_is_refused(name, init):
    with pytest.raises(ValueError, match="model.init"):
        create_model(name, init=init)


# ------------------------------------------------------------------------------------------ config keys
def test_config_keys_reach_the_model():
    from engine.config import ConfigError, config_from_dict
    from engine.models.options import model_kwargs

    cfg = config_from_dict({"model": {"qkv_bias": False, "norm_eps": 1e-5, "drop_path_schedule": "constant",
                                      "init": "d", "depth": 2}})
    model = create_model("vit_cifar", **model_kwargs(cfg.model))
    assert model.blocks[0].attn.qkv.bias is None and layer_norm_eps(model) == {1e-5}
    assert block_drop_path_rates(model.blocks) == pytest.approx([0.1, 0.1])
    assert std(model.pos_embed) > 0.5                                                    # D's randn
    defaults = model_kwargs(config_from_dict({}).model)
    assert set(defaults) == {"drop_path", "spt", "lsa"}                                  # 'reference' passes nothing
    diag = config_from_dict({"model": {"name": "cait_d_cifar", "lsa": True, "lsa_reference_diagonal": False}})
    cait = create_model("cait_d_cifar", depth=1, **model_kwargs(diag.model))
    assert cait.blocks[0].attn.reference_diagonal is False
    assert create_model("cait_d_cifar", depth=1, lsa=True).blocks[0].attn.reference_diagonal is True
    with pytest.raises(ConfigError, match="model.lsa_reference_diagonal"):
        config_from_dict({"model": {"lsa_reference_diagonal": True}})
    with pytest.raises(ConfigError, match="model.qkv_bias"):
        config_from_dict({"model": {"qkv_bias": "no"}})
