import numpy as np
import pytest
import xarray as xr

from scidiff_datasets import ebm


def test_tiny_store_schema(tiny_store):
    ds = xr.open_zarr(tiny_store("climate"))
    for name in ("tas", "rlut", "sst", "ice_fraction"):
        assert ds[name].dims == ("sample", "lat", "lon")
        assert ds[name].shape == (96, 16, 32)
    assert ds.land_sea_mask.dims == ("lat", "lon")
    units = {"tas": "K", "rlut": "W m-2", "sst": "K", "ice_fraction": "1", "co2_forcing": "W m-2",
             "diffusivity": "W m-2 K-1", "solar_constant": "W m-2", "land_sea_mask": "1",
             "lat": "degrees_north", "lon": "degrees_east"}
    for name, unit in units.items():
        assert ds[name].attrs["units"] == unit, name
        assert ds[name].attrs["long_name"], name
    assert ds.attrs["parameters"].split() == ["co2_forcing", "diffusivity", "solar_constant"]
    for name in ("time", "year", "month", "simulation"):
        assert ds[name].dims == ("sample",), name
    assert np.issubdtype(ds.time.dtype, np.datetime64)
    # simulation-major ordering, every simulation covers the same years
    assert list(ds.simulation.values[::24]) == [0, 1, 2, 3]
    assert set(ds.year.values.tolist()) == {2000, 2001}
    assert (ds.time.dt.month.values == ds.month.values).all()
    np.testing.assert_allclose(ds.lat.values[[0, -1]], [-84.375, 84.375])
    # parameters are constant within a simulation and inside their documented ranges
    for name, (lo, hi) in {"co2_forcing": (0, 8), "diffusivity": (0.35, 0.75), "solar_constant": (1340, 1400)}.items():
        v = ds[name].values.reshape(4, 24)
        assert (v == v[:, :1]).all() and v.min() >= lo and v.max() <= hi and v[:, 0].std() > 0, name


def test_fields_are_physical(tiny_store):
    ds = xr.open_zarr(tiny_store("climate")).load()
    land = ds.land_sea_mask.values > 0.5
    assert 0.2 < land.mean() < 0.45
    # sst: NaN exactly over land, never below the freezing point of sea water
    np.testing.assert_array_equal(ds.sst.isnull().values, np.broadcast_to(land, ds.sst.shape))
    assert float(ds.sst.min()) >= ebm.T_SEAWATER_FREEZE - 1e-3
    # OLR is the linear function of the monthly-mean temperature
    olr = ebm.OLR_A + ebm.OLR_B * (ds.tas - 273.15) - ds.co2_forcing
    np.testing.assert_allclose(ds.rlut.values, olr.values, atol=2e-3)
    # poles colder than the equator in the annual mean of every simulation
    zonal = ds.tas.groupby("simulation").mean().mean("lon")
    equator = zonal.isel(lat=[7, 8]).mean("lat")
    assert (zonal.isel(lat=0) < equator - 20).all() and (zonal.isel(lat=-1) < equator - 20).all()
    assert (equator > 295).all() and (equator < 315).all()  # hot corners: F = 8 W m-2, S0 = 1400 W m-2
    # ice where it is cold, none where it is warm
    assert float(ds.ice_fraction.where(ds.tas < 255).mean()) > 0.9
    assert float(ds.ice_fraction.where(ds.tas > 280).max()) < 0.01
    # seasons: northern mid-latitude land is warmer in July than in January, by more than the ocean
    mid = ds.lat.values > 35
    nh = ds.tas.isel(lat=np.flatnonzero(mid & (ds.lat.values < 65)))
    mask = ds.land_sea_mask.isel(lat=np.flatnonzero(mid & (ds.lat.values < 65))) > 0.5
    july, jan = nh.where(ds.month == 7, drop=True).mean("sample"), nh.where(ds.month == 1, drop=True).mean("sample")
    swing = july - jan
    assert float(swing.where(mask).mean()) > 15 and float(swing.where(~mask).mean()) > 1
    assert float(swing.where(mask).mean()) > 3 * float(swing.where(~mask).mean())


def test_laplacian_conserves_energy_and_has_sphere_eigenvalues():
    grid = ebm.Grid(24, 48)
    lap = grid.laplacian
    t = np.random.default_rng(0).normal(size=grid.size)
    assert abs((grid.area_weights.ravel() * (lap @ t)).sum()) < 1e-12
    lat, lon = np.meshgrid(grid.lat, grid.lon, indexing="ij")
    for ylm in (np.sin(lat), np.cos(lat) * np.cos(lon)):  # l = 1: eigenvalue -l(l+1) = -2
        ratio = (lap @ ylm.ravel()).reshape(lat.shape) / ylm
        inner = np.abs(np.rad2deg(lat)) < 60
        np.testing.assert_allclose(ratio[inner & (np.abs(ylm) > 0.1)], -2.0, rtol=0.02)


def test_insolation_global_mean_and_solstices():
    grid = ebm.Grid(90, 4)
    days = np.arange(ebm.DAYS_PER_YEAR)
    q = ebm.daily_insolation(grid.lat[None, :], days[:, None], 1361.0)
    global_annual = (q.mean(axis=0) * grid.area_weights[:, 0] * grid.nlon).sum()
    assert global_annual == pytest.approx(1361.0 / 4, rel=2e-3)
    june, december = q[172], q[355]
    assert june[-1] > 500 and december[-1] == 0.0  # polar day and night at the north pole
    assert december[0] > 500 and june[0] == 0.0


def test_warming_with_co2_and_cooling_with_the_sun():
    """Same noise, three forcings: warming per W m-2 is about 1/B, amplified by ice albedo."""
    grid = ebm.Grid(12, 24)
    land = ebm.land_sea_mask(grid)
    params = [ebm.EBMParameters(0.0, 0.5, 1361.0), ebm.EBMParameters(4.0, 0.5, 1361.0),
              ebm.EBMParameters(0.0, 0.5, 1340.0)]
    seeds = [np.random.SeedSequence(7)] * 3
    means = ebm.simulate(grid, land, params, seeds, years=1, spinup_years=2)
    gm = grid.global_mean(means.tas).mean(axis=1)
    warming = (gm[1] - gm[0]) / 4.0
    assert 1 / ebm.OLR_B < warming < 2.0 / ebm.OLR_B
    assert gm[2] < gm[0] - 1.0
    ice = grid.global_mean(means.ice_fraction).mean(axis=1)
    assert ice[1] < ice[0] < ice[2]


def test_noise_is_red_and_unit_scaled():
    grid = ebm.Grid(16, 32)
    smooth = ebm.NoiseSmoother(grid)
    white = np.random.default_rng(1).standard_normal((400, grid.nlat, grid.nlon))
    eta = smooth(white)
    np.testing.assert_allclose(eta.std(axis=0), 1.0, atol=0.15)
    # neighbours along a mid-latitude row are strongly correlated (length 1500 km >> 1 cell ~ 1000 km)
    row = eta[:, 8]
    assert np.corrcoef(row[:, 0], row[:, 1])[0, 1] > 0.4
