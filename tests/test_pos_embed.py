"""model.pos_embed_init: the reference's learned init by default, a 2-D sin-cos grid on request."""
import pytest
import torch

from engine.models import create_model
from engine.models.pos_embed import init_pos_embed, sincos_grid


def test_sincos_grid_layout():
    code = sincos_grid(3, 8)                      # (9, 8): rows in channels 0..3, cols in 4..7
    assert code.shape == (9, 8)
    grid = code.reshape(3, 3, 8)
    assert torch.equal(grid[0, 0, :4], grid[0, 2, :4]) and torch.equal(grid[0, 0, 4:], grid[2, 0, 4:])
    assert not torch.equal(grid[0, 0, :4], grid[1, 0, :4])
    assert torch.equal(grid[1, 2, :2], torch.sin(torch.tensor([1.0, 1.0 / 10 ** 0.5])))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_grid(3, 6)


def test_init_writes_patch_rows_only():
    torch.manual_seed(0)
    model = create_model("vit_cifar", num_classes=10, depth=1)
    cls_row = model.pos_embed[0, 0].clone()
    init_pos_embed(model, "learned")
    assert torch.equal(model.pos_embed[0, 0], cls_row)
    init_pos_embed(model, "sincos")
    assert torch.equal(model.pos_embed[0, 0], cls_row)
    assert torch.equal(model.pos_embed[0, 1:], sincos_grid(8, 192))
    assert model.pos_embed.requires_grad


def test_model_without_absolute_position_embedding_is_refused():
    with pytest.raises(ValueError, match="no absolute position embedding"):
        init_pos_embed(create_model("swin_cifar", num_classes=10), "sincos")
