"""Monthly climate fields from the stochastic energy-balance model in :mod:`.ebm`, as a zarr store.

The model, in brief (units per m2 of surface; details, constants and numerics in ``ebm.py``):

    C dT/dt = Q(lat, t) (1 - alpha(T, lat)) - (A + B (T - 273.15 K) - F_co2) + D lap(T) + eta

``T`` [K] surface temperature, ``C`` [J m-2 K-1] land or ocean heat capacity from the
land-sea mask, ``Q`` [W m-2] daily-mean insolation scaled by the solar constant ``S0``,
``alpha`` [1] albedo with ice-albedo feedback, ``A`` [W m-2] and ``B`` [W m-2 K-1] the
linearised outgoing longwave radiation, ``F_co2`` [W m-2] the CO2 forcing, ``D``
[W m-2 K-1] the diffusivity of the unit-sphere Laplacian ``lap`` with its metric terms,
``eta`` [W m-2] red-noise weather forcing.

Each simulation draws ``F_co2``, ``D`` and ``S0`` uniformly from their ranges and its own
noise; samples are the monthly means of its output years, simulation-major:
``sample = (simulation * years + year) * 12 + month``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import xarray as xr

from . import ebm
from ._store import SAMPLE_DIM, Block, StoreSpec, base_attrs, lazy

FIRST_YEAR = 2000
MAX_UNKNOWNS_PER_BATCH = 32768  # simulations integrated together share one sparse LU of this size


@dataclass(frozen=True)
class ClimateSettings:
    grid: tuple[int, int]  # (nlat, nlon)
    simulations: int
    years: int  # output years per simulation
    spinup_years: int
    co2_forcing: tuple[float, float] = (0.0, 8.0)  # W m-2
    diffusivity: tuple[float, float] = (0.35, 0.75)  # W m-2 K-1
    solar_constant: tuple[float, float] = (1340.0, 1400.0)  # W m-2

    def __post_init__(self):
        ebm.Grid(*self.grid)  # validates the grid
        if self.simulations < 1:
            raise ValueError(f"simulations must be >= 1, got {self.simulations}")
        if self.years < 1:
            raise ValueError(f"years must be >= 1, got {self.years}")
        if self.spinup_years < 0:
            raise ValueError(f"spinup_years must be >= 0, got {self.spinup_years}")
        for name in ("co2_forcing", "diffusivity", "solar_constant"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise ValueError(f"{name} range must satisfy lo <= hi, got {(lo, hi)}")
        if self.diffusivity[0] < 0 or self.solar_constant[0] <= 0:
            raise ValueError("diffusivity must be >= 0 and solar_constant > 0")

    def replace(self, **changes) -> "ClimateSettings":
        return dataclasses.replace(self, **changes)


SIZES = {
    "tiny": ClimateSettings(grid=(16, 32), simulations=4, years=2, spinup_years=3),
    "small": ClimateSettings(grid=(32, 64), simulations=16, years=10, spinup_years=10),
    "full": ClimateSettings(grid=(64, 128), simulations=32, years=30, spinup_years=20),
}

FIELDS = {  # name -> (MonthlyMeans attribute, units, long_name, standard_name)
    "tas": ("tas", "K", "monthly-mean surface temperature", "surface_temperature"),
    "rlut": ("rlut", "W m-2", "monthly-mean outgoing longwave radiation at the top of the atmosphere",
             "toa_outgoing_longwave_flux"),
    "sst": ("sst", "K", "monthly-mean sea surface temperature (max(T, 271.35 K)); NaN over land",
            "sea_surface_temperature"),
    "ice_fraction": ("ice_fraction", "1", "monthly-mean ice cover fraction", None),
}
PARAMETERS = {  # name -> (units, long_name)
    "co2_forcing": ("W m-2", "CO2 radiative forcing F_co2 (reduces OLR)"),
    "diffusivity": ("W m-2 K-1", "heat diffusion coefficient D of the unit-sphere Laplacian"),
    "solar_constant": ("W m-2", "solar constant S0"),
}


def draw_parameters(settings: ClimateSettings, seed: np.random.SeedSequence) -> list[ebm.EBMParameters]:
    rng = np.random.default_rng(seed)
    values = {name: rng.uniform(*getattr(settings, name), size=settings.simulations).astype(np.float32)
              for name in PARAMETERS}
    return [ebm.EBMParameters(**{k: float(v[s]) for k, v in values.items()}) for s in range(settings.simulations)]


def make_store(settings: ClimateSettings, *, seed: int, size: str) -> StoreSpec:
    s = settings
    grid = ebm.Grid(*s.grid)
    land = ebm.land_sea_mask(grid)
    param_seed, noise_root = np.random.SeedSequence(seed).spawn(2)
    params = draw_parameters(s, param_seed)
    noise_seeds = noise_root.spawn(s.simulations)
    months = 12 * s.years
    n = s.simulations * months

    simulation = np.repeat(np.arange(s.simulations, dtype=np.int32), months)
    year = np.tile(np.repeat(np.arange(FIRST_YEAR, FIRST_YEAR + s.years, dtype=np.int32), 12), s.simulations)
    month = np.tile(np.arange(1, 13, dtype=np.int32), s.years * s.simulations)
    time = np.array([f"{y:04d}-{m:02d}-01" for y, m in zip(year, month)], dtype="datetime64[ns]")
    spatial = ("lat", "lon")

    data_vars = {
        name: ((SAMPLE_DIM,) + spatial, lazy((n,) + s.grid, np.float32),
               {"units": units, "long_name": long_name, **({"standard_name": std} if std else {})})
        for name, (_, units, long_name, std) in FIELDS.items()
    }
    for name, (units, long_name) in PARAMETERS.items():
        lo, hi = getattr(s, name)
        per_sim = np.array([getattr(p, name) for p in params], np.float32)
        data_vars[name] = (SAMPLE_DIM, np.repeat(per_sim, months),
                           {"units": units, "long_name": long_name, "valid_min": lo, "valid_max": hi})
    data_vars["land_sea_mask"] = (spatial, land.astype(np.float32), {
        "units": "1", "long_name": "land-sea mask (1 = land, 0 = ocean)", "standard_name": "land_binary_mask"})

    template = xr.Dataset(
        data_vars,
        coords={
            SAMPLE_DIM: (SAMPLE_DIM, np.arange(n, dtype=np.int64), {"units": "1", "long_name": "sample index"}),
            "lat": ("lat", np.rad2deg(grid.lat), {"units": "degrees_north", "long_name": "latitude",
                                                  "standard_name": "latitude", "axis": "Y"}),
            "lon": ("lon", np.rad2deg(grid.lon), {"units": "degrees_east", "long_name": "longitude",
                                                  "standard_name": "longitude", "axis": "X"}),
            "time": (SAMPLE_DIM, time, {"long_name": "first day of the averaged month (365-day model year)",
                                        "standard_name": "time"}),
            "year": (SAMPLE_DIM, year, {"units": "1", "long_name": "calendar year"}),
            "month": (SAMPLE_DIM, month, {"units": "1", "long_name": "month of the year (1-12)"}),
            "simulation": (SAMPLE_DIM, simulation, {"units": "1", "long_name": "simulation (parameter setting) index"}),
        },
        attrs=base_attrs(
            "climate", seed, size,
            title="Monthly means of a stochastic 2-D energy-balance climate model",
            parameters=" ".join(PARAMETERS),
            fields=" ".join(FIELDS),
            spatial_dims="lat lon",
            grid=list(s.grid),
            simulations=s.simulations,
            years=s.years,
            spinup_years=s.spinup_years,
            first_year=FIRST_YEAR,
            calendar="noleap",
            time_step_days=1.0,
            co2_forcing_range=list(s.co2_forcing),
            diffusivity_range=list(s.diffusivity),
            solar_constant_range=list(s.solar_constant),
            model=("C dT/dt = Q(lat,t)(1 - alpha(T,lat)) - (A + B(T - 273.15 K) - F_co2) + D lap(T) + eta; "
                   f"A = {ebm.OLR_A} W m-2, B = {ebm.OLR_B} W m-2 K-1, C_ocean = {ebm.C_OCEAN:.3g} J m-2 K-1, "
                   f"C_land = {ebm.C_LAND:.3g} J m-2 K-1, albedo = ({ebm.ALBEDO_0} + {ebm.ALBEDO_2} P2(sin lat))"
                   f"(1 - f_ice) + {ebm.ALBEDO_ICE} f_ice, f_ice = (1 - tanh((T - {ebm.T_ICE} K)/{ebm.ICE_WIDTH} K))/2, "
                   f"eta: AR(1) {ebm.NOISE_TIME} d, {ebm.NOISE_LENGTH / 1e3:.0f} km, {ebm.NOISE_STD} W m-2"),
        ),
    )

    batch = max(1, MAX_UNKNOWNS_PER_BATCH // grid.size)

    def blocks() -> Iterator[Block]:
        for first in range(0, s.simulations, batch):
            sims = range(first, min(first + batch, s.simulations))
            means = ebm.simulate(grid, land, [params[i] for i in sims], [noise_seeds[i] for i in sims],
                                 years=s.years, spinup_years=s.spinup_years)
            yield Block(first * months, xr.Dataset({
                name: ((SAMPLE_DIM,) + spatial,
                       getattr(means, attr).reshape((len(sims) * months,) + s.grid).astype(np.float32))
                for name, (attr, *_) in FIELDS.items()
            }))

    return StoreSpec(template, blocks())
