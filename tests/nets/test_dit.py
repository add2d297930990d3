"""DiT specifics: exactly zero output at init, N-d patchify/unpatchify, position embeddings."""

from __future__ import annotations

import math

import pytest
import torch
from tests.nets.conftest import GRIDS, make_dit

from scidiff.conditioning import Conditioning
from scidiff.nets.dit import sincos_1d, sincos_position_embedding


@pytest.mark.parametrize(("dims", "shape", "patch"), GRIDS)
def test_output_exactly_zero_at_init(dims, shape, patch):
    torch.manual_seed(0)
    model = make_dit(
        2, dims, patch_size=patch, num_params=2, field_channels=1, learned_variance=True
    )
    cond = Conditioning(params=torch.randn(2, 2), fields=torch.randn(2, 1, *shape))
    out = model(torch.randn(2, 2, *shape), torch.tensor([0, 999]), cond)
    assert out.shape == (2, 4, *shape)
    assert torch.equal(out, torch.zeros_like(out))
    # but the input does reach the last hidden layer (only the final projection is zero)
    assert model.patch_embed.weight.abs().sum() > 0


@pytest.mark.parametrize(("dims", "shape", "patch"), GRIDS)
def test_unpatchify_places_each_token_on_its_patch(dims, shape, patch):
    model = make_dit(1, dims, patch_size=patch)
    p = model.patch_size
    grid = [s // q for s, q in zip(shape, p)]
    k = math.prod(grid) - 2  # a token near the end, row-major order
    h = torch.zeros(1, math.prod(grid), math.prod(p))
    h[0, k] = torch.arange(1, math.prod(p) + 1, dtype=torch.float32)
    out = model.unpatchify(h, grid, 1)[0, 0]
    index = torch.unravel_index(torch.tensor(k), grid)
    region = tuple(slice(int(i) * q, (int(i) + 1) * q) for i, q in zip(index, p))
    # the token's values fill exactly its patch, in row-major order within the patch
    assert torch.equal(out[region].flatten(), h[0, k])
    assert out.sum() == h.sum()


def test_patchify_then_unpatchify_is_identity():
    """A patch embedding that copies pixels, read back by unpatchify, reproduces x."""
    model = make_dit(1, 2, patch_size=(2, 4), hidden_size=8, num_heads=2)
    x = torch.randn(2, 1, 6, 12)
    with torch.no_grad():
        w = torch.eye(8).reshape(8, 1, 2, 4)
        tokens = torch.nn.functional.conv2d(x, w, stride=(2, 4))  # [B, 8, 3, 3]
    back = model.unpatchify(tokens.flatten(2).transpose(1, 2), (3, 3), 2)
    assert torch.equal(back, x)


def test_size_not_divisible_by_patch():
    model = make_dit(1, 2, patch_size=(4, 8))
    with pytest.raises(ValueError, match=r"\(24, 36\).*divisible by \(4, 8\)"):
        model(torch.randn(1, 1, 24, 36), torch.tensor([0]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="patch_size needs one entry per spatial axis"):
        make_dit(1, 3, patch_size=(2, 2))
    with pytest.raises(ValueError, match="num_heads"):
        make_dit(1, 2, hidden_size=50, num_heads=4)


def test_sincos_1d_formula():
    emb = sincos_1d(torch.tensor([0.0, 3.0]), 8)
    w = 10_000.0 ** (-torch.arange(4, dtype=torch.float64) / 4)
    torch.testing.assert_close(emb[1], torch.cat([torch.sin(3 * w), torch.cos(3 * w)]))
    torch.testing.assert_close(
        emb[0], torch.tensor([0.0] * 4 + [1.0] * 4, dtype=torch.float64)
    )


@pytest.mark.parametrize("grid", [(32, 64), (6, 6, 6), (40,)])
def test_position_embedding_any_grid(grid):
    emb = sincos_position_embedding(grid, 48)
    assert emb.shape == (math.prod(grid), 48)
    # every token gets its own embedding
    assert torch.cdist(emb, emb).add(torch.eye(len(emb)) * 1e3).min() > 1e-3
    # each axis uses its own channel block: moving along the last axis leaves the first block alone
    if len(grid) > 1:
        per = 48 // len(grid)
        torch.testing.assert_close(emb[0, :per], emb[1, :per])
        assert not torch.allclose(emb[0, -per:], emb[1, -per:])
