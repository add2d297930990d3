"""Per-point moment maps, the spread of the domain mean and the binned Wasserstein-1 distance
against numpy/scipy."""

import math

import numpy as np
import pytest
import scipy.stats
import torch

from scidiff.evaluation import BiasStdMaps, DomainMeanStdRatio, Wasserstein1, point_weights


def test_wasserstein1_matches_scipy_per_channel():
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(200, 2, 10, 12, generator=g, dtype=torch.float64)
    data = torch.randn(300, 2, 10, 12, generator=g, dtype=torch.float64)
    data[:, 0] = 0.3 + 1.2 * data[:, 0]
    data[:, 1] = torch.exp(data[:, 1])  # skewed, a different range
    metric = Wasserstein1(
        num_channels=2, value_range=[(-8.0, 8.0), (-5.0, 120.0)], num_bins=4000
    )
    metric.update(samples[:100], data[:150])
    metric.update(samples[100:], data[150:])
    expected = [
        scipy.stats.wasserstein_distance(
            samples[:, c].flatten().numpy(), data[:, c].flatten().numpy()
        )
        for c in range(2)
    ]
    width = torch.tensor([16 / 4000, 125 / 4000])
    error = (metric.compute() - torch.tensor(expected, dtype=torch.float64)).abs()
    assert torch.all(error < 0.1 * width), (metric.compute(), expected)
    assert torch.all(torch.stack(metric.out_of_range()) == 0)


def test_wasserstein1_with_mask_and_area_weights_matches_weighted_scipy():
    g = torch.Generator().manual_seed(1)
    samples = torch.randn(50, 1, 9, 16, generator=g, dtype=torch.float64)
    data = 0.5 + torch.randn(40, 1, 9, 16, generator=g, dtype=torch.float64)
    coslat = torch.cos(torch.linspace(-1.4, 1.4, 9, dtype=torch.float64)).reshape(9, 1)
    land = torch.rand(1, 1, 9, 16, generator=g) > 0.3
    data_nan = torch.where(land, data, torch.nan)
    metric = Wasserstein1(num_channels=1, value_range=(-6.0, 6.0), num_bins=3000)
    metric.update(samples, data_nan, mask=land, weights=coslat)
    w_s = point_weights(samples, land, coslat)
    w_d = point_weights(data, land, coslat)
    expected = scipy.stats.wasserstein_distance(
        samples.flatten().numpy(),
        data.flatten().numpy(),
        w_s.flatten().numpy(),
        w_d.flatten().numpy(),
    )
    assert abs(float(metric.compute()) - expected) < 0.1 * 12 / 3000
    # identical inputs: exactly zero; a shift by c inside the range: exactly c up to binning
    same = Wasserstein1(num_channels=1, value_range=(-6.0, 6.0), num_bins=3000)
    same.update(samples, samples)
    assert float(same.compute()) == 0.0


def test_wasserstein1_clamps_out_of_range_values_and_reports_them():
    metric = Wasserstein1(num_channels=1, value_range=(0.0, 1.0), num_bins=10)
    metric.update(torch.tensor([[[-5.0, 0.55]]]), torch.tensor([[[0.55, 0.55]]]))
    # -5 sits at 0: W1 = 0.55 / 2 per unit mass
    assert float(metric.compute()) == pytest.approx(0.275)
    samples_out, data_out = metric.out_of_range()
    assert float(samples_out) == 0.5 and float(data_out) == 0.0
    with pytest.raises(ValueError, match="value_range"):
        Wasserstein1(num_channels=2, value_range=[(0.0, 1.0)] * 3)


def test_bias_std_maps_match_numpy_with_missing_data_and_ensembles():
    g = torch.Generator().manual_seed(2)
    mean_map = torch.randn(2, 6, 5, generator=g, dtype=torch.float64)
    samples = (
        250.0
        + mean_map
        + 2.0 * torch.randn(8, 4, 2, 6, 5, generator=g, dtype=torch.float64)
    )
    data = 250.0 + torch.randn(8, 2, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.rand(8, 2, 6, 5, generator=g) > 0.2  # per-sample missing observations
    metric = BiasStdMaps(num_channels=2, spatial_shape=(6, 5))
    metric.update(samples[:3], torch.where(mask, data, torch.nan)[:3], mask=mask[:3])
    metric.update(samples[3:], torch.where(mask, data, torch.nan)[3:], mask=mask[3:])
    maps = metric.compute()
    # samples: members pooled, a per-sample mask repeated over the 4 members
    s = np.where(mask.numpy()[:, None], samples.numpy(), np.nan).reshape(32, 2, 6, 5)
    d = np.where(mask.numpy(), data.numpy(), np.nan)
    np.testing.assert_allclose(
        maps.mean_samples.numpy(), np.nanmean(s, axis=0), rtol=1e-12
    )
    np.testing.assert_allclose(
        maps.bias.numpy(), np.nanmean(s, axis=0) - np.nanmean(d, axis=0), atol=1e-9
    )
    np.testing.assert_allclose(
        maps.std_samples.numpy(), np.nanstd(s, axis=0, ddof=1), rtol=1e-9
    )
    np.testing.assert_allclose(
        maps.std_data.numpy(), np.nanstd(d, axis=0, ddof=1), rtol=1e-9
    )
    assert maps.std_ratio.shape == (2, 6, 5)


def test_bias_std_maps_recover_planted_maps():
    g = torch.Generator().manual_seed(3)
    bias = torch.linspace(-1, 1, 7, dtype=torch.float64).reshape(1, 7)
    std = torch.linspace(0.5, 2, 7, dtype=torch.float64).reshape(1, 7)
    samples = bias + std * torch.randn(20000, 1, 7, generator=g, dtype=torch.float64)
    data = torch.randn(20000, 1, 7, generator=g, dtype=torch.float64)
    metric = BiasStdMaps(num_channels=1, spatial_shape=(7,))
    metric.update(samples, data)
    maps = metric.compute()
    assert torch.allclose(maps.bias, bias, atol=0.05)  # standard error <= 0.02
    assert torch.allclose(maps.std_ratio, std, rtol=0.03)
    with pytest.raises(ValueError, match="spatial shape"):
        metric.update(samples[..., :6], data[..., :6])


@pytest.mark.parametrize("spatial", [(12,), (6, 5), (3, 4, 5)])
def test_domain_mean_std_ratio_matches_numpy_with_mask_weights_and_members(spatial):
    """Each field's weighted mean over its valid points (mask x area weights; members share
    their sample's mask), std over fields (ddof 1), samples / data; in 1-D, 2-D and 3-D,
    accumulated over two batches."""
    g = torch.Generator().manual_seed(len(spatial))
    samples = 250.0 + 2.0 * torch.randn(10, 3, 2, *spatial, generator=g, dtype=torch.float64)
    data = 250.0 + torch.randn(10, 2, *spatial, generator=g, dtype=torch.float64)
    mask = torch.rand(10, 2, *spatial, generator=g) > 0.3
    weights = torch.rand(*spatial, generator=g, dtype=torch.float64) + 0.5
    metric = DomainMeanStdRatio(num_channels=2)
    for part in (slice(0, 4), slice(4, 10)):
        metric.update(samples[part], torch.where(mask, data, torch.nan)[part], mask=mask[part], weights=weights)
    axes = tuple(range(-len(spatial), 0))

    def domain_means(x, m):
        w = np.where(m, weights.numpy(), 0.0)
        return (np.where(m, x, 0.0) * w).sum(axis=axes) / w.sum(axis=axes)

    mask_np = mask.numpy()
    want_s = domain_means(samples.numpy(), mask_np[:, None]).reshape(30, 2).std(axis=0, ddof=1)
    want_d = domain_means(data.numpy(), mask_np).std(axis=0, ddof=1)
    np.testing.assert_allclose(metric.std("samples").numpy(), want_s, rtol=1e-9)
    np.testing.assert_allclose(metric.std("data").numpy(), want_d, rtol=1e-9)
    np.testing.assert_allclose(metric.compute().numpy(), want_s / want_d, rtol=1e-9)


def test_domain_mean_std_ratio_sees_only_the_mean_and_is_nan_where_meaningless():
    """A constant added to each member changes the ratio and nothing per wavenumber; data
    whose fields all have the same mean (anomalies) give NaN, as does a single field."""
    g = torch.Generator().manual_seed(5)
    data = torch.randn(400, 1, 8, 8, generator=g, dtype=torch.float64)
    shifted = data + 3.0 * torch.randn(400, 1, 1, 1, generator=g, dtype=torch.float64)
    metric = DomainMeanStdRatio(num_channels=1)
    metric.update(shifted, data)
    # data domain means: std 1/8 (64 independent points); shifted: sqrt(1/64 + 9)
    assert float(metric.compute()) == pytest.approx(math.sqrt(1 / 64 + 9) * 8, rel=0.1)
    anomalies = data - data.mean(dim=(-2, -1), keepdim=True)
    flat = DomainMeanStdRatio(num_channels=1)
    flat.update(data, anomalies)
    assert math.isnan(float(flat.compute()))
    one = DomainMeanStdRatio(num_channels=1)
    one.update(data[:1], data[:1])
    assert math.isnan(float(one.compute()))
    with pytest.raises(ValueError, match="differ in grid"):
        one.update(data[..., :4], data)
