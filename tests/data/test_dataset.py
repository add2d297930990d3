import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch.utils.data import DataLoader

from tests.data.conftest import climate_like, write
from scidiff.data import FieldDataset, coarsen_repeat, compute_statistics
from scidiff.shapes import mean_flat


def _with_stats(data):
    data.set_statistics(compute_statistics(data))
    return data


def test_rank_1_profiles(tmp_path):
    rng = np.random.default_rng(0)
    u = rng.normal(size=(9, 17)).astype("f4")
    path = write(xr.Dataset({"u": (("sample", "z"), u)}), tmp_path / "p.zarr")
    data = _with_stats(FieldDataset(path, ["u"], ["z"]))
    item = data[4]
    assert item["x"].shape == (1, 17) and "mask" not in item and "params" not in item
    stats = data.statistics.x[0]
    np.testing.assert_allclose(item["x"][0].numpy(), (u[4] - stats.mean) / stats.std, rtol=1e-5, atol=1e-6)


def test_rank_3_in_config_order_not_store_order(tmp_path):
    rng = np.random.default_rng(1)
    rho = rng.random((5, 2, 3, 4)).astype("f4") + 0.1  # stored (sample, z, y, x)
    path = write(xr.Dataset({"rho": (("sample", "z", "y", "x"), rho)}), tmp_path / "v.zarr")
    data = FieldDataset(path, [{"name": "rho", "transform": "none"}], ["x", "y", "z"], "sample", mask="never")
    _with_stats(data)
    batch = data.read_batch([3, 1])
    assert batch["x"].shape == (2, 1, 4, 3, 2)
    np.testing.assert_array_equal(batch["x"][0, 0].numpy(), rho[3].transpose(2, 1, 0))
    assert batch["index"].tolist() == [3, 1]
    assert data.metadata.spatial_shape == (4, 3, 2)
    np.testing.assert_array_equal(data.metadata.coords["x"], np.arange(4))


def test_levels_params_and_metadata(climate_store):
    data = _with_stats(FieldDataset(
        climate_store, [{"name": "ta", "select": {"level": [500, 1000]}}, {"name": "pr", "transform": "log1p"}],
        ["lat", "lon"], "time", params=["co2"]))
    md = data.metadata
    assert md.channel_names == ("ta[level=500]", "ta[level=1000]", "pr")
    assert md.units == ("K", "K", "mm day-1") and md.long_names[0] == "air temperature"
    assert md.param_names == ("co2",) and md.param_units == ("ppm",)
    assert md.coord_attrs["lat"]["units"] == "degrees_north" and md.coords["lon"][1] == 36.0
    ds = xr.open_zarr(climate_store)
    batch = data.read_batch([7, 2, 7])
    phys = data.x_transform.inverse(batch["x"].double())
    np.testing.assert_allclose(phys[0, 0].numpy(), ds["ta"].sel(level=500).values[7], rtol=1e-5)
    np.testing.assert_allclose(phys[1, 2].numpy(), ds["pr"].values[2], rtol=1e-4, atol=1e-5)
    assert torch.equal(batch["x"][0], batch["x"][2])
    co2 = data.param_transform.inverse(batch["params"].double())[:, 0]
    np.testing.assert_allclose(co2.numpy(), ds["co2"].values[[7, 2, 7]], rtol=1e-5)


def test_nan_store_gives_right_mask_and_no_nan(climate_store):
    data = _with_stats(FieldDataset(climate_store, ["sst", "pr"], ["lat", "lon"], "time"))
    assert data.has_mask
    batch = data.read_batch(np.arange(6))
    land = xr.open_zarr(climate_store)["land_mask"].values == 1
    assert torch.isfinite(batch["x"]).all()
    expected = np.broadcast_to(~land, (6, 6, 10)).astype("f4")
    np.testing.assert_array_equal(batch["mask"][:, 0].numpy(), expected)
    assert batch["mask"][:, 1].eq(1).all()  # pr has no missing points
    assert batch["x"][:, 0][torch.from_numpy(np.broadcast_to(land, (6, 6, 10)).copy())].eq(0).all()
    # the loss ignores masked points: changing x there changes nothing
    pred = torch.randn_like(batch["x"])
    loss = mean_flat((pred - batch["x"]) ** 2, batch["mask"])
    pred2 = pred.clone()
    pred2[batch["mask"] == 0] += 100.0
    assert torch.equal(loss, mean_flat((pred2 - batch["x"]) ** 2, batch["mask"]))


def test_nan_without_mask_is_refused(tmp_path):
    ds = climate_like(nan_points=False)
    ds["sst"][20, 0, 0] = np.nan  # a NaN outside the training samples used for the statistics
    path = write(ds, tmp_path / "s.zarr")
    data = FieldDataset(path, ["sst"], ["lat", "lon"], "time")
    data.set_statistics(compute_statistics(data, np.arange(16)))
    assert not data.has_mask
    assert "mask" not in data.read_batch([3])
    with pytest.raises(ValueError, match=r"variable\(s\) \['sst'\] have missing \(NaN\) values in samples \[20\]"):
        data.read_batch([3, 20])
    with pytest.raises(ValueError, match="mask='sometimes' is not one of"):
        FieldDataset(path, ["sst"], ["lat", "lon"], "time", mask="sometimes")


def test_static_and_coarsened_fields(climate_store):
    data = _with_stats(FieldDataset(
        climate_store, ["sst"], ["lat", "lon"], "time",
        fields=[{"name": "land_mask", "transform": "none"}, {"coarsen": {"lat": 3, "lon": 5}}]))
    assert data.metadata.field_names == ("land_mask", "sst@coarse3x5")
    batch = data.read_batch([0, 5])
    f = batch["fields"]
    assert f.shape == (2, 2, 6, 10)
    land = xr.open_zarr(climate_store)["land_mask"].values
    np.testing.assert_array_equal(f[1, 0].numpy(), land)
    x, m = batch["x"][1, 0], batch["mask"][1, 0]
    block = (x[0:3, 5:10] * m[0:3, 5:10]).sum() / m[0:3, 5:10].sum()
    assert torch.allclose(f[1, 1, 0:3, 5:10], block.expand(3, 5))
    with pytest.raises(ValueError, match="factor 4 along dim 'lat' does not divide its size 6"):
        FieldDataset(climate_store, ["sst"], ["lat", "lon"], "time", fields=[{"coarsen": {"lat": 4}}])


def test_coarsen_repeat_any_rank():
    y = torch.arange(2 * 1 * 4 * 2 * 6, dtype=torch.float32).reshape(2, 1, 4, 2, 6)
    out = coarsen_repeat(y, None, (2, 1, 3))
    assert out.shape == y.shape
    assert out[0, 0, 0, 0, 0] == y[0, 0, 0:2, 0, 0:3].mean()
    assert out[1, 0, 3, 1, 5] == y[1, 0, 2:4, 1, 3:6].mean()


def test_two_sample_dims_and_params_on_one_of_them(tmp_path):
    rng = np.random.default_rng(0)
    ds = xr.Dataset(
        {"u": (("sim", "time", "x"), rng.normal(size=(3, 4, 5)).astype("f4")),
         "kappa": (("sim",), np.array([0.1, 0.2, 0.4]))},
    )
    path = write(ds, tmp_path / "e.zarr", chunk=2)
    data = FieldDataset(path, [{"name": "u", "transform": "none"}], ["x"], ["sim", "time"],
                        params=[{"name": "kappa", "transform": "none"}])
    data.set_statistics(compute_statistics(data))
    batch = data.read_batch([11, 0, 5])  # (2, 3), (0, 0), (1, 1)
    np.testing.assert_array_equal(batch["x"][:, 0].numpy(), ds["u"].values[[2, 0, 1], [3, 0, 1]])
    np.testing.assert_allclose(batch["params"][:, 0].numpy(), [0.4, 0.1, 0.2], rtol=1e-6)


def test_handle_is_opened_per_process_and_not_pickled(climate_store):
    data = _with_stats(FieldDataset(climate_store, ["sst"], ["lat", "lon"], "time"))
    data.read_batch([0])
    assert data._ds is not None
    clone = pickle.loads(pickle.dumps(data))
    assert clone._ds is None
    assert torch.equal(clone.read_batch([4])["x"], data.read_batch([4])["x"])
    single = [b["x"] for b in DataLoader(data, batch_size=5, num_workers=0)]
    multi = [b["x"] for b in DataLoader(data, batch_size=5, num_workers=2)]
    assert torch.equal(torch.cat(single), torch.cat(multi))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(variables=["tas"]), r"variable 'tas' not found in store .*climate.zarr; it has data variables"),
        (dict(variables=["land_mask"]), r"variable 'land_mask' lacks the sample dim\(s\) \['time'\]"),
        (dict(variables=["co2"]), r"variable 'co2' lacks the spatial dim\(s\) \['lat', 'lon'\]"),
        (dict(spatial_dims=["lat", "longitude"]), r"dim 'longitude' is not in store .*climate.zarr"),
        (dict(sample_dims="sample"), r"dim 'sample' is not in store"),
        (dict(variables=[{"name": "ta", "select": {"plev": 500}}]), r"variable 'ta': select on dim 'plev'"),
        (dict(variables=[{"name": "ta", "select": {"level": 700}}]), r"variable 'ta': select \{'level': 700\} failed"),
        (dict(variables=[{"name": "ta", "levels": [500]}]), r"variables: unknown keys \['levels'\]"),
        (dict(variables=[{"name": "ta", "transform": "sqrt"}]), r"variable 'ta' transform='sqrt' is not one of"),
        (dict(params=["sst"]), r"parameter 'sst' has dims \{'lat': 6, 'lon': 10\} besides the sample dims"),
        (dict(spatial_dims=["lat", "lon", "level", "time"]), r"spatial_dims must name 1-3 dims"),
    ],
)
def test_bad_configuration_names_the_culprit(climate_store, kwargs, message):
    args = dict(path=climate_store, variables=["sst"], spatial_dims=["lat", "lon"], sample_dims="time")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        FieldDataset(**args)


def test_parameter_of_the_wrong_length(tmp_path):
    ds = climate_like().assign(n_s=(("run",), np.arange(5.0)))  # 5 values for 24 samples
    path = write(ds, tmp_path / "s.zarr")
    with pytest.raises(ValueError, match=r"parameter 'n_s' has dims \{'run': 5\} besides the sample dims \{'time': 24\}"):
        FieldDataset(path, ["sst"], ["lat", "lon"], "time", params=["n_s"])


def test_unreadable_store(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data store .*nowhere.zarr does not exist"):
        FieldDataset(tmp_path / "nowhere.zarr", ["sst"], ["lat", "lon"], "time")
    junk = tmp_path / "junk.zarr"
    junk.mkdir()
    (junk / "zarr.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"cannot open data store .*junk.zarr \(engine=zarr\)"):
        FieldDataset(junk, ["sst"], ["lat", "lon"], "time")
    nc = tmp_path / "x.nc"
    nc.write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"cannot open data store .*x.nc"):
        FieldDataset(nc, ["sst"], ["lat", "lon"], "time")


def test_store_changed_while_training_raises_in_the_worker(tmp_path):
    path = write(climate_like(), tmp_path / "s.zarr")
    data = _with_stats(FieldDataset(path, ["sst"], ["lat", "lon"], "time"))
    shutil.rmtree(path)
    write(climate_like(n_time=10), path)  # rewritten with fewer samples
    with pytest.raises(RuntimeError, match=r"data store .*s.zarr changed since .* variable 'sst' had dims/shape"):
        next(iter(DataLoader(data, batch_size=4, num_workers=1)))
    # a handle opened before the change fails loudly too, naming variable and store
    data2 = _with_stats(FieldDataset(path, ["sst"], ["lat", "lon"], "time"))
    data2.read_batch([0])
    chunks = [p for p in Path(path, "sst").rglob("*") if p.is_file() and p.name != "zarr.json"]
    assert chunks
    for chunk in chunks:  # overwritten by a half-finished writer
        chunk.write_bytes(b"\x00garbage")
    with pytest.raises(RuntimeError, match=r"reading variable 'sst' from data store .*s.zarr failed for samples \[9\]"):
        data2.read_batch([9])


def test_netcdf_store(tmp_path):
    pytest.importorskip("scipy")
    path = tmp_path / "c.nc"
    climate_like().to_netcdf(path, engine="scipy")  # netCDF3, readable without HDF5 libraries
    data = _with_stats(FieldDataset(path, ["sst"], ["lat", "lon"], "time", params=["co2"]))
    batch = next(iter(DataLoader(data, batch_size=4, num_workers=0)))
    assert batch["x"].shape == (4, 1, 6, 10) and torch.isfinite(batch["x"]).all()
