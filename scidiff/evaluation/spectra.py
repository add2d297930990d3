"""Radially averaged power spectra of 1-D, 2-D and 3-D fields, and the spectral error.

Conventions (those of cosmology and turbulence codes). On a grid of ``n_i``
points with spacing ``d_i`` along axis ``i`` (``N = prod n_i`` points, domain
volume ``V = prod n_i d_i``), the wavevector of a Fourier mode has components
``k_i = j / (n_i d_i)`` in *cycles per unit length* (``numpy.fft.fftfreq``), and the
power spectral density of a field ``a`` (its mean removed) is

    P(k) = |A_k|^2 * prod_i d_i / N,       A = FFT(a) (unnormalised DFT),

in field units^2 x length^d. It is independent of the grid resolution and box
size; white noise of variance s^2 has the flat ``P = s^2 prod d_i``, and
Parseval reads ``variance = sum_{k != 0} P(k) / V``. The radial spectrum
averages ``P`` over shells ``|k| ~ b * dk``, ``b = 1, 2, ...``; the shell width
``dk`` defaults to the fundamental frequency of the longest side,
``min_i 1 / (n_i d_i)``, so that shells are as fine as the grid resolves and
every shell below the smallest Nyquist frequency ``min_i 1 / (2 d_i)`` holds
modes (with a coarser ``bin_width``, modes with ``0 < |k| < dk / 2`` join the
first shell). Shells beyond the smallest Nyquist frequency are incomplete
(grid corners; some may be empty, with NaN power): kept for
Parseval, excluded from the spectral error by default.

Angular wavenumbers (radians per length unit, as in ``datasets/grf.py``) are
``2 pi`` times ours; ``P`` has the same value in both conventions on a unit grid
(``E |fftn(a)|^2 = N P``).

Spectra are Cartesian: on a lat/lon grid they are spectra in index space
(degrees), not spherical-harmonic spectra.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torchmetrics import Metric

from scidiff.evaluation.weighting import (
    Average,
    check_average,
    check_spatial_shape,
    point_weights,
)
from scidiff.shapes import check_field


def _check_spacing(
    spacing: float | Sequence[float] | None, ndim: int
) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    if isinstance(spacing, (int, float)):
        spacing = (float(spacing),) * ndim
    spacing = tuple(float(d) for d in spacing)
    if len(spacing) != ndim or min(spacing) <= 0:
        raise ValueError(
            f"spacing must be a positive number or {ndim} positive numbers, got {spacing}"
        )
    return spacing


@dataclass(frozen=True)
class RadialBins:
    """How the Fourier modes of a grid fall into radial shells.

    Attributes:
        spatial_shape: grid shape ``S``.
        spacing: grid spacing per axis (length units).
        index: ``[N]`` int64 shell of every mode in ``fftn`` order, flattened; ``-1`` for ``k = 0``.
        counts: ``[K]`` number of modes per shell.
        wavenumber: ``[K]`` mean ``|k|`` of the modes of each shell (cycles per length unit).
        bin_width: shell width ``dk``.
        nyquist: smallest Nyquist frequency over the axes, ``min_i 1 / (2 d_i)``.
        volume: domain volume ``V = prod_i n_i d_i``.
    """

    spatial_shape: tuple[int, ...]
    spacing: tuple[float, ...]
    index: Tensor
    counts: Tensor
    wavenumber: Tensor
    bin_width: float
    nyquist: float
    volume: float

    @property
    def cell_volume(self) -> float:
        return math.prod(self.spacing)


def radial_bins(
    spatial_shape: Sequence[int],
    spacing: float | Sequence[float] | None = None,
    bin_width: float | None = None,
) -> RadialBins:
    """Shells of ``|k|`` for a grid; see the module docstring for the conventions.

    Args:
        spatial_shape: ``S``, 1-3 sizes.
        spacing: grid spacing, one number or one per axis (default 1).
        bin_width: shell width in cycles per length unit (default: fundamental of the longest side).
    """
    shape = check_spatial_shape(spatial_shape)
    spacing = _check_spacing(spacing, len(shape))
    if math.prod(shape) < 2:
        raise ValueError(
            f"a spectrum needs at least 2 grid points, got spatial_shape {shape}"
        )
    fundamentals = [1.0 / (n * d) for n, d in zip(shape, spacing) if n > 1]
    dk = min(fundamentals) if bin_width is None else float(bin_width)
    if dk <= 0:
        raise ValueError(f"bin_width must be positive, got {bin_width}")
    freqs = [
        torch.fft.fftfreq(n, d=d, dtype=torch.float64) for n, d in zip(shape, spacing)
    ]
    grids = torch.meshgrid(*freqs, indexing="ij")
    kmag = torch.sqrt(sum(g**2 for g in grids)).reshape(-1)
    shell = torch.round(kmag / dk).long().clamp_min(1)
    index = shell - 1
    index[0] = -1  # the k = 0 mode (the mean) is first in fftn order
    num_shells = int(index.max()) + 1
    counts = torch.bincount(index[1:], minlength=num_shells).to(torch.float64)
    ksum = torch.zeros(num_shells, dtype=torch.float64).index_add_(
        0, index[1:], kmag[1:]
    )
    centres = torch.arange(1, num_shells + 1, dtype=torch.float64) * dk
    wavenumber = torch.where(counts > 0, ksum / counts.clamp_min(1), centres)
    return RadialBins(
        spatial_shape=shape,
        spacing=spacing,
        index=index,
        counts=counts,
        wavenumber=wavenumber,
        bin_width=dk,
        nyquist=min(1.0 / (2.0 * d) for d in spacing),
        volume=math.prod(n * d for n, d in zip(shape, spacing)),
    )


@dataclass
class RadialSpectrum:
    """A radially averaged power spectrum (a plain dataclass: torchmetrics rebuilds
    what ``compute`` returns).

    Attributes:
        wavenumber: ``[K]`` shell wavenumbers ``|k|`` (cycles per length unit).
        power: ``[..., K]`` power spectral density (field units^2 x length^d); NaN in empty shells.
        counts: ``[K]`` number of Fourier modes per shell.
        volume: domain volume ``V``, so that ``variance = sum_K power * counts / V``.
    """

    wavenumber: Tensor
    power: Tensor
    counts: Tensor
    volume: float

    def variance(self) -> Tensor:
        """``[...]`` the field variance recovered from the spectrum (Parseval)."""
        return torch.nansum(self.power * self.counts, dim=-1) / self.volume


def _shell_power(x: Tensor, bins: RadialBins, mask: Tensor | None) -> Tensor:
    """Per-sample shell-summed ``P(k)``: ``[B, C, *S] -> [B, C, K]`` float64."""
    b, c = x.shape[:2]
    dims = tuple(range(2, x.ndim))
    n = math.prod(bins.spatial_shape)
    x = x.to(torch.float64)
    if mask is None:
        anomaly = x - x.mean(dim=dims, keepdim=True)
        valid_fraction = None
    else:
        # Missing points become zero anomalies; dividing by the valid fraction keeps
        # Parseval exact for the variance over valid points (the shape is convolved
        # with the mask's own spectrum, which a scientist should keep in mind).
        m = point_weights(x, mask)
        if not torch.all((m == 0) | (m == 1)):
            raise ValueError("mask must hold 0 and 1 only")
        n_valid = m.sum(dim=dims, keepdim=True)
        mean = torch.where(m > 0, x, 0.0).sum(
            dim=dims, keepdim=True
        ) / n_valid.clamp_min(1)
        anomaly = torch.where(m > 0, x - mean, 0.0)
        valid_fraction = (n_valid / n).reshape(b, c, 1)
    spectrum = torch.fft.fftn(anomaly, dim=dims)
    power = (spectrum.real**2 + spectrum.imag**2).reshape(b, c, n) * (
        bins.cell_volume / n
    )
    if valid_fraction is not None:
        power = power / valid_fraction
    index = bins.index.to(x.device)
    shells = torch.zeros(
        b, c, bins.counts.numel(), dtype=torch.float64, device=x.device
    )
    return shells.index_add_(2, index[1:], power[..., 1:])


def radial_power_spectrum(
    x: Tensor,
    spacing: float | Sequence[float] | None = None,
    bin_width: float | None = None,
    mask: Tensor | None = None,
) -> RadialSpectrum:
    """Radially averaged power spectrum of every sample and channel.

    Args:
        x: ``[B, C, *S]`` fields, 1-3 spatial dims, any (non-square) shape.
        spacing: grid spacing, one number or one per spatial axis (default 1).
        bin_width: shell width in cycles per length unit (default: fundamental of the longest side).
        mask: 0/1 validity broadcastable to ``x``; missing points are zero anomalies
            and the power is rescaled by the valid fraction.

    Returns:
        :class:`RadialSpectrum` with ``power`` of shape ``[B, C, K]``.
    """
    check_field(x)
    bins = radial_bins(x.shape[2:], spacing, bin_width)
    counts = bins.counts.to(x.device)
    power = _shell_power(x, bins, mask) / counts
    return RadialSpectrum(bins.wavenumber.to(x.device), power, counts, bins.volume)


class _SpectrumMetric(Metric):
    full_state_update = False
    is_differentiable = False

    def __init__(
        self,
        num_channels: int,
        spatial_shape: Sequence[int],
        spacing: float | Sequence[float] | None,
        bin_width: float | None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = int(num_channels)
        self.bins = radial_bins(spatial_shape, spacing, bin_width)

    def _add_spectrum_state(self, name: str) -> None:
        k = self.bins.counts.numel()
        self.add_state(
            f"{name}_power_sum",
            torch.zeros(self.num_channels, k, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        self.add_state(
            f"{name}_count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def _fields(self, x: Tensor, name: str, allow_members: bool = False) -> Tensor:
        """Check ``x`` against the grid; fold an ensemble ``[B, M, C, *S]`` into ``[B*M, C, *S]``."""
        if allow_members and x.ndim == len(self.bins.spatial_shape) + 3:
            x = x.flatten(0, 1)
        check_field(x, name)
        if (
            x.shape[1] != self.num_channels
            or tuple(x.shape[2:]) != self.bins.spatial_shape
        ):
            raise ValueError(
                f"{name} has shape {tuple(x.shape)}, expected [B, {self.num_channels}, "
                f"{', '.join(map(str, self.bins.spatial_shape))}]"
            )
        return x

    def _accumulate(self, name: str, x: Tensor, mask: Tensor | None) -> None:
        shells = _shell_power(x, self.bins, mask)
        setattr(
            self,
            f"{name}_power_sum",
            getattr(self, f"{name}_power_sum") + shells.sum(dim=0),
        )
        setattr(self, f"{name}_count", getattr(self, f"{name}_count") + x.shape[0])

    def _compared_shells(self, max_wavenumber: float | None, fewest: int) -> Tensor:
        """``[K]`` bool: the non-empty shells up to ``max_wavenumber`` (default: the smallest
        Nyquist frequency, complete shells only); an error naming it when fewer than ``fewest``."""
        kmax = self.bins.nyquist if max_wavenumber is None else float(max_wavenumber)
        centres = torch.arange(1, self.bins.counts.numel() + 1, dtype=torch.float64)
        compared = (self.bins.counts > 0) & (centres * self.bins.bin_width <= kmax * (1 + 1e-9))
        if int(compared.sum()) < fewest:
            raise ValueError(
                f"max_wavenumber={max_wavenumber} leaves {int(compared.sum())} shell(s) to compare, "
                f"{type(self).__name__} needs {fewest}"
            )
        return compared

    def _spectrum(self, name: str) -> RadialSpectrum:
        counts = self.bins.counts.to(self.device)
        power = getattr(self, f"{name}_power_sum") / (
            getattr(self, f"{name}_count") * counts
        )
        return RadialSpectrum(
            self.bins.wavenumber.to(self.device), power, counts, self.bins.volume
        )


class PowerSpectrum(_SpectrumMetric):
    """Mean radially averaged power spectrum of a set of fields, per channel.

    Args:
        num_channels: ``C``.
        spatial_shape: ``S`` (1-3 sizes, any shape).
        spacing: grid spacing, one number or one per axis, in length units (default 1).
        bin_width: shell width in cycles per length unit (default: fundamental of the longest side).

    Example:
        >>> import torch
        >>> metric = PowerSpectrum(num_channels=1, spatial_shape=(32, 48), spacing=(1.0, 0.5))
        >>> metric.update(torch.randn(8, 1, 32, 48))
        >>> metric.compute().power.shape  # [C, K]
        torch.Size([1, 36])
    """

    higher_is_better = None

    def __init__(
        self,
        num_channels: int,
        spatial_shape: Sequence[int],
        spacing: float | Sequence[float] | None = None,
        bin_width: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_channels, spatial_shape, spacing, bin_width, **kwargs)
        self._add_spectrum_state("fields")

    def update(self, x: Tensor, mask: Tensor | None = None) -> None:
        """Args: x ``[B, C, *S]`` (or an ensemble ``[B, M, C, *S]``); mask 0/1 broadcastable to ``x``."""
        x = self._fields(x, "x", allow_members=True)
        self._accumulate("fields", x, mask)

    def compute(self) -> RadialSpectrum:
        """Returns: :class:`RadialSpectrum` with ``power`` ``[C, K]`` (mean over fields)."""
        return self._spectrum("fields")


class SpectralError(_SpectrumMetric):
    """Mean absolute log-ratio of the power spectra of samples and data, per channel.

    ``E = mean_k |ln(P_samples(k) / P_data(k))|`` over the complete shells
    ``|k| <= max_wavenumber``, with each spectrum the mean over its fields.
    0 is perfect; ``E = 0.1`` means the sample spectrum is off by about 10% on a
    typical scale. Samples and data need not be paired or equally many.

    Args:
        num_channels: ``C``.
        spatial_shape: ``S``.
        spacing: grid spacing per axis (default 1).
        bin_width: shell width (default: fundamental of the longest side).
        max_wavenumber: highest shell compared, cycles per length unit
            (default: the smallest Nyquist frequency, i.e. complete shells only).
        average: ``"none"`` (``[C]``) or ``"channels"`` (scalar).
    """

    higher_is_better = False

    def __init__(
        self,
        num_channels: int,
        spatial_shape: Sequence[int],
        spacing: float | Sequence[float] | None = None,
        bin_width: float | None = None,
        max_wavenumber: float | None = None,
        average: Average = "none",
        **kwargs,
    ) -> None:
        super().__init__(num_channels, spatial_shape, spacing, bin_width, **kwargs)
        self.average = check_average(average)
        self._compared = self._compared_shells(max_wavenumber, fewest=1)
        self._add_spectrum_state("samples")
        self._add_spectrum_state("data")

    def update(self, samples: Tensor, data: Tensor, mask: Tensor | None = None) -> None:
        """Args:
        samples: ``[N, C, *S]`` or an ensemble ``[B, M, C, *S]`` (members are pooled).
        data: ``[N', C, *S]``.
        mask: 0/1 broadcastable to both (e.g. ``[*S]`` or ``[1, C, *S]``), or ``None``.
        """
        samples = self._fields(samples, "samples", allow_members=True)
        data = self._fields(data, "data")
        self._accumulate("samples", samples, mask)
        self._accumulate("data", data, mask)

    def spectra(self) -> tuple[RadialSpectrum, RadialSpectrum]:
        """The mean spectra ``(samples, data)``, each ``power`` ``[C, K]``, synced across ranks.

        Synced across ranks: under DDP, call it on every rank (it is a collective).
        """
        with self.sync_context():
            return self._spectrum("samples"), self._spectrum("data")

    def compute(self) -> Tensor:
        """Returns: ``[C]`` (or a scalar with ``average="channels"``), dimensionless."""
        tiny = torch.finfo(torch.float64).tiny
        samples, data = self._spectrum("samples"), self._spectrum("data")
        compared = self._compared.to(self.device)
        log_ratio = torch.log(samples.power.clamp_min(tiny)) - torch.log(
            data.power.clamp_min(tiny)
        )
        error = log_ratio.abs()[:, compared].mean(dim=1)
        return error.mean() if self.average == "channels" else error


class ShellCorrelation(_SpectrumMetric):
    """How much a generated field's scales vary together: the mean correlation of ``ln P``
    between wavenumber shells, within ensembles, per channel.

    For every member ``m`` of sample ``b`` the shell powers ``L[b, m, k] = ln P_bm(k)`` of the
    compared shells are centred on their ensemble's mean over members, which removes what the
    condition sets (the mean spectrum). The centred values of all ensembles are pooled into
    one correlation matrix between shells, and the metric is the mean of its off-diagonal
    entries. A Gaussian random field's shells are independent: its value is 0 up to noise,
    whatever the spectrum. A model that scales all of a member's scales together (a
    normalisation over the whole sample does) makes it positive; ensembles of fields whose
    conditions differ (the unconditional floor) carry those differences, which is why the
    verdict judges it against its floor. Its null standard error, ``1 / sqrt(dof x pairs)``
    (``dof = B (M - 1)`` centred members, ``pairs`` of shells), is :meth:`standard_error`.

    Args:
        num_channels: ``C``.
        spatial_shape: ``S``.
        spacing: grid spacing per axis (default 1).
        bin_width: shell width (default: fundamental of the longest side).
        max_wavenumber: highest shell used (default: the smallest Nyquist frequency); at
            least two shells are needed.

    Example:
        >>> import torch
        >>> metric = ShellCorrelation(num_channels=1, spatial_shape=(16, 16))
        >>> g = torch.Generator().manual_seed(0)
        >>> metric.update(torch.randn(64, 8, 1, 16, 16, generator=g))    # white noise: independent shells
        >>> bool(metric.compute().abs().item() < 4 * metric.standard_error().item())
        True
    """

    higher_is_better = None

    def __init__(
        self,
        num_channels: int,
        spatial_shape: Sequence[int],
        spacing: float | Sequence[float] | None = None,
        bin_width: float | None = None,
        max_wavenumber: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(num_channels, spatial_shape, spacing, bin_width, **kwargs)
        self._compared = self._compared_shells(max_wavenumber, fewest=2)
        k = int(self._compared.sum())
        self.add_state("cross", torch.zeros(self.num_channels, k, k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("dof", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, samples: Tensor, mask: Tensor | None = None) -> None:
        """Args:
        samples: ensembles ``[B, M, C, *S]``, ``M >= 2`` (one member adds nothing).
        mask: 0/1 broadcastable to ``[C, *S]``, or one per sample ``[B, C, *S]``, or ``None``.
        """
        ndim = len(self.bins.spatial_shape) + 3
        if samples.ndim != ndim:
            raise ValueError(f"samples must be ensembles [B, M, C, *S] with {ndim} dims, got shape "
                             f"{tuple(samples.shape)}")
        b, m = samples.shape[:2]
        fields = self._fields(samples, "samples", allow_members=True)
        if mask is not None and mask.ndim == ndim - 1 and mask.shape[0] == b and b > 1:
            mask = mask.unsqueeze(1).expand(b, m, *mask.shape[1:]).flatten(0, 1)
        tiny = torch.finfo(torch.float64).tiny
        compared = self._compared.to(fields.device)
        log_power = torch.log(_shell_power(fields, self.bins, mask)[..., compared].clamp_min(tiny))
        log_power = log_power.reshape(b, m, self.num_channels, -1)
        centred = log_power - log_power.mean(dim=1, keepdim=True)
        self.cross = self.cross + torch.einsum("bmck,bmcl->ckl", centred, centred)
        self.dof = self.dof + b * (m - 1)

    def compute(self) -> Tensor:
        """Returns: ``[C]``, the mean off-diagonal correlation (NaN before two members of a sample)."""
        var = torch.diagonal(self.cross, dim1=1, dim2=2)
        corr = self.cross / torch.sqrt(var.unsqueeze(2) * var.unsqueeze(1))
        k = corr.shape[-1]
        off = ~torch.eye(k, dtype=torch.bool, device=corr.device)
        value = corr[:, off].mean(dim=1)
        return torch.where(self.dof > 0, value, torch.full_like(value, float("nan")))

    def standard_error(self) -> Tensor:
        """Scalar: the metric's standard error when the shells are independent, ``1 / sqrt(dof x pairs)``."""
        k = int(self._compared.sum())
        with self.sync_context():  # a collective under DDP, as compute
            return 1.0 / torch.sqrt(self.dof * (k * (k - 1) / 2))


__all__ = [
    "PowerSpectrum",
    "RadialBins",
    "RadialSpectrum",
    "ShellCorrelation",
    "SpectralError",
    "radial_bins",
    "radial_power_spectrum",
]
