"""SPT and LSA pinned line by line against METHODS.md D, and their fast paths against plain references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.models import create_model
from engine.models.lsa import (LSAAttention, LSAClassAttn, LSATalkingHeadAttn, LSATalkingHeadAttnReference,
                               LSAWindowAttention)
from engine.models.spt import ShiftedPatchTokenization, SPTMerging, patchify, shift_diagonal


# ----------------------------------------------------------------------------------------------------- SPT
def test_spt_shift_layout_on_a_tiny_image():
    """4x4 single-channel image 1..16, shift 1: 5 channels [x, left-up, right-up, left-bottom, right-bottom]."""
    x = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
    out = shift_diagonal(x, 1)[0]
    assert out.shape == (5, 4, 4)
    expected_left_up = torch.tensor([[0, 0, 0, 0], [0, 1, 2, 3], [0, 5, 6, 7], [0, 9, 10, 11.]])
    expected_right_up = torch.tensor([[0, 0, 0, 0], [2, 3, 4, 0], [6, 7, 8, 0], [10, 11, 12, 0.]])
    expected_left_bottom = torch.tensor([[0, 5, 6, 7], [0, 9, 10, 11], [0, 13, 14, 15], [0, 0, 0, 0.]])
    expected_right_bottom = torch.tensor([[6, 7, 8, 0], [10, 11, 12, 0], [14, 15, 16, 0], [0, 0, 0, 0.]])
    torch.testing.assert_close(out[0], x[0, 0])
    torch.testing.assert_close(out[1], expected_left_up)
    torch.testing.assert_close(out[2], expected_right_up)
    torch.testing.assert_close(out[3], expected_left_bottom)
    torch.testing.assert_close(out[4], expected_right_bottom)


def test_spt_rgb_gives_15_channels_in_blocks_of_3():
    x = torch.randn(2, 3, 8, 8)
    out = shift_diagonal(x, 2)
    assert out.shape == (2, 15, 8, 8)
    torch.testing.assert_close(out[:, :3], x)
    torch.testing.assert_close(out[:, 3:6, 2:, 2:], x[:, :, :-2, :-2])      # left-up: x[i-s, j-s]
    assert out[:, 3:6, :2].abs().sum() == 0 and out[:, 3:6, :, :2].abs().sum() == 0   # zero padding


@pytest.mark.parametrize("shape,p", [((2, 3, 32, 32), 4), ((1, 3, 64, 64), 8), ((3, 5, 6, 6), 2)])
def test_patchify_matches_unfold_in_row_col_channel_order(shape, p):
    x = torch.randn(*shape)
    b, c, h, w = shape
    # F.unfold gives (B, C*p*p, L) in (c, p1, p2) order; reorder to (p1, p2, c)
    ref = F.unfold(x, p, stride=p).reshape(b, c, p, p, -1).permute(0, 4, 2, 3, 1).reshape(b, -1, p * p * c)
    torch.testing.assert_close(patchify(x, p), ref)


def test_spt_layer_is_layernorm_then_linear_of_15p2():
    torch.manual_seed(0)
    spt = ShiftedPatchTokenization(3, 24, 4)
    assert spt.norm.normalized_shape == (15 * 16,) and spt.proj.in_features == 240 and spt.proj.out_features == 24
    x = torch.randn(2, 3, 16, 16)
    ref = spt.proj(F.layer_norm(patchify(shift_diagonal(x, 2), 4), (240,), spt.norm.weight, spt.norm.bias))
    out = spt(x)
    assert out.shape == (2, 16, 24)
    torch.testing.assert_close(out, ref)


def test_spt_in_models_and_swin_merging():
    vit = create_model("vit_cifar", spt=True)
    assert vit.patch_embed.spt.proj.in_features == 15 * 4 * 4
    swin = create_model("swin_cifar", spt=True)
    assert swin.patch_embed.spt.proj.in_features == 15 * 2 * 2
    merges = [stage.downsample for stage in swin.layers if isinstance(stage.downsample, SPTMerging)]
    assert [(m.spt.proj.in_features, m.spt.proj.out_features) for m in merges] == [(20 * 96, 192), (20 * 192, 384)]
    x = torch.randn(2, 8, 8, 96)
    out = merges[0](x)
    ref = merges[0].spt(x.permute(0, 3, 1, 2)).reshape(2, 4, 4, 192)
    torch.testing.assert_close(out, ref)


# ----------------------------------------------------------------------------------------------------- LSA
def reference_lsa(x, qkv_weight, qkv_bias, heads, temperature, bias=None):
    """D's ViT attention with is_LSA, written out: dots = (q k^T) * scale[h]; dots[diag] = -987654321; softmax."""
    b, n, c = x.shape
    q, k, v = F.linear(x, qkv_weight, qkv_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(b, n, heads, -1).transpose(1, 2) for t in (q, k, v))
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * temperature.view(1, -1, 1, 1)
    if bias is not None:
        dots = dots + bias
    idx = torch.arange(n)
    dots[:, :, idx, idx] = -987654321.0
    attn = dots.softmax(-1)
    return torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, -1), attn


def test_lsa_temperature_init_is_dim_head_power_minus_half():
    vit = create_model("vit_cifar", lsa=True)
    t = vit.blocks[0].attn.temperature
    assert t.shape == (12,) and t.requires_grad
    torch.testing.assert_close(t.detach(), torch.full((12,), 16 ** -0.5))
    swin = create_model("swin_cifar", lsa=True)
    for stage, heads in zip(swin.layers, (3, 6, 12)):
        torch.testing.assert_close(stage.blocks[0].attn.temperature.detach(), torch.full((heads,), 32 ** -0.5))
    cait = create_model("cait_cifar", lsa=True)
    torch.testing.assert_close(cait.blocks[0].attn.temperature.detach(), torch.full((4,), 48 ** -0.5))
    torch.testing.assert_close(cait.blocks_token_only[0].attn.temperature.detach(), torch.full((4,), 48 ** -0.5))


def test_lsa_masks_the_diagonal_including_cls():
    torch.manual_seed(0)
    attn = LSAAttention(32, num_heads=4, qkv_bias=True)
    x = torch.randn(2, 9, 32)            # token 0 plays CLS
    probs = attn.attention_probs(x)
    assert probs.shape == (2, 4, 9, 9)
    assert torch.all(probs.diagonal(dim1=-2, dim2=-1) == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 9))


@pytest.mark.parametrize("n", [2, 9, 17])
@pytest.mark.parametrize("fused", [False, True])
def test_lsa_attention_matches_reference(n, fused):
    torch.manual_seed(n)
    attn = LSAAttention(48, num_heads=3, qkv_bias=True).eval()
    attn.fused_attn = fused
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.1, 0.5, 1.3]))
    x = torch.randn(3, n, 48)
    out_ref, probs_ref = reference_lsa(x, attn.qkv.weight, attn.qkv.bias, 3, attn.temperature)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn.proj(out_ref), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(attn.attention_probs(x), probs_ref, atol=1e-6, rtol=1e-5)


def test_lsa_temperature_learns():
    attn = LSAAttention(16, num_heads=2)
    attn(torch.randn(2, 5, 16)).square().sum().backward()
    assert attn.temperature.grad is not None and attn.temperature.grad.abs().sum() > 0


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shifted", [False, True])
def test_lsa_window_attention_matches_reference(fused, shifted):
    torch.manual_seed(1)
    attn = LSAWindowAttention(24, 3, window_size=2, qkv_bias=True).eval()
    attn.fused_attn = fused
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
        attn.temperature.copy_(torch.tensor([0.2, 0.7, 1.1]))
    num_win, n = 4, 4
    x = torch.randn(2 * num_win, n, 24)
    mask = None
    bias = attn._get_rel_pos_bias()                                       # (1, h, n, n)
    if shifted:
        mask = torch.where(torch.rand(num_win, n, n) < 0.3, -100.0, 0.0)
        bias = bias + mask.repeat(2, 1, 1)[:, None]                       # windows are batch-major
    out_ref, _ = reference_lsa(x, attn.qkv.weight, attn.qkv.bias, 3, attn.temperature, bias)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, mask), attn.proj(out_ref), atol=1e-5, rtol=1e-4)


def test_swin_lsa_replaces_every_window_attention_keeping_weights():
    torch.manual_seed(0)
    plain = create_model("swin_cifar", drop_path=0.0)
    torch.manual_seed(0)
    lsa = create_model("swin_cifar", drop_path=0.0, lsa=True)
    blocks = [blk for stage in lsa.layers for blk in stage.blocks]
    assert len(blocks) == 12 and all(isinstance(blk.attn, LSAWindowAttention) for blk in blocks)
    torch.testing.assert_close(lsa.layers[1].blocks[0].attn.qkv.weight, plain.layers[1].blocks[0].attn.qkv.weight)


def test_cait_lsa_masks_patch_attention_and_reference_quirk_does_not():
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16)
    masked = LSATalkingHeadAttn(16, num_heads=2, qkv_bias=True).eval()
    quirk = LSATalkingHeadAttnReference(16, num_heads=2, qkv_bias=True).eval()
    quirk.load_state_dict(masked.state_dict())
    with torch.no_grad():
        masked.proj_w.weight.copy_(torch.eye(2))         # make post-softmax mixing the identity to read probs
        masked.proj_w.bias.zero_()
        quirk.proj_w.load_state_dict(masked.proj_w.state_dict())
        captured = {}
        masked.attn_drop.register_forward_hook(lambda m, i, o: captured.__setitem__("masked", o))
        quirk.attn_drop.register_forward_hook(lambda m, i, o: captured.__setitem__("quirk", o))
        masked(x), quirk(x)
    assert torch.all(captured["masked"].diagonal(dim1=-2, dim2=-1) == 0)
    assert torch.all(captured["quirk"].diagonal(dim1=-2, dim2=-1) > 0)   # D's -1e-9 fill leaves it unmasked
    model = create_model("cait_cifar", lsa=True, lsa_reference_diagonal=True)
    assert isinstance(model.blocks[0].attn, LSATalkingHeadAttnReference)
    assert isinstance(model.blocks_token_only[0].attn, LSAClassAttn)


@pytest.mark.parametrize("fused", [False, True])
def test_lsa_class_attention_uses_temperature_without_mask(fused):
    torch.manual_seed(2)
    attn = LSAClassAttn(16, num_heads=2, qkv_bias=True).eval()
    attn.fused_attn = fused
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.3, 2.0]))
    x = torch.randn(2, 5, 16)
    b, n, c = x.shape
    q = attn.q(x[:, :1]).reshape(b, 1, 2, 8).transpose(1, 2)
    k = attn.k(x).reshape(b, n, 2, 8).transpose(1, 2)
    v = attn.v(x).reshape(b, n, 2, 8).transpose(1, 2)
    probs = ((q @ k.transpose(-2, -1)) * attn.temperature.view(1, -1, 1, 1)).softmax(-1)
    ref = attn.proj((probs @ v).transpose(1, 2).reshape(b, 1, c))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-4)
