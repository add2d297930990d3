"""Tiny synthetic zarr stores, built per test in ``tmp_path``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import xarray as xr


@pytest.fixture(autouse=True)
def _quiet_zarr():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
        yield


def climate_like(n_time: int = 24, nan_points: bool = True, seed: int = 0) -> xr.Dataset:
    """(time, level, lat, lon) temperature with NaN 'land' points, positive precipitation,
    a CO2 parameter, a static land mask; lat 6 x lon 10 (not square)."""
    rng = np.random.default_rng(seed)
    lat, lon = np.linspace(-75, 75, 6), np.arange(10) * 36.0
    ta = (280 + 10 * rng.standard_normal((n_time, 3, 6, 10))).astype("f4")
    ta += np.arange(n_time, dtype="f4")[:, None, None, None]  # a trend, so splits have different stats
    land = np.zeros((6, 10), "f4")
    land[2:4, 3:6] = 1
    sst = (290 + 3 * rng.standard_normal((n_time, 6, 10))).astype("f4")
    if nan_points:
        sst[:, land == 1] = np.nan
    pr = rng.gamma(0.8, 2.0, (n_time, 6, 10)).astype("f4")
    pr[rng.random(pr.shape) < 0.3] = 0.0
    time = np.datetime64("2000-01-01") + np.arange(n_time) * np.timedelta64(182, "D")
    return xr.Dataset(
        {
            "ta": (("time", "level", "lat", "lon"), ta, {"units": "K", "long_name": "air temperature"}),
            "sst": (("time", "lat", "lon"), sst, {"units": "K"}),
            "pr": (("time", "lat", "lon"), pr, {"units": "mm day-1"}),
            "co2": (("time",), np.linspace(280, 560, n_time), {"units": "ppm"}),
            "land_mask": (("lat", "lon"), land, {"units": "1"}),
        },
        coords={
            "time": time,
            "level": ("level", np.array([1000, 850, 500]), {"units": "hPa"}),
            "lat": ("lat", lat, {"units": "degrees_north"}),
            "lon": ("lon", lon, {"units": "degrees_east"}),
        },
    )


def write(ds: xr.Dataset, path, chunk: int = 4):
    sample_dim = next(iter(ds.dims))
    enc = {v: {"chunks": tuple(chunk if d == sample_dim else s for d, s in zip(ds[v].dims, ds[v].shape))}
           for v in ds.data_vars if sample_dim in ds[v].dims}
    ds.to_zarr(path, encoding=enc)
    return str(path)


@pytest.fixture
def climate_store(tmp_path):
    return write(climate_like(), tmp_path / "climate.zarr")
