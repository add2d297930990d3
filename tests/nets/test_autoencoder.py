"""The latent-diffusion autoencoder, its losses and the latent codec, in 1-D, 2-D and 3-D:
shapes on non-square grids, the boundary carried through the bottleneck, the KL term against
torch.distributions, the radial spectrum against single Fourier modes, masks, and the
codec's normalisation round trip."""

from __future__ import annotations

import math

import pytest
import torch

from scidiff.nets.autoencoder import DiagonalGaussian, FieldAutoencoder, pixel_loss, radial_power, spectral_loss
from scidiff.nets.latent import LatentCodec

CASES = [  # dims, grid, downsample, padding
    (1, (48,), 4, "reflect"),
    (2, (16, 24), [2, 4], ["reflect", "circular"]),
    (3, (8, 16, 8), [2, 4, 1], "circular"),
]


@pytest.mark.parametrize(("dims", "grid", "downsample", "padding"), CASES)
def test_shapes_per_axis_factors_and_non_square_grids(dims, grid, downsample, padding):
    torch.manual_seed(0)
    ae = FieldAutoencoder(3, dims, latent_channels=2, downsample=downsample, model_channels=8, padding=padding)
    x = torch.randn(2, 3, *grid)
    recon, post = ae(x)
    factors = downsample if isinstance(downsample, list) else [downsample] * dims
    expected = (2, *(s // f for s, f in zip(grid, factors)))
    assert tuple(post.mean.shape) == (2, *expected) == (2, *ae.latent_shape(grid))
    assert recon.shape == x.shape
    assert post.kl().shape == (2,) and pixel_loss(recon, x).shape == (2,) and spectral_loss(recon, x).shape == (2,)


def test_a_grid_not_divisible_by_the_factor_names_downsample():
    ae = FieldAutoencoder(1, 2, downsample=[4, 2], model_channels=8)
    with pytest.raises(ValueError, match=r"downsample: grid axis 0 has 18 points, not divisible by .* factor 4"):
        ae.encode(torch.zeros(1, 1, 18, 16))
    with pytest.raises(ValueError, match="downsample: expected a power of two"):
        FieldAutoencoder(1, 2, downsample=3)
    with pytest.raises(ValueError, match="channel_mult: expected 3 positive integers"):
        FieldAutoencoder(1, 2, downsample=4, channel_mult=[1, 2])
    with pytest.raises(ValueError, match=r"x must have shape \[B, 1, S0, S1\]"):
        ae.encode(torch.zeros(1, 2, 16, 16))


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_periodic_fields_stay_periodic_through_the_bottleneck(dims):
    """With circular padding, shifting the field by a multiple of the factor shifts the latent and
    the reconstruction by the same amount (translation equivariance: no edge is privileged)."""
    torch.manual_seed(1)
    grid = {1: (32,), 2: (16, 16), 3: (8, 8, 8)}[dims]
    ae = FieldAutoencoder(1, dims, latent_channels=2, downsample=2, model_channels=8, padding="circular")
    for p in ae.parameters():  # zero-initialised output convolutions would hide the padding
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(1, 1, *grid)
    axes = tuple(range(2, 2 + dims))
    shifted = torch.roll(x, shifts=(2,) * dims, dims=axes)
    z, z_shift = ae.encode(x).mean, ae.encode(shifted).mean
    torch.testing.assert_close(z_shift, torch.roll(z, shifts=(1,) * dims, dims=axes), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ae.decode(z_shift), torch.roll(ae.decode(z), shifts=(2,) * dims, dims=axes),
                               atol=1e-5, rtol=1e-5)
    zeros = FieldAutoencoder(1, dims, latent_channels=2, downsample=2, model_channels=8, padding="zeros")
    zeros.load_state_dict(ae.state_dict())
    assert not torch.allclose(zeros.encode(shifted).mean, torch.roll(zeros.encode(x).mean, (1,) * dims, axes),
                              atol=1e-3)


@pytest.mark.parametrize("dims", [1, 2])
def test_without_normalisation_a_far_bump_leaves_the_reconstruction_unchanged(dims):
    """``norm: none``: the decoder's output at a point depends only on the latent within its
    receptive field, so a bump at one corner leaves the far side exactly unchanged; with
    GroupNorm (whole-sample statistics) it changes everywhere. A bad ``norm`` names the key."""
    grid = {1: (64,), 2: (64, 64)}[dims]  # the receptive field reaches past 28 points
    far = (Ellipsis, *([slice(-4, None)] * dims))
    for norm, local in (("none", True), ("group", False)):
        torch.manual_seed(2)
        ae = FieldAutoencoder(1, dims, latent_channels=2, downsample=2, model_channels=8, norm=norm)
        for p in ae.parameters():  # zero-initialised output convolutions would hide everything
            torch.nn.init.normal_(p, std=0.2)
        x = torch.randn(1, 1, *grid)
        bumped = x.clone()
        bumped[(0, 0, *([0] * dims))] += 10.0
        with torch.no_grad():
            a, b = ae(x, sample_posterior=False)[0], ae(bumped, sample_posterior=False)[0]
        assert torch.equal(a[far], b[far]) == local, norm
    with pytest.raises(ValueError, match="norm must be one of group, none, got 'layer'"):
        FieldAutoencoder(1, 2, norm="layer")


def test_kl_matches_torch_distributions_and_the_sample_has_the_posterior_moments():
    torch.manual_seed(2)
    mean, logvar = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    post = DiagonalGaussian(mean, logvar)
    q = torch.distributions.Normal(mean, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(post.kl(), expected, atol=1e-5, rtol=1e-5)
    draws = torch.stack([post.sample(torch.Generator().manual_seed(i)) for i in range(4000)])
    torch.testing.assert_close(draws.mean(0), mean, atol=0.12, rtol=0)
    torch.testing.assert_close(draws.std(0), post.std, atol=0.12, rtol=0.06)
    assert torch.isfinite(DiagonalGaussian(mean, torch.full_like(mean, -1e4)).kl()).all()  # clamped


@pytest.mark.parametrize(("grid", "k"), [((32,), 5), ((16, 32), 3), ((8, 8, 16), 4)])
def test_radial_power_puts_a_single_fourier_mode_in_its_bin(grid, k):
    """cos(2 pi k x / N) along the longest axis: all power in bin k (wavenumber in units of
    the longest axis' fundamental), the total equal to the field's energy over the half spectrum."""
    n = max(grid)
    axis = grid.index(n)
    coords = torch.arange(n, dtype=torch.float64)
    wave = torch.cos(2 * math.pi * k * coords / n)
    shape = [1] * len(grid)
    shape[axis] = n
    x = wave.reshape(shape).expand(grid).reshape(1, 1, *grid).float()
    p = radial_power(x)[0, 0]
    assert int(p.argmax()) == k
    assert float(p[k]) > 1e3 * float(p.sum() - p[k])


def test_spectral_and_pixel_losses_vanish_on_the_data_and_ignore_masked_points():
    torch.manual_seed(3)
    x = torch.randn(2, 2, 16, 16)
    assert float(spectral_loss(x, x).abs().max()) < 1e-6 and float(pixel_loss(x, x, l2=1.0).max()) == 0.0
    smooth = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1)
    assert (spectral_loss(smooth, x) > 0.1).all()  # smoothing removes the small scales
    mask = torch.ones_like(x)
    mask[:, :, :4] = 0
    other = x.clone()
    other[:, :, :4] = 100.0  # anything at the masked points
    torch.testing.assert_close(spectral_loss(other, x, mask), spectral_loss(x, x, mask))
    torch.testing.assert_close(pixel_loss(other, x, mask, l1=1.0, l2=1.0), torch.zeros(2))
    assert (pixel_loss(other, x, None) > 1).all()


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_codec_normalises_the_latent_per_channel_and_inverts_exactly(dims):
    torch.manual_seed(4)
    grid = {1: (32,), 2: (16, 8), 3: (8, 8, 8)}[dims]
    ae = FieldAutoencoder(2, dims, latent_channels=3, downsample=2, model_channels=8)
    for p in ae.parameters():
        torch.nn.init.normal_(p, std=0.3)
    codec = LatentCodec(ae)
    data = [torch.randn(8, 2, *grid) * 3 + 1 for _ in range(4)]
    codec.fit(data)
    assert bool(codec.fitted)
    z = torch.cat([codec.encode(x) for x in data])
    per_channel = z.transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(per_channel.mean(1), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(per_channel.std(1, unbiased=False), torch.ones(3), atol=1e-5, rtol=0)
    x = data[0]
    torch.testing.assert_close(codec.decode(codec.encode(x)), ae.decode(ae.encode(x).mean), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(codec.encode(x), codec.encode(x))  # the posterior mean: deterministic
    z = codec.encode(x).requires_grad_(True)
    codec.decode(z).square().sum().backward()  # differentiable: guidance through the decoder
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert not any(p.requires_grad for p in codec.parameters())
    codec.train()
    assert not codec.autoencoder.training  # the frozen autoencoder stays in eval mode


def test_a_collapsed_latent_channel_is_refused_by_name():
    ae = FieldAutoencoder(1, 1, latent_channels=2, downsample=2, model_channels=8)
    with torch.no_grad():
        ae.encoder[-1].conv.weight.zero_()
        ae.encoder[-1].conv.bias.zero_()
    with pytest.raises(ValueError, match=r"latent channels \[0, 1\] .* constant"):
        LatentCodec(ae).fit([torch.randn(4, 1, 16)])
