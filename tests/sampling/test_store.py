"""The zarr ensemble store: layout (dims, coords, attrs, chunks), member writes, done flags,
and what happens to an existing ``out`` (resume, refuse, replace)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from scidiff.data.dataset import FieldMetadata
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import EnsembleStore, StoreError, create_store, remove_store
from scidiff.sampling.workflow import plan_store

LAT = np.linspace(-60.0, 60.0, 5)
LON = np.arange(0.0, 360.0, 45.0)


def climate_metadata() -> FieldMetadata:
    """Two channels on a 5 x 8 lat/lon grid, like the climate dataset."""
    return FieldMetadata(
        path="clim.zarr", sample_dims=("time",), sample_shape=(10,), spatial_dims=("lat", "lon"),
        spatial_shape=(5, 8), channel_names=("t2m", "msl"), channel_variables=("t2m", "msl"),
        units=("K", "Pa"), long_names=("2 m temperature", "mean sea level pressure"),
        param_names=("co2",), param_units=("ppm",), field_names=(),
        coords={"lat": LAT, "lon": LON}, coord_dims={"lat": ("lat",), "lon": ("lon",)},
        coord_attrs={"lat": {"units": "degrees_north"}, "lon": {"units": "degrees_east"}},
    )


def make(path, identity=None, members=3):
    sets = ParameterSets(names=("co2",), values=np.array([[280.0], [560.0]]))
    seeds = np.arange(2 * members, dtype=np.int64).reshape(2, members) + 10**12
    return create_store(path, metadata=climate_metadata(), sets=sets, seeds=seeds,
                        attrs={"identity": identity or {"members": members}, "scidiff_version": "0.1.0",
                               "sample_config": json.dumps({"members": members})})


def test_layout_opens_with_xarray(tmp_path):
    store = make(tmp_path / "ens.zarr")
    ds = xr.open_zarr(tmp_path / "ens.zarr")
    assert set(ds.data_vars) == {"t2m", "msl", "done"}
    assert ds["t2m"].dims == ("sample", "member", "lat", "lon") and ds["t2m"].shape == (2, 3, 5, 8)
    assert ds["t2m"].attrs == {"units": "K", "long_name": "2 m temperature"}
    assert ds["msl"].attrs["units"] == "Pa"
    np.testing.assert_array_equal(ds["lat"].values, LAT)
    assert ds["lon"].attrs["units"] == "degrees_east"
    assert ds["co2"].dims == ("sample",) and ds["co2"].values.tolist() == [280.0, 560.0]
    assert ds["co2"].attrs["units"] == "ppm"
    assert ds["seed"].dims == ("sample", "member") and int(ds["seed"][1, 2]) == 10**12 + 5
    assert ds["t2m"].encoding["chunks"] == (1, 1, 5, 8)  # one member per chunk
    assert ds["done"].encoding["chunks"] == (1, 1)
    assert json.loads(ds.attrs["identity"]) == {"members": 3}
    assert ds.attrs["identity_sha256"] == store.identity_sha256 and len(store.identity_sha256) == 64
    assert np.isnan(ds["t2m"].values).all() and not ds["done"].values.any()
    assert not any(p.name.startswith(".ens.zarr") for p in tmp_path.iterdir())  # the temporary is renamed


def test_members_are_written_then_flagged(tmp_path):
    store = make(tmp_path / "ens.zarr")
    data = np.stack([np.full((2, 5, 8), 280.0 + i) for i in range(2)])
    store.write_members([1, 0], [2, 1], data)
    done = store.done()
    assert done.tolist() == [[False, True, False], [False, False, True]]
    ds = xr.open_zarr(tmp_path / "ens.zarr")
    assert float(ds["t2m"][1, 2].mean()) == 280.0 and float(ds["msl"][0, 1].max()) == 281.0
    assert np.isnan(ds["t2m"][0, 0]).all()
    with pytest.raises(ValueError, match=r"data must be \[1, 2, \*S\]"):
        store.write_members([0], [0], np.zeros((1, 3, 5, 8)))


def test_existing_out_is_resumed_refused_or_replaced(tmp_path):
    path = tmp_path / "ens.zarr"
    with pytest.raises(StoreError, match="already exists"):
        make(path), make(path)
    same, other = {"members": 3}, {"members": 4}
    assert plan_store(path, same, overwrite=False) == "resume"
    assert plan_store(path, same, overwrite=True) == "replace"
    with pytest.raises(StoreError, match=r"holds another run's ensemble \(differs in: members\).*overwrite=true"):
        plan_store(path, other, overwrite=False)
    assert plan_store(path, other, overwrite=True) == "replace"
    assert plan_store(tmp_path / "new.zarr", same, overwrite=False) == "create"
    junk = tmp_path / "results"
    junk.mkdir()
    (junk / "notes.txt").write_text("keep me")
    with pytest.raises(StoreError, match="results exists and is not a scidiff ensemble store"):
        plan_store(junk, same, overwrite=True)
    with pytest.raises(StoreError, match="not deleting it"):
        remove_store(junk)
    assert (junk / "notes.txt").exists()
    remove_store(path)
    assert not path.exists()
    with pytest.raises(StoreError, match="not a scidiff ensemble store"):
        EnsembleStore.open(path)
