"""UNet specifics: zero-initialised output, periodic (circular) padding, sizes that
are not multiples of 2**levels, configuration errors."""

from __future__ import annotations

import pytest
import torch
from tests.nets.conftest import make_unet, randomize_zeros

from scidiff.nets import UNet


def test_output_projection_zero_initialised():
    model = make_unet(2, 2, learned_variance=True)
    assert model.out_conv.conv.weight.shape[0] == 4
    assert not model.out_conv.conv.weight.any() and not model.out_conv.conv.bias.any()
    out = model(torch.randn(2, 2, 16, 24), torch.tensor([0, 999]))
    assert torch.equal(out, torch.zeros_like(out))
    # the residual branches start at zero too (each block is the identity at init)
    assert not model.down[0][0].conv2.conv.weight.any()


def _roll_error(model: UNet, x: torch.Tensor, shift: int, axis: int) -> float:
    t = torch.tensor([7] * x.shape[0])
    with torch.no_grad():
        rolled_out = model(torch.roll(x, shift, dims=axis), t)
        out_rolled = torch.roll(model(x, t), shift, dims=axis)
    return ((rolled_out - out_rolled).abs().max() / out_rolled.abs().max()).item()


CIRC = {
    "channel_mult": (1, 2, 2),
    "attention_levels": (),
    "mid_attention": False,
}  # 2**levels = 4


@pytest.mark.parametrize(
    ("dims", "shape"), [(1, (24,)), (2, (12, 20)), (3, (8, 8, 12))]
)
def test_circular_padding_is_roll_equivariant(dims, shape):
    torch.manual_seed(0)
    model = randomize_zeros(make_unet(1, dims, padding="circular", **CIRC)).eval()
    x = torch.randn(2, 1, *shape)
    for axis in range(2, 2 + dims):
        assert _roll_error(model, x, 4, axis) < 1e-5
        assert _roll_error(model, x, -8, axis) < 1e-5


def test_roll_equivariance_only_along_periodic_axis():
    """A lat/lon grid: zeros in latitude, circular in longitude."""
    torch.manual_seed(0)
    model = randomize_zeros(
        make_unet(1, 2, padding=["zeros", "circular"], **CIRC)
    ).eval()
    x = torch.randn(2, 1, 12, 20)
    assert _roll_error(model, x, 4, axis=3) < 1e-5
    # the check can fail: latitude is not periodic
    assert _roll_error(model, x, 4, axis=2) > 1e-2
    # nor is a shift that is not a multiple of 2**levels
    assert _roll_error(model, x, 1, axis=3) > 1e-2


def test_zero_padding_is_not_roll_equivariant():
    torch.manual_seed(0)
    model = randomize_zeros(make_unet(1, 1, padding="zeros", **CIRC)).eval()
    assert _roll_error(model, torch.randn(2, 1, 24), 4, axis=2) > 1e-2


def test_reflect_padding_runs():
    model = make_unet(1, 2, padding="reflect")
    assert model(torch.randn(1, 1, 16, 8), torch.tensor([3])).shape == (1, 1, 16, 8)


def test_sizes_not_divisible_are_padded_and_cropped():
    model = randomize_zeros(
        make_unet(1, 2, channel_mult=(1, 2, 2), padding=["reflect", "zeros"])
    ).eval()
    x = torch.randn(2, 1, 23, 37)
    out = model(x, torch.tensor([1, 2]))
    assert out.shape == (2, 1, 23, 37)


def test_sizes_not_divisible_refused_on_circular_axis_or_when_asked():
    model = make_unet(1, 2, channel_mult=(1, 2, 2), padding=["zeros", "circular"])
    with pytest.raises(
        ValueError, match=r"\(24, 38\).*divisible by 2\*\*levels = 4.*axes \[1\]"
    ):
        model(torch.randn(1, 1, 24, 38), torch.tensor([0]))
    strict = make_unet(1, 1, channel_mult=(1, 2), pad_to_multiple=False)
    with pytest.raises(ValueError, match=r"\(33,\).*= 2"):
        strict(torch.randn(1, 1, 33), torch.tensor([0]))


def test_constructor_errors():
    with pytest.raises(ValueError, match="padding"):
        make_unet(1, 2, padding="periodic")
    with pytest.raises(ValueError, match="padding needs one entry per spatial axis"):
        make_unet(1, 2, padding=["zeros"])
    with pytest.raises(ValueError, match=r"attention_levels \[2\]"):
        make_unet(1, 2, channel_mult=(1, 2), attention_levels=(2,))
    with pytest.raises(ValueError, match="field_resample"):
        make_unet(1, 2, field_channels=1, field_resample="cubic")
