"""Radial power spectra: Parseval, white noise, power laws in 1-D/2-D/3-D, spectral error,
and the shell correlation (how much a member's scales co-vary)."""

import math

import numpy as np
import pytest
import torch

from scidiff.evaluation import (
    PowerSpectrum,
    ShellCorrelation,
    SpectralError,
    radial_bins,
    radial_power_spectrum,
)

GRIDS = [  # (shape, spacing): 1-D, non-square 2-D and 3-D with unequal spacings
    ((512,), (0.25,)),
    ((48, 80), (2.0, 0.5)),
    ((16, 24, 20), (1.0, 1.5, 0.75)),
]


def _power_law_fields(shape, spacing, index, amplitude, batch, seed):
    """Fields with P(k) = amplitude * k^-index (k in cycles per length, P(0) = 0),
    by colouring white noise: E|fftn(x)|^2 = N P / prod(spacing), i.e. E P_hat = P."""
    rng = np.random.default_rng(seed)
    axes = np.meshgrid(
        *[np.fft.fftfreq(n, d) for n, d in zip(shape, spacing)], indexing="ij"
    )
    k = np.sqrt(sum(a**2 for a in axes))
    k.flat[0] = 1.0
    power = amplitude * k ** (-index)
    power.flat[0] = 0.0
    noise = rng.standard_normal((batch, 1, *shape))
    dims = tuple(range(2, 2 + len(shape)))
    filt = np.sqrt(power / math.prod(spacing))
    fields = np.fft.ifftn(filt * np.fft.fftn(noise, axes=dims), axes=dims).real
    return torch.from_numpy(fields)


def _fit_power_law(wavenumber, power, counts, nyquist):
    """Least-squares (index, amplitude) of log P = log A - n log k over complete shells."""
    keep = (wavenumber <= nyquist) & (counts > 0)
    logk, logp = np.log(wavenumber[keep].numpy()), np.log(power[keep].numpy())
    slope, intercept = np.polyfit(logk, logp, 1, w=np.sqrt(counts[keep].numpy()))
    return -slope, math.exp(intercept)


@pytest.mark.parametrize("shape,spacing", GRIDS)
def test_parseval_sum_of_spectrum_is_variance(shape, spacing):
    g = torch.Generator().manual_seed(0)
    x = 3.0 + 2.0 * torch.randn(3, 2, *shape, generator=g, dtype=torch.float64)
    spectrum = radial_power_spectrum(x, spacing=spacing)
    dims = tuple(range(2, x.ndim))
    assert torch.allclose(
        spectrum.variance(), x.var(dim=dims, correction=0), rtol=1e-10
    )
    assert int(spectrum.counts.sum()) == math.prod(shape) - 1  # every mode but k = 0
    # with a mask, the spectrum carries the variance of the valid points exactly
    mask = torch.rand(shape, generator=g) > 0.25
    masked = radial_power_spectrum(x, spacing=spacing, mask=mask)
    valid = x[..., mask]
    assert torch.allclose(
        masked.variance(), valid.var(dim=-1, correction=0), rtol=1e-10
    )


@pytest.mark.parametrize("shape,spacing", GRIDS)
def test_white_noise_spectrum_is_flat_at_variance_times_cell_volume(shape, spacing):
    g = torch.Generator().manual_seed(1)
    batch = max(4, 400_000 // math.prod(shape))
    x = 1.5 * torch.randn(batch, 1, *shape, generator=g, dtype=torch.float64)
    metric = PowerSpectrum(num_channels=1, spatial_shape=shape, spacing=spacing)
    metric.update(x[: batch // 2])
    metric.update(x[batch // 2 :])
    spectrum = metric.compute()
    level = 1.5**2 * math.prod(spacing)
    complete = spectrum.wavenumber <= metric.bins.nyquist
    power, counts = spectrum.power[0, complete], spectrum.counts[complete]
    assert abs(float((power * counts).sum() / counts.sum()) / level - 1) < 0.01
    # a shell of 2 modes x 104 fields has a relative noise of 0.1
    assert torch.all((power / level - 1).abs() < 0.3)
    index, _ = _fit_power_law(
        spectrum.wavenumber, spectrum.power[0], spectrum.counts, metric.bins.nyquist
    )
    assert abs(index) < 0.06  # measured: 0.001 (1-D), -0.020 (2-D), 0.034 (3-D)


@pytest.mark.parametrize(
    "shape,spacing,index",
    [(GRIDS[0][0], GRIDS[0][1], 1.5), (*GRIDS[1], 2.5), (*GRIDS[2], 3.0)],
)
def test_power_law_spectrum_recovers_index_and_amplitude(shape, spacing, index):
    batch = max(4, 100_000 // math.prod(shape))
    x = _power_law_fields(shape, spacing, index, amplitude=0.7, batch=batch, seed=2)
    metric = PowerSpectrum(num_channels=1, spatial_shape=shape, spacing=spacing)
    metric.update(x)
    spectrum = metric.compute()
    fitted, amplitude = _fit_power_law(
        spectrum.wavenumber, spectrum.power[0], spectrum.counts, metric.bins.nyquist
    )
    assert abs(fitted - index) < 0.05, fitted
    assert abs(amplitude / 0.7 - 1) < 0.1, amplitude


def test_spectrum_of_grf_dataset_matches_its_analytic_power_spectrum():
    grf = pytest.importorskip("datasets.grf")
    rng = np.random.default_rng(3)
    shape, n, a = (64, 96), 2.0, 1.3
    noise = rng.standard_normal((40, *shape))
    fields = torch.from_numpy(
        grf.sample_fields(noise, np.full(40, a), np.full(40, n))
    ).unsqueeze(1)
    spectrum = radial_power_spectrum(fields)
    mean_power = spectrum.power.mean(dim=(0, 1))
    k_angular = 2 * math.pi * spectrum.wavenumber  # grf uses radians per grid spacing
    expected = a * k_angular ** (-n)
    complete = (spectrum.wavenumber <= 0.5) & (spectrum.wavenumber > 2 / 64)
    ratio = (mean_power / expected)[complete]
    assert abs(float(ratio.mean()) - 1) < 0.03 and torch.all((ratio - 1).abs() < 0.25)


def test_radial_bins_of_a_1d_grid():
    bins = radial_bins((16,), spacing=0.5)
    assert bins.bin_width == pytest.approx(1 / 8)
    assert bins.counts.tolist() == [2.0] * 7 + [1.0]  # +-k pairs, one Nyquist mode
    assert torch.allclose(bins.wavenumber, torch.arange(1, 9, dtype=torch.float64) / 8)
    assert bins.nyquist == pytest.approx(1.0)
    with pytest.raises(ValueError, match="spacing"):
        radial_bins((16, 8), spacing=(1.0, 2.0, 3.0))


def test_spectral_error_of_scaled_samples_is_twice_log_scale():
    g = torch.Generator().manual_seed(4)
    data = torch.randn(6, 2, 20, 36, generator=g, dtype=torch.float64)
    scale = torch.tensor([1.0, 1.5], dtype=torch.float64).reshape(1, 2, 1, 1)
    metric = SpectralError(num_channels=2, spatial_shape=(20, 36), spacing=(1.0, 2.0))
    metric.update(data * scale, data)
    assert torch.allclose(
        metric.compute(), torch.tensor([0.0, 2 * math.log(1.5)], dtype=torch.float64)
    )
    samples, truth = metric.spectra()
    assert torch.allclose(samples.power[1], 2.25 * truth.power[1])
    # an ensemble [B, M, C, *S] pools its members; average="channels" gives a scalar
    metric = SpectralError(num_channels=2, spatial_shape=(20, 36), average="channels")
    metric.update(torch.stack([data, data], dim=1) * scale.unsqueeze(1), data)
    assert metric.compute().shape == () and float(metric.compute()) == pytest.approx(
        math.log(1.5)
    )
    with pytest.raises(ValueError, match="shape"):
        metric.update(data[..., :-1], data)
    with pytest.raises(ValueError, match="average"):
        SpectralError(num_channels=2, spatial_shape=(20, 36), average="median")


# --------------------------------------------------------------------- shell correlation
def _cosine_fields(shape, log_amplitudes):
    """Fields ``[B, M, 1, *S]`` that are sums of cosines along the last axis, one per shell
    ``k = 1..K`` with amplitude ``exp(log_amplitudes[b, m, k - 1])``: shell k's power is then
    ``exp(2 log a_k)`` times a constant of the grid."""
    n = shape[-1]
    x = np.arange(n)
    b, m, k = log_amplitudes.shape
    waves = np.stack([np.cos(2 * np.pi * (j + 1) * x / n + 0.3 * j) for j in range(k)])  # [K, n]
    profile = np.einsum("bmk,kn->bmn", np.exp(log_amplitudes), waves)
    return torch.from_numpy(np.broadcast_to(profile.reshape(b, m, 1, *([1] * (len(shape) - 1)), n),
                                            (b, m, 1, *shape)).copy())


@pytest.mark.parametrize("shape", [(16,), (6, 16), (4, 6, 16)])
def test_shell_correlation_is_the_pooled_within_ensemble_correlation_of_log_power(shape):
    """Constructed fields whose shell powers are known: the metric is numpy's correlation of
    2 ln a between shells, each ensemble centred on its own mean, averaged off the diagonal,
    in 1-D, 2-D and 3-D (the compared shells k = 1..7 < Nyquist of the 16 points)."""
    rng = np.random.default_rng(0)
    b, m, k = 5, 4, 7
    common = rng.standard_normal((b, m, 1))  # a scale shared by a member's shells: coupling
    log_a = 0.4 * common + 0.5 * rng.standard_normal((b, m, k)) + rng.standard_normal((b, 1, k))
    metric = ShellCorrelation(1, shape, max_wavenumber=7 / 16)
    metric.update(_cosine_fields(shape, log_a))
    centred = (2 * log_a - (2 * log_a).mean(axis=1, keepdims=True)).reshape(-1, k)
    corr = np.corrcoef(centred, rowvar=False)
    want = corr[~np.eye(k, dtype=bool)].mean()
    assert want > 0.2  # the shared scale makes it clearly positive
    assert metric.compute().item() == pytest.approx(want, rel=1e-9)
    assert metric.standard_error().item() == pytest.approx(1 / math.sqrt(b * (m - 1) * k * (k - 1) / 2))


def test_shell_correlation_of_gaussian_fields_is_zero_and_of_rescaled_members_positive():
    """Power-law Gaussian fields (independent shells) give 0 within 3 of its standard errors;
    scaling each member by its own exp(0.1 z) couples every shell; scaling all members alike
    does not (a constant in ln P, centred away)."""
    shape, spacing = (16, 16), (1.0, 1.0)
    fields = _power_law_fields(shape, spacing, 2.0, 1.0, 48 * 6, seed=3).reshape(48, 6, 1, *shape)
    metric = ShellCorrelation(1, shape)
    metric.update(fields)
    se = metric.standard_error().item()
    assert abs(metric.compute().item()) < 3 * se
    scaled = ShellCorrelation(1, shape)
    scaled.update(3.0 * fields)
    assert scaled.compute().item() == pytest.approx(metric.compute().item(), abs=1e-9)
    g = torch.Generator().manual_seed(0)
    coupled = ShellCorrelation(1, shape)
    coupled.update(fields * torch.exp(0.1 * torch.randn(48, 6, 1, 1, 1, generator=g, dtype=torch.float64)))
    assert coupled.compute().item() > 0.15


def test_shell_correlation_needs_ensembles_and_two_shells():
    metric = ShellCorrelation(2, (8, 8))
    metric.update(torch.randn(3, 1, 2, 8, 8))  # one member: no within-ensemble spread
    assert torch.isnan(metric.compute()).all()
    with pytest.raises(ValueError, match=r"ensembles \[B, M, C, \*S\] with 5 dims, got shape \(3, 2, 8, 8\)"):
        metric.update(torch.randn(3, 2, 8, 8))
    with pytest.raises(ValueError, match="max_wavenumber=0.15 leaves 1 shell"):
        ShellCorrelation(1, (8, 8), max_wavenumber=0.15)
