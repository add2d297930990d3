"""UNet specifics: zero-initialised output, periodic (circular) padding, sizes that
are not multiples of 2**levels, configuration errors."""

from __future__ import annotations

import pytest
import torch
from tests.nets.conftest import make_unet, randomize_zeros

from scidiff.conditioning import Conditioning
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
    with pytest.raises(ValueError, match="norm must be one of group, none, got 'layer'"):
        make_unet(1, 2, norm="layer")


def _group_sizes(model: torch.nn.Module) -> list[tuple[int, int]]:
    return [(m.num_channels, m.num_groups) for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]


@pytest.mark.parametrize("dims, shape", [(1, (16,)), (2, (8, 12)), (3, (4, 4, 8))])
def test_one_channel_a_group_is_blind_to_the_domain_mean(dims, shape):
    """Why ``norm_group_channels`` exists: with one channel per GroupNorm group (instance norm) and
    periodic padding, every block's branch and the output head remove each channel's spatial mean,
    so adding a constant to the input leaves the output unchanged: the network cannot denoise a
    field's domain mean (the k = 0 mode). With groups of 4 channels (the default) it can."""
    torch.manual_seed(0)
    kw = dict(model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), mid_attention=True,
              head_channels=8, padding="circular", num_params=1)
    x, t = torch.randn(3, 1, *shape), torch.tensor([10, 400, 900])
    cond = Conditioning(params=torch.randn(3, 1))
    blind = randomize_zeros(UNet(1, dims=dims, norm_group_channels=1, **kw)).eval()
    assert all(groups == channels for channels, groups in _group_sizes(blind))   # every norm an instance norm
    torch.testing.assert_close(blind(x + 1.5, t, cond), blind(x, t, cond), atol=1e-4, rtol=1e-4)
    seeing = randomize_zeros(UNet(1, dims=dims, **kw)).eval()
    shift = (seeing(x + 1.5, t, cond) - seeing(x, t, cond)).flatten(1).mean(1)
    assert shift.abs().min() > 1e-2


@pytest.mark.parametrize("dims, shape, far", [(1, (128,), (100,)), (2, (64, 64), (50, 50))])
def test_without_normalisation_the_output_is_local_and_with_groupnorm_it_is_not(dims, shape, far):
    """Why ``norm: none`` exists: GroupNorm divides every feature by statistics of the whole
    sample, so a change at one point of the input changes the output everywhere (a generated
    field's distant points and scales are scaled together). Without normalisation the output at a
    point depends only on the input within the receptive field (here a few points: one level,
    two residual blocks of 3-wide convolutions, no attention)."""
    torch.manual_seed(0)
    kw = dict(model_channels=8, channel_mult=(1,), num_res_blocks=1, attention_levels=(), mid_attention=False,
              head_channels=8, num_params=1)
    x, t = torch.randn(2, 1, *shape), torch.tensor([10, 600])
    cond = Conditioning(params=torch.randn(2, 1))
    bumped = x.clone()
    bumped[(slice(None), 0) + (0,) * dims] += 5.0   # one point at the corner
    for norm, moves in (("none", False), ("group", True)):
        net = randomize_zeros(UNet(1, dims=dims, norm=norm, **kw)).eval()
        assert any(isinstance(m, torch.nn.GroupNorm) for m in net.modules()) == (norm == "group")
        with torch.no_grad():
            change = (net(bumped, t, cond) - net(x, t, cond))[(slice(None), 0) + far].abs().max()
        assert (change > 1e-4) == moves, (norm, float(change))


def test_norm_groups_keep_four_channels_and_one_rebuilds_the_old_rule():
    """Every GroupNorm of the default UNet and autoencoder has >= 4 channels a group (at most 32
    groups); ``norm_group_channels=1`` gives each the old rule, gcd(channels, 32) groups, so a
    checkpoint trained before the key rebuilds exactly."""
    import math

    from scidiff.nets import FieldAutoencoder
    from scidiff.nets.layers import group_norm

    assert [group_norm(c, min_group_channels=4).num_groups for c in (8, 16, 24, 48, 64, 128, 512)] == \
        [2, 4, 4, 8, 16, 32, 32]
    for new, old in ((make_unet(1, 2), make_unet(1, 2, norm_group_channels=1)),
                     (FieldAutoencoder(1, dims=2, model_channels=16, downsample=2),
                      FieldAutoencoder(1, dims=2, model_channels=16, downsample=2, norm_group_channels=1))):
        assert all(c // g >= 4 and g <= 32 for c, g in _group_sizes(new))
        assert all(g == math.gcd(c, 32) for c, g in _group_sizes(old))
        assert new.state_dict().keys() == old.state_dict().keys()   # the same weights fit both
    with pytest.raises(ValueError, match="norm_group_channels must be >= 1"):
        make_unet(1, 2, norm_group_channels=0)
    with pytest.raises(ValueError, match="norm_group_channels: expected a positive integer"):
        FieldAutoencoder(1, dims=2, norm_group_channels=0)
