"""The zarr ensemble store: layout (dims, coords, attrs, chunks), member writes, done flags,
stores of the earlier layout, and what happens to an existing ``out`` (resume, refuse, replace)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr

from scidiff.data.dataset import FieldMetadata
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import (
    EnsembleStore,
    StoreError,
    check_atomic_chunk_writes,
    chunk_shape,
    create_store,
    remove_store,
)
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
    assert set(ds.data_vars) == {"t2m", "msl"}  # the completion record is not a data variable
    assert ds.attrs["Conventions"] == "CF-1.10"
    assert ds["t2m"].dims == ("sample", "member", "lat", "lon") and ds["t2m"].shape == (2, 3, 5, 8)
    assert ds["t2m"].attrs == {"units": "K", "long_name": "2 m temperature"}
    assert ds["msl"].attrs["units"] == "Pa"
    np.testing.assert_array_equal(ds["lat"].values, LAT)
    assert ds["lon"].attrs["units"] == "degrees_east"
    assert ds["co2"].dims == ("sample",) and ds["co2"].values.tolist() == [280.0, 560.0]
    assert ds["co2"].attrs["units"] == "ppm"
    assert ds["sample"].attrs["units"] == ds["member"].attrs["units"] == "1"
    assert ds["seed"].dims == ("sample", "member") and int(ds["seed"][1, 2]) == 10**12 + 5
    assert ds["t2m"].encoding["chunks"] == (1, 3, 5, 8)  # all members of one sample per chunk
    assert ds["t2m"].chunks == ((1, 1), (3,), (5,), (8,))  # member is one dask chunk
    progress = xr.open_zarr(tmp_path / "ens.zarr", group="progress")
    assert progress["done"].dims == ("sample", "member") and progress["done"].encoding["chunks"] == (1, 3)
    assert json.loads(ds.attrs["identity"]) == {"members": 3}
    assert ds.attrs["identity_sha256"] == store.identity_sha256 and len(store.identity_sha256) == 64
    assert np.isnan(ds["t2m"].values).all() and not store.done().any() and store.done().shape == (2, 3)
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
    with pytest.raises(ValueError, match="given twice"):
        store.write_members([0, 0], [2, 2], np.zeros((2, 2, 5, 8)))


def test_members_of_one_sample_fill_its_chunk_in_several_writes(tmp_path):
    """A sample's chunk is rewritten with each write; members written earlier stay."""
    store = make(tmp_path / "ens.zarr", members=4)
    for k in (2, 0, 3):
        store.write_members([1], [k], np.full((1, 2, 5, 8), float(k)))
    t2m = xr.open_zarr(tmp_path / "ens.zarr")["t2m"].values
    assert [float(t2m[1, k, 0, 0]) for k in (0, 2, 3)] == [0.0, 2.0, 3.0]
    assert np.isnan(t2m[1, 1]).all() and np.isnan(t2m[0]).all()
    assert store.done().tolist() == [[False] * 4, [True, False, True, True]]


def test_zarr_versions_that_write_chunks_in_place_are_refused():
    for ok in ("2.18.3", "3.1.3", "3.1.6", "3.2.0"):
        check_atomic_chunk_writes(ok)
    for bad in ("3.0.0", "3.0.8", "3.1.2"):
        with pytest.raises(StoreError, match=r"install zarr>=3.1.3"):
            check_atomic_chunk_writes(bad)


def test_chunks_never_split_members():
    assert chunk_shape(3, (5, 8)) == (1, 3, 5, 8)
    assert chunk_shape(50, (721, 1440)) == (1, 50, 361, 720)  # 208 MB -> 52 MB
    assert chunk_shape(10_000, (4, 4), max_bytes=1000) == (1, 10_000, 1, 1)
    assert chunk_shape(7, (64, 64, 64), max_bytes=7 * 4 * 32**3) == (1, 7, 32, 32, 32)


def legacy_store(path, n=2, m=3):
    """A store as scidiff wrote them before the ``progress`` group: ``done`` a root data
    variable, one chunk per member."""
    import dask.array as da

    ds = xr.Dataset(
        {"t2m": (("sample", "member", "lat", "lon"), da.full((n, m, 5, 8), np.nan, dtype=np.float32,
                                                             chunks=(1, 1, 5, 8)), {"units": "K"}),
         "msl": (("sample", "member", "lat", "lon"), da.full((n, m, 5, 8), np.nan, dtype=np.float32,
                                                             chunks=(1, 1, 5, 8)), {"units": "Pa"}),
         "done": (("sample", "member"), da.zeros((n, m), dtype=bool, chunks=(1, 1)))},
        coords={"sample": np.arange(n), "member": np.arange(m), "lat": LAT, "lon": LON,
                "seed": (("sample", "member"), np.arange(n * m).reshape(n, m))},
        attrs={"scidiff_kind": "scidiff-ensemble", "variables": ["t2m", "msl"], "identity": "{}",
               "identity_sha256": "0" * 64},
    )
    ds.to_zarr(path, compute=False, consolidated=True, zarr_format=2,
               encoding={v: {"chunks": (1, 1, 5, 8) if v != "done" else (1, 1)} for v in ("t2m", "msl", "done")})
    return path


def test_stores_of_the_earlier_layout_are_resumed_as_they_are(tmp_path):
    store = EnsembleStore.open(legacy_store(tmp_path / "old.zarr"))
    assert (store.num_samples, store.num_members) == (2, 3) and not store.done().any()
    store.write_members([0, 1], [1, 2], np.stack([np.full((2, 5, 8), 1.0), np.full((2, 5, 8), 2.0)]))
    assert store.done().tolist() == [[False, True, False], [False, False, True]]
    ds = xr.open_zarr(tmp_path / "old.zarr")
    assert float(ds["t2m"][1, 2, 0, 0]) == 2.0 and bool(ds["done"][0, 1]) and ds["t2m"].encoding["chunks"] == (1, 1, 5, 8)


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


KILLED_CREATION = """
import sys, time
from pathlib import Path
import zarr
from tests.sampling.test_store import make

def slow(path, *args, **kwargs):  # the last step of creation, inside the temporary
    Path(sys.argv[2]).write_text("writing")
    time.sleep(120)

zarr.consolidate_metadata = slow
make(Path(sys.argv[1]))
"""


def test_kill_9_during_creation_leaves_nothing_the_next_creation_keeps(tmp_path):
    """A writer killed mid-creation leaves its hidden temporary; creating the store again
    removes it (its pid is dead) and renames a complete store into place."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    out, marker = tmp_path / "out" / "ens.zarr", tmp_path / "writing"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_CREATION, str(out), str(marker)],
                            cwd=Path(__file__).resolve().parents[2], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), f"the creation did not start: {proc.stderr.read()[-2000:] if proc.poll() is not None else ''}"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = [p.name for p in out.parent.iterdir()]
    assert not out.exists() and len(left) == 1 and left[0].startswith(".ens.zarr.partial-")
    assert (out.parent / left[0] / "t2m").is_dir()  # the killed writer's half-made store

    store = make(out)
    assert [p.name for p in out.parent.iterdir()] == ["ens.zarr"]
    assert store.done().shape == (2, 3) and set(xr.open_zarr(out).data_vars) == {"t2m", "msl"}
