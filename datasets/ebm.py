"""A stochastic two-dimensional energy-balance model (EBM) of the surface temperature.

Budyko (1969), Sellers (1969), North & Coakley (1979), North, Cahalan & Coakley (1981),
on a regular latitude-longitude grid, with land/sea heat capacities and weather noise.
Per unit area, for the surface temperature ``T(lat, lon, t)`` in K:

    C dT/dt = Q(lat, t) (1 - alpha(T, lat))          absorbed sunlight               [W m-2]
              - (A + B (T - T_0) - F)                 outgoing longwave, CO2 forcing   [W m-2]
              + D lap(T)                              heat transport as diffusion      [W m-2]
              + eta                                   red-noise weather forcing        [W m-2]

* ``C`` [J m-2 K-1]: ``C_OCEAN`` (a 50 m ocean mixed layer) or ``C_LAND`` from the land-sea mask.
* ``Q`` [W m-2]: daily-mean top-of-atmosphere insolation for a circular orbit,
  ``Q = (S0/pi) (h0 sin(lat) sin(delta) + cos(lat) cos(delta) sin(h0))``, ``cos h0 = -tan(lat) tan(delta)``,
  declination ``sin(delta) = sin(eps) sin(2 pi (day - 80) / 365)``, obliquity ``eps``.
* ``alpha`` [1]: ``alpha_free(lat) (1 - f_ice) + ALBEDO_ICE f_ice`` with ice fraction
  ``f_ice = (1 - tanh((T - T_ICE) / ICE_WIDTH)) / 2`` and
  ``alpha_free = ALBEDO_0 + ALBEDO_2 P2(sin lat)`` (clouds and zenith angle, North 1975).
* ``A`` [W m-2], ``B`` [W m-2 K-1]: linearised OLR about ``T_0 = 273.15 K``; ``F`` [W m-2]: CO2 forcing.
* ``lap`` [1]: the Laplacian on the unit sphere with its metric terms,
  ``(1/cos lat) d/dlat (cos lat dT/dlat) + (1/cos^2 lat) d^2T/dlon^2``; ``D`` [W m-2 K-1].
  (The thermal diffusivity in m2 s-1 is ``D R^2 / C``.) Discretised with conservative
  finite volumes: the area-weighted global mean of ``lap(T)`` is zero to rounding.
* ``eta`` [W m-2]: AR(1) in time with e-folding time ``NOISE_TIME``, Gaussian-smoothed in
  space over ``NOISE_LENGTH`` and rescaled to standard deviation ``NOISE_STD`` at every point.

Time stepping (one day, ``dt``): the linear terms (OLR and diffusion) are implicit, the rest
explicit (semi-implicit Euler),

    (C/dt + B - D lap) T^{n+1} = (C/dt) T^n + Q^n (1 - alpha(T^n)) - A + B T_0 + F + eta^n,

with one sparse LU factorisation per batch of simulations (block diagonal). The explicit
ice-albedo term is stable for ``dt < 2 C_LAND / max(Q dalpha/dT)`` (about 2.8 days here).
Integrations start from the annual-mean equilibrium (a damped fixed point of the
time-independent equation with annual-mean insolation, warm start).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

EARTH_RADIUS = 6.371e6  # m
SECONDS_PER_DAY = 86400.0
DAYS_PER_YEAR = 365
MONTH_LENGTHS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)  # 365-day ("noleap") calendar
OBLIQUITY = np.deg2rad(23.44)
VERNAL_EQUINOX_DAY = 80  # day of year (0-based), 21 March

T_0 = 273.15  # K, reference temperature of the OLR fit
OLR_A = 203.3  # W m-2 (North et al. 1981)
OLR_B = 2.09  # W m-2 K-1
C_OCEAN = 1025.0 * 3990.0 * 50.0  # J m-2 K-1: density * specific heat * 50 m mixed layer
C_LAND = 3.0e6  # J m-2 K-1
ALBEDO_0 = 0.31
ALBEDO_2 = 0.10  # coefficient of P2(sin lat) in the ice-free albedo
ALBEDO_ICE = 0.62
T_ICE = 263.15  # K, centre of the ice transition
ICE_WIDTH = 3.0  # K
T_SEAWATER_FREEZE = 271.35  # K
NOISE_STD = 15.0  # W m-2
NOISE_TIME = 5.0  # days
NOISE_LENGTH = 1.5e6  # m


@dataclass(frozen=True)
class Grid:
    """Regular lat/lon grid of cell centres; lat south to north, lon from 0 east."""

    nlat: int
    nlon: int

    def __post_init__(self):
        if self.nlat < 4 or self.nlon < 4:
            raise ValueError(f"grid must be at least 4 x 4, got {self.nlat} x {self.nlon}")

    @property
    def size(self) -> int:
        return self.nlat * self.nlon

    @cached_property
    def lat_edges(self) -> np.ndarray:  # radians, nlat + 1
        return np.linspace(-np.pi / 2, np.pi / 2, self.nlat + 1)

    @cached_property
    def lat(self) -> np.ndarray:  # radians
        return 0.5 * (self.lat_edges[1:] + self.lat_edges[:-1])

    @cached_property
    def lon(self) -> np.ndarray:  # radians
        return (np.arange(self.nlon) + 0.5) * (2 * np.pi / self.nlon)

    @property
    def dlat(self) -> float:
        return np.pi / self.nlat

    @property
    def dlon(self) -> float:
        return 2 * np.pi / self.nlon

    @cached_property
    def area_weights(self) -> np.ndarray:
        """Cell areas as fractions of the sphere, [nlat, nlon], summing to 1."""
        band = np.diff(np.sin(self.lat_edges)) / 2  # fraction of the sphere in each band
        return np.repeat(band[:, None] / self.nlon, self.nlon, axis=1)

    def global_mean(self, field: np.ndarray) -> np.ndarray:
        """Area-weighted mean over the last two axes (lat, lon)."""
        return (field * self.area_weights).sum(axis=(-2, -1))

    @cached_property
    def laplacian(self) -> sp.csr_matrix:
        """Finite-volume Laplacian on the unit sphere, [N, N] acting on T.ravel() (lat-major)."""
        nlat, nlon = self.nlat, self.nlon
        index = np.arange(self.size).reshape(nlat, nlon)
        band = np.diff(np.sin(self.lat_edges))  # cell area / dlon
        rows, cols, vals = [], [], []

        # meridional faces between bands j and j+1: flux per unit lon = cos(lat_face) (T_{j+1} - T_j) / dlat
        for j in range(nlat - 1):
            coeff = np.cos(self.lat_edges[j + 1]) / self.dlat
            a, b = index[j], index[j + 1]
            for src, dst, area in ((a, b, band[j]), (b, a, band[j + 1])):
                rows += [src, src]
                cols += [dst, src]
                vals += [np.full(nlon, coeff / area), np.full(nlon, -coeff / area)]
        # zonal faces: flux per unit lat = (T_{i+1} - T_i) / (cos(lat) dlon), face length dlat
        for j in range(nlat):
            coeff = self.dlat / (np.cos(self.lat[j]) * self.dlon) / (band[j] * self.dlon)
            a = index[j]
            for b in (np.roll(a, -1), np.roll(a, 1)):
                rows += [a, a]
                cols += [b, a]
                vals += [np.full(nlon, coeff), np.full(nlon, -coeff)]
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(self.size, self.size)
        )


def land_sea_mask(grid: Grid) -> np.ndarray:
    """Idealised continents (1 = land, 0 = ocean), float [nlat, nlon], deterministic.

    Ellipses on the sphere (centre lat/lon in degrees, semi-axes in degrees of latitude and of
    great-circle longitude) shaped like Earth's continents, and a polar cap south of 70 S.
    """
    continents = (  # (lat0, lon0, semi-axis lat, semi-axis lon)
        (48.0, 255.0, 22.0, 32.0),  # North America
        (-15.0, 300.0, 28.0, 14.0),  # South America
        (52.0, 75.0, 18.0, 55.0),  # Eurasia
        (5.0, 20.0, 30.0, 20.0),  # Africa
        (-25.0, 135.0, 10.0, 16.0),  # Australia
        (72.0, 318.0, 10.0, 12.0),  # Greenland
    )
    lat = np.rad2deg(grid.lat)[:, None]
    lon = np.rad2deg(grid.lon)[None, :]
    land = lat < -70.0
    for lat0, lon0, a, b in continents:
        dlon = (lon - lon0 + 180.0) % 360.0 - 180.0
        land = land | (((lat - lat0) / a) ** 2 + (dlon * np.cos(np.deg2rad(lat0)) / b) ** 2 < 1.0)
    return land.astype(np.float64)


def daily_insolation(lat: np.ndarray, day: np.ndarray | float, solar_constant: float = 1.0) -> np.ndarray:
    """Daily-mean TOA insolation [W m-2] at latitudes ``lat`` (radians) on day-of-year ``day``.

    Circular orbit; broadcasts ``lat`` against ``day``.
    """
    delta = np.arcsin(np.sin(OBLIQUITY) * np.sin(2 * np.pi * (np.asarray(day) - VERNAL_EQUINOX_DAY) / DAYS_PER_YEAR))
    cos_h0 = np.clip(-np.tan(lat) * np.tan(delta), -1.0, 1.0)
    h0 = np.arccos(cos_h0)  # half-day length in radians of hour angle (0 = polar night, pi = polar day)
    return solar_constant / np.pi * (h0 * np.sin(lat) * np.sin(delta) + np.cos(lat) * np.cos(delta) * np.sin(h0))


def ice_fraction(temperature: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 - np.tanh((temperature - T_ICE) / ICE_WIDTH))


def albedo(temperature: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Planetary albedo [1] of cells at ``temperature`` [K] and latitude ``lat`` (radians, broadcast)."""
    p2 = 0.5 * (3 * np.sin(lat) ** 2 - 1)
    f = ice_fraction(temperature)
    return (ALBEDO_0 + ALBEDO_2 * p2) * (1 - f) + ALBEDO_ICE * f


def outgoing_longwave(temperature: np.ndarray, co2_forcing) -> np.ndarray:
    """OLR [W m-2] = A + B (T - T_0) - F."""
    return OLR_A + OLR_B * (temperature - T_0) - co2_forcing


@dataclass(frozen=True)
class EBMParameters:
    co2_forcing: float  # W m-2
    diffusivity: float  # W m-2 K-1
    solar_constant: float  # W m-2


class NoiseSmoother:
    """Linear map from white noise to unit-variance noise correlated over ``NOISE_LENGTH``.

    Separable: a periodic Gaussian filter along each latitude row (width NOISE_LENGTH / (R cos lat)
    in longitude, as a spectral transfer function), rows rescaled to unit variance, then a
    Gaussian filter across rows (matrix G), rescaled so every point has unit variance exactly.
    """

    def __init__(self, grid: Grid):
        sigma_lon = NOISE_LENGTH / (EARTH_RADIUS * np.cos(grid.lat) * grid.dlon)  # grid cells, [nlat]
        m = np.fft.rfftfreq(grid.nlon) * 2 * np.pi  # radians per cell
        h = np.exp(-0.5 * (m[None, :] * sigma_lon[:, None]) ** 2)  # [nlat, nlon//2+1]
        # variance of a circulant filter of white noise: mean over all nlon modes of |H|^2
        full = np.exp(-0.5 * (np.fft.fftfreq(grid.nlon)[None, :] * 2 * np.pi * sigma_lon[:, None]) ** 2)
        self.transfer = h / np.sqrt((full**2).mean(axis=1, keepdims=True))
        sigma_lat = NOISE_LENGTH / (EARTH_RADIUS * grid.dlat)
        j = np.arange(grid.nlat)
        g = np.exp(-0.5 * ((j[:, None] - j[None, :]) / sigma_lat) ** 2)
        self.g = g / np.sqrt((g**2).sum(axis=1, keepdims=True))
        self.nlon = grid.nlon

    def __call__(self, white: np.ndarray) -> np.ndarray:
        """white: [..., nlat, nlon] -> smoothed, unit variance, same shape."""
        rows = np.fft.irfft(np.fft.rfft(white, axis=-1) * self.transfer, n=self.nlon, axis=-1)
        return np.einsum("ij,...jk->...ik", self.g, rows)


@dataclass
class MonthlyMeans:
    """Monthly means per simulation, each [S, months, nlat, nlon]."""

    tas: np.ndarray  # K
    rlut: np.ndarray  # W m-2
    sst: np.ndarray  # K, NaN over land
    ice_fraction: np.ndarray  # 1


def simulate(
    grid: Grid,
    land: np.ndarray,
    params: list[EBMParameters],
    noise_seeds: list[np.random.SeedSequence],
    *,
    years: int,
    spinup_years: int,
    dt_days: float = 1.0,
    noise_std: float = NOISE_STD,
) -> MonthlyMeans:
    """Integrate ``len(params)`` independent simulations together; return the monthly means
    of the ``years`` after ``spinup_years`` discarded years.

    Simulation ``s`` draws its weather noise only from ``noise_seeds[s]``, so results do not
    depend on how simulations are batched.
    """
    if years < 1 or spinup_years < 0:
        raise ValueError(f"years must be >= 1 and spinup_years >= 0, got {years}, {spinup_years}")
    steps_per_day = round(1.0 / dt_days)
    if not np.isclose(steps_per_day * dt_days, 1.0):
        raise ValueError(f"dt_days must divide one day, got {dt_days}")
    n_sim, n = len(params), grid.size
    dt = dt_days * SECONDS_PER_DAY
    heat_capacity = np.where(land.ravel() > 0.5, C_LAND, C_OCEAN)  # [N]
    co2 = np.array([p.co2_forcing for p in params])[:, None]  # [S, 1]
    s0 = np.array([p.solar_constant for p in params])[:, None]
    lap = grid.laplacian
    lat = np.repeat(grid.lat, grid.nlon)  # [N]

    # implicit operator, block diagonal over simulations
    eye = sp.identity(n, format="csr")
    implicit = sp.block_diag(
        [sp.diags(heat_capacity / dt + OLR_B) - p.diffusivity * lap for p in params], format="csc"
    )
    lu = spla.splu(implicit)

    temperature = _annual_mean_equilibrium(grid, lat, lap, eye, params, co2, s0)  # [S, N]

    smoother = NoiseSmoother(grid)
    rngs = [np.random.default_rng(seq) for seq in noise_seeds]
    rho = np.exp(-dt_days / NOISE_TIME)
    eta = np.zeros((n_sim, n))
    insolation_shape = daily_insolation(lat[None, :], np.arange(DAYS_PER_YEAR)[:, None])  # per unit S0, [365, N]
    ocean = land.ravel() < 0.5

    months_out = 12 * years
    out = {k: np.empty((n_sim, months_out, n), np.float64) for k in ("tas", "ice", "sst")}
    for year in range(spinup_years + years):
        day = 0
        for month, length in enumerate(MONTH_LENGTHS):
            steps = length * steps_per_day
            white = np.stack([r.standard_normal((steps, grid.nlat, grid.nlon)) for r in rngs], axis=1)
            kicks = smoother(white).reshape(steps, n_sim, n)  # unit variance, [steps, S, N]
            acc = {k: np.zeros((n_sim, n)) for k in out}
            for step in range(steps):
                eta = rho * eta + np.sqrt(1 - rho**2) * noise_std * kicks[step]
                q = s0 * insolation_shape[day + step // steps_per_day]
                rhs = (heat_capacity / dt) * temperature + q * (1 - albedo(temperature, lat)) \
                    - OLR_A + OLR_B * T_0 + co2 + eta
                temperature = lu.solve(rhs.ravel()).reshape(n_sim, n)
                acc["tas"] += temperature
                acc["ice"] += ice_fraction(temperature)
                acc["sst"] += np.maximum(temperature, T_SEAWATER_FREEZE)
            day += length
            if year >= spinup_years:
                k = 12 * (year - spinup_years) + month
                for name in out:
                    out[name][:, k] = acc[name] / steps
    shape = (n_sim, months_out, grid.nlat, grid.nlon)
    tas = out["tas"].reshape(shape)
    sst = np.where(ocean, out["sst"], np.nan).reshape(shape)
    return MonthlyMeans(
        tas=tas,
        rlut=outgoing_longwave(tas, co2[:, :, None, None]),
        sst=sst,
        ice_fraction=out["ice"].reshape(shape),
    )


def _annual_mean_equilibrium(grid, lat, lap, eye, params, co2, s0, iterations: int = 200) -> np.ndarray:
    """Steady state of the annual-mean, noise-free model from a warm start: [S, N] in K.

    Damped fixed point of (B - D lap) T = Q_ann (1 - alpha(T)) - A + B T_0 + F.
    """
    q_ann = daily_insolation(lat[None, :], np.arange(DAYS_PER_YEAR)[:, None]).mean(axis=0)  # per unit S0
    temperature = np.full((len(params), grid.size), 288.0)
    for s, p in enumerate(params):
        lu = spla.splu((OLR_B * eye - p.diffusivity * lap).tocsc())
        t = temperature[s]
        for _ in range(iterations):
            rhs = s0[s] * q_ann * (1 - albedo(t, lat)) - OLR_A + OLR_B * T_0 + co2[s]
            t_new = lu.solve(rhs)
            if np.max(np.abs(t_new - t)) < 1e-6:
                t = t_new
                break
            t = 0.5 * t + 0.5 * t_new
        temperature[s] = t
    return temperature
