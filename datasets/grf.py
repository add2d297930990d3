"""Periodic Gaussian random fields with power spectrum P(k) = A k^(-n), and their exact likelihood.

Grid: ``shape = (N_1, ..., N_d)`` points with unit spacing, periodic; ``N = prod N_i``.
Wavevector of DFT mode ``m``: ``k_i = 2 pi m_i / N_i`` (radians per grid spacing),
``m_i`` the integer FFT frequencies, so ``|k|`` runs from ``k_min = 2 pi / max N_i``
to ``pi sqrt(d)``.

With ``F(m) = sum_x f(x) exp(-2 pi i m.x / N)`` (numpy's ``fftn``), a stationary
zero-mean Gaussian field with power spectrum ``P`` has independent Fourier modes
(Hermitian symmetric) with ``E |F(m)|^2 = N P(k_m)``. Equivalently its covariance
is the circulant matrix ``C = U^H diag(P) U`` with ``U = fftn / sqrt(N)`` unitary,
so the eigenvalues of ``C`` are exactly ``P(k_m)``:

    sampling:        f = ifftn( sqrt(P) * fftn(w) ),  w ~ N(0, I_N)        (f = C^{1/2} w)
    log-likelihood:  log p(f) = -1/2 sum_m [ |F(m)|^2 / (N P_m) + log(2 pi P_m) ]   (nats)

The k = 0 (mean) mode has no power-law value; it gets ``P(0) = A k_min^(-n)`` so
that the distribution is a full-rank Gaussian with a density on R^N.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import xarray as xr

from ._store import SAMPLE_DIM, Block, StoreSpec, base_attrs, lazy, sample_chunk

log = logging.getLogger(__name__)

SPATIAL_DIMS = {1: ("x",), 2: ("y", "x"), 3: ("z", "y", "x")}


@dataclass(frozen=True)
class GRFSettings:
    shape: tuple[int, ...]  # spatial shape, slowest axis first: (nx,), (ny, nx) or (nz, ny, nx)
    num_samples: int
    spectral_index: tuple[float, float] = (1.0, 3.5)  # n ~ uniform[lo, hi]
    amplitude: tuple[float, float] = (0.5, 2.0)  # A ~ log-uniform[lo, hi]

    def __post_init__(self):
        if len(self.shape) not in SPATIAL_DIMS:
            raise ValueError(f"shape must have 1, 2 or 3 entries, got {self.shape}")
        if min(self.shape) < 2:
            raise ValueError(f"shape entries must be >= 2, got {self.shape}")
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        lo, hi = self.amplitude
        if not 0 < lo <= hi:
            raise ValueError(f"amplitude range must satisfy 0 < lo <= hi, got {self.amplitude}")
        lo, hi = self.spectral_index
        if not lo <= hi:
            raise ValueError(f"spectral_index range must satisfy lo <= hi, got {self.spectral_index}")


SIZES: dict[str, dict[int, tuple[int, tuple[int, ...]]]] = {
    # size -> dims -> (num_samples, shape)
    "tiny": {1: (64, (64,)), 2: (64, (32, 32)), 3: (32, (16, 16, 16))},
    "small": {1: (4096, (256,)), 2: (4096, (64, 64)), 3: (1024, (32, 32, 32))},
    "full": {1: (16384, (1024,)), 2: (16384, (128, 128)), 3: (2048, (64, 64, 64))},
}


def wavenumber(shape: tuple[int, ...]) -> np.ndarray:
    """|k| of every mode of ``fftn`` on ``shape`` (radians per grid spacing), float64 ``shape``."""
    axes = np.meshgrid(*[2 * np.pi * np.fft.fftfreq(n) for n in shape], indexing="ij")
    return np.sqrt(sum(k**2 for k in axes))


def power_spectrum(shape: tuple[int, ...], amplitude: np.ndarray, spectral_index: np.ndarray) -> np.ndarray:
    """P(k_m) = A k^-n on every mode, with P(0) = A k_min^-n.

    amplitude, spectral_index: [B] -> returns float64 [B, *shape].
    """
    amplitude = np.asarray(amplitude, np.float64).reshape((-1,) + (1,) * len(shape))
    spectral_index = np.asarray(spectral_index, np.float64).reshape((-1,) + (1,) * len(shape))
    k = wavenumber(shape)
    k[(0,) * len(shape)] = 2 * np.pi / max(shape)  # k_min stands in for the mean mode
    return amplitude * k ** (-spectral_index)


def sample_fields(noise: np.ndarray, amplitude: np.ndarray, spectral_index: np.ndarray) -> np.ndarray:
    """Colour white noise ``w`` [B, *shape] into fields ``C^{1/2} w`` (float64 [B, *shape])."""
    shape = noise.shape[1:]
    axes = tuple(range(1, noise.ndim))
    p = power_spectrum(shape, amplitude, spectral_index)
    return np.fft.ifftn(np.sqrt(p) * np.fft.fftn(noise, axes=axes), axes=axes).real


def log_likelihood(fields: np.ndarray, amplitude: np.ndarray, spectral_index: np.ndarray) -> np.ndarray:
    """Exact log-density (nats) of ``fields`` [B, *shape] under P = A k^-n; float64 [B]."""
    fields = np.asarray(fields, np.float64)
    shape = fields.shape[1:]
    axes = tuple(range(1, fields.ndim))
    n_points = int(np.prod(shape))
    p = power_spectrum(shape, amplitude, spectral_index)
    f_hat = np.fft.fftn(fields, axes=axes)
    quad = (np.abs(f_hat) ** 2 / (n_points * p)).sum(axis=axes)
    return -0.5 * (quad + np.log(2 * np.pi * p).sum(axis=axes))


def _draw_parameters(rng: np.random.Generator, s: GRFSettings) -> tuple[np.ndarray, np.ndarray]:
    n = rng.uniform(*s.spectral_index, size=s.num_samples)
    log_a = rng.uniform(np.log(s.amplitude[0]), np.log(s.amplitude[1]), size=s.num_samples)
    # parameters are stored in float32; the fields are generated from the stored values
    return n.astype(np.float32), np.exp(log_a).astype(np.float32)


def make_store(settings: GRFSettings, *, seed: int, size: str) -> StoreSpec:
    s = settings
    dims = SPATIAL_DIMS[len(s.shape)]
    param_seed, noise_seed = np.random.SeedSequence(seed).spawn(2)
    spectral_index, amplitude = _draw_parameters(np.random.default_rng(param_seed), s)

    coords = {
        d: (d, np.arange(n, dtype=np.float64),
            {"units": "1", "long_name": f"{d} position in grid spacings (periodic)", "axis": d.upper()})
        for d, n in zip(dims, s.shape)
    }
    sample = (SAMPLE_DIM, np.arange(s.num_samples, dtype=np.int64), {"units": "1", "long_name": "sample index"})
    template = xr.Dataset(
        {
            "field": ((SAMPLE_DIM,) + dims, lazy((s.num_samples,) + s.shape, np.float32),
                      {"units": "1", "long_name": "Gaussian random field"}),
            "spectral_index": (SAMPLE_DIM, spectral_index, {
                "units": "1", "long_name": "spectral index n of P(k) = A k^-n",
                "valid_min": s.spectral_index[0], "valid_max": s.spectral_index[1]}),
            "amplitude": (SAMPLE_DIM, amplitude, {
                "units": "1", "long_name": "amplitude A of P(k) = A k^-n (field^2 grid_spacing^d)",
                "valid_min": s.amplitude[0], "valid_max": s.amplitude[1], "distribution": "log-uniform"}),
            "log_likelihood": (SAMPLE_DIM, lazy((s.num_samples,), np.float64), {
                "units": "nat", "long_name": "exact log-density of the stored field under its generating Gaussian"}),
        },
        coords={SAMPLE_DIM: sample, **coords},
        attrs=base_attrs(
            "grf", seed, size,
            title=f"Periodic {len(s.shape)}-D Gaussian random fields with power spectrum A k^-n",
            parameters="spectral_index amplitude",
            fields="field",
            spatial_dims=" ".join(dims),
            dims=len(s.shape),
            shape=list(s.shape),
            grid_spacing=1.0,
            spectral_index_range=list(s.spectral_index),
            amplitude_range=list(s.amplitude),
            power_spectrum="A*k**(-n), k in radians per grid spacing, E|fftn(f)|^2 = N P(k)",
            k0_power="A*k_min**(-n), k_min = 2*pi/max(shape)",
        ),
    )

    def blocks() -> Iterator[Block]:
        rng = np.random.default_rng(noise_seed)
        step = sample_chunk(s.shape, 4)
        for start in range(0, s.num_samples, step):
            sl = slice(start, min(start + step, s.num_samples))
            noise = rng.standard_normal((sl.stop - start,) + s.shape)
            fields = sample_fields(noise, amplitude[sl], spectral_index[sl]).astype(np.float32)
            ll = log_likelihood(fields, amplitude[sl], spectral_index[sl])
            yield Block(start, xr.Dataset({
                "field": ((SAMPLE_DIM,) + dims, fields),
                "log_likelihood": (SAMPLE_DIM, ll),
            }))

    return StoreSpec(template, blocks())
