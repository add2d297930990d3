"""Spectral index of a field: the power-law fit ``P(k) = A k^(-n)`` by log-periodogram regression.

For a stationary Gaussian field the periodogram of a (non-self-conjugate) Fourier mode,
``I(k_m) = |F(m)|^2 * prod_i d_i / N`` (``F = fftn``, unnormalised), is ``P(k_m)`` times a
standard exponential variable ``E``. Taking logs,

    ln I(k_m) = ln A - n ln k_m + ln E_m,        E[ln E] = -gamma (Euler), Var[ln E] = pi^2 / 6,

a linear model in ``ln k`` with errors of constant mean and variance, so ordinary least squares
over the modes gives an unbiased slope (``-n``), and ``ln A = intercept + gamma``. This is the
log-periodogram (Geweke-Porter-Hudak) estimator, applied to individual modes rather than to
radially averaged shells: shell averages of a few modes have ``E[ln mean] != ln E[mean]``, a
bias that varies with the number of modes per shell and so tilts a fitted slope.

Conventions are those of ``datasets/grf.py``: ``k`` in **radians per length unit**
(``k_i = 2 pi m_i / (N_i d_i)``) and ``P`` the power spectrum of the field itself, with
``E |fftn(f)|^2 = N P(k) / prod d_i`` (unit grid: ``E |F|^2 = N P``). So ``n`` is the *power*
spectral index (a GRF made with ``P = A k^-n`` gives ``n``; its field amplitude falls as
``k^(-n/2)``). ``k_min``/``k_max`` are given in cycles per length unit, like
:mod:`scidiff.evaluation.spectra` (``k_radians = 2 pi k_cycles``).

The fit range defaults to ``[1.5 f_0, f_Ny / 2]`` with ``f_0 = 1 / max_i(n_i d_i)`` the
fundamental and ``f_Ny = min_i 1 / (2 d_i)`` the smallest Nyquist frequency: it leaves out
the lowest modes (``|m| = 1``: few modes, most sensitive to the box) and the Nyquist region
(where a model's residual noise and any aliasing live).

Each pair of Hermitian-conjugate modes carries one independent value; the standard error
counts pairs, not modes. Self-conjugate modes (``2 m_i = 0 mod N_i`` on every axis, a real
coefficient: ``chi^2_1``, another mean of ``ln``) are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from scidiff.shapes import check_field

EULER_GAMMA = 0.5772156649015329


@dataclass(frozen=True)
class PowerLawFit:
    """Per-field power-law fit ``P(k) = A k^(-n)``.

    Attributes:
        spectral_index: ``[B, C]`` n (power spectral index; ``P ∝ k^-n``).
        log_amplitude: ``[B, C]`` ln A, with ``k`` in radians per length unit.
        stderr: ``[B, C]`` standard error of ``n`` from the regression residuals.
        k_range: ``(k_min, k_max)`` fitted, cycles per length unit.
        num_pairs: independent (conjugate-pair) Fourier modes in the fit.
    """

    spectral_index: Tensor
    log_amplitude: Tensor
    stderr: Tensor
    k_range: tuple[float, float]
    num_pairs: int


def _spacing(spacing: float | Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)):
        return (float(spacing),) * ndim
    out = tuple(float(d) for d in spacing)
    if len(out) != ndim or min(out) <= 0:
        raise ValueError(f"spacing must be a positive number or {ndim} positive numbers, got {spacing}")
    return out


def default_k_range(spatial_shape: Sequence[int], spacing: float | Sequence[float] | None = None
                    ) -> tuple[float, float]:
    """``(1.5 f_0, f_Ny / 2)`` in cycles per length unit (see the module docstring)."""
    d = _spacing(spacing, len(spatial_shape))
    fundamental = 1.0 / max(n * s for n, s in zip(spatial_shape, d))
    nyquist = min(1.0 / (2.0 * s) for s in d)
    return 1.5 * fundamental, 0.5 * nyquist


def fit_power_law(x: Tensor, k_min: float | None = None, k_max: float | None = None,
                  spacing: float | Sequence[float] | None = None) -> PowerLawFit:
    """Fit ``P(k) = A k^-n`` to every field of ``x`` by least squares on its log-periodogram.

    Args:
        x: ``[B, C, *S]`` fields, 1-3 spatial dims, any shape (periodic fields give exact
            spectra; others leak power between modes, as for any periodogram).
        k_min, k_max: inclusive fit range of ``|k|`` in cycles per length unit
            (defaults: :func:`default_k_range`).
        spacing: grid spacing per axis, length units (default 1).

    Returns:
        :class:`PowerLawFit` with ``[B, C]`` tensors (float64).

    Example:
        >>> import torch
        >>> fit = fit_power_law(torch.randn(4, 1, 64, 64))   # white noise: n = 0
        >>> fit.spectral_index.shape
        torch.Size([4, 1])
    """
    check_field(x)
    shape = tuple(int(n) for n in x.shape[2:])
    d = _spacing(spacing, len(shape))
    lo_default, hi_default = default_k_range(shape, d)
    lo = lo_default if k_min is None else float(k_min)
    hi = hi_default if k_max is None else float(k_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < k_min < k_max, got k_min={lo}, k_max={hi}")

    freqs = [torch.fft.fftfreq(n, d=s, dtype=torch.float64) for n, s in zip(shape, d)]
    grids = torch.meshgrid(*freqs, indexing="ij")
    kmag = torch.sqrt(sum(g**2 for g in grids))
    ints = torch.meshgrid(*[torch.arange(n) for n in shape], indexing="ij")
    self_conjugate = torch.ones(shape, dtype=torch.bool)
    for m, n in zip(ints, shape):
        self_conjugate &= (2 * m) % n == 0
    use = (kmag >= lo * (1 - 1e-12)) & (kmag <= hi * (1 + 1e-12)) & ~self_conjugate
    num_modes = int(use.sum())
    num_pairs = num_modes // 2
    if num_pairs < 3:
        raise ValueError(f"k range [{lo:.4g}, {hi:.4g}] cycles/length holds {num_modes} Fourier modes of a "
                         f"{'x'.join(map(str, shape))} grid; widen it")

    dims = tuple(range(2, x.ndim))
    n_points = math.prod(shape)
    anomaly = x.to(torch.float64)
    anomaly = anomaly - anomaly.mean(dim=dims, keepdim=True)
    spec = torch.fft.fftn(anomaly, dim=dims)
    periodogram = (spec.real**2 + spec.imag**2) * (math.prod(d) / n_points)
    y = torch.log(periodogram.flatten(2)[..., use.flatten().to(x.device)].clamp_min(torch.finfo(torch.float64).tiny))
    logk = torch.log(2 * math.pi * kmag[use]).to(x.device)                  # radians per length unit
    xc = logk - logk.mean()
    sxx = (xc**2).sum()
    ybar = y.mean(dim=-1, keepdim=True)
    slope = ((y - ybar) * xc).sum(dim=-1) / sxx
    intercept = ybar.squeeze(-1) - slope * logk.mean()
    resid = y - ybar - slope.unsqueeze(-1) * xc
    # conjugate pairs repeat the same value: num_pairs independent points, Sxx counted once per pair
    dof = max(num_pairs - 2, 1)
    s2 = (resid**2).sum(dim=-1) / 2 / dof
    stderr = torch.sqrt(s2 / (sxx / 2))
    return PowerLawFit(spectral_index=-slope, log_amplitude=intercept + EULER_GAMMA, stderr=stderr,
                       k_range=(lo, hi), num_pairs=num_pairs)


__all__ = ["EULER_GAMMA", "PowerLawFit", "default_k_range", "fit_power_law"]
