import json

import numpy as np
import pytest
import torch

from tests.data.conftest import climate_like, write
from scidiff.data import FieldDataset, RunningMoments, Statistics, compute_statistics
from scidiff.data.statistics import iter_blocks


def test_running_moments_merge_equals_numpy():
    rng = np.random.default_rng(0)
    data = rng.normal(5.0, 3.0, (37, 2, 4, 3))
    data[rng.random(data.shape) < 0.2] = np.nan
    m = RunningMoments(2)
    for lo in range(0, 37, 5):  # uneven blocks
        m.update(data[lo : lo + 5])
    per_channel = np.moveaxis(data, 1, 0).reshape(2, -1)
    np.testing.assert_allclose(m.mean, np.nanmean(per_channel, axis=1), rtol=1e-12)
    np.testing.assert_allclose(m.std, np.nanstd(per_channel, axis=1), rtol=1e-12)
    np.testing.assert_array_equal(m.min, np.nanmin(per_channel, axis=1))
    np.testing.assert_array_equal(m.nan_count, np.isnan(per_channel).sum(axis=1))


def test_iter_blocks_aligned_and_bounded():
    blocks = list(iter_blocks(np.array([9, 0, 1, 2, 3, 7, 8, 15]), 4))
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [7], [8, 9], [15]]


def test_out_of_core_equals_in_memory_on_train_indices(tmp_path):
    ds = climate_like(n_time=23)
    path = write(ds, tmp_path / "s.zarr", chunk=4)
    data = FieldDataset(path, [{"name": "ta", "select": {"level": [850]}}, "sst", {"name": "pr", "transform": "log1p"}],
                        ["lat", "lon"], "time", params=["co2"])
    train = np.r_[0:12, 14]
    stats = compute_statistics(data, train, block_size=3)  # 3 samples in memory at a time
    ta = ds["ta"].sel(level=850).values[train].astype(np.float64)
    sst = ds["sst"].values[train].astype(np.float64)
    pr = np.log1p(ds["pr"].values[train].astype(np.float64))
    for got, ref in zip(stats.x, (ta, sst, pr)):
        assert got.mean == pytest.approx(np.nanmean(ref), rel=1e-10)
        assert got.std == pytest.approx(np.nanstd(ref), rel=1e-9)
        assert got.min == pytest.approx(np.nanmin(ref), rel=1e-12)
        assert got.max == pytest.approx(np.nanmax(ref), rel=1e-12)
        assert got.nan_count == np.isnan(ref).sum()
    assert stats.x[1].nan_count == 13 * 6  # 6 land points per sample
    co2 = ds["co2"].values[train]
    assert stats.params[0].mean == pytest.approx(co2.mean(), rel=1e-12)
    assert stats.params[0].std == pytest.approx(co2.std(), rel=1e-12)
    # the trend in ta makes the training-split mean differ from the whole store's
    assert abs(stats.x[0].mean - np.nanmean(ds["ta"].sel(level=850).values)) > 1.0
    assert stats.has_missing


def test_transform_from_statistics_normalises_training_data(tmp_path):
    ds = climate_like(nan_points=False)
    path = write(ds, tmp_path / "s.zarr")
    data = FieldDataset(path, ["sst", {"name": "pr", "transform": "log1p"}], ["lat", "lon"], "time")
    stats = compute_statistics(data)
    data.set_statistics(stats)
    x = data.read_batch(np.arange(len(data)))["x"].double()
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64), atol=1e-5)


def test_save_load_round_trip(tmp_path):
    path = write(climate_like(), tmp_path / "s.zarr")
    data = FieldDataset(path, ["sst"], ["lat", "lon"], "time", params=["co2"])
    stats = compute_statistics(data, info={"split": "train"})
    file = stats.save(tmp_path / "run" / "statistics.json")
    assert json.loads(file.read_text())["x"][0]["name"] == "sst"
    again = Statistics.load(file)
    assert again == Statistics.from_state(stats.state_dict())
    x = torch.randn(2, 1, 6, 10)
    assert torch.equal(again.x_transform()(x), stats.x_transform()(x))
    with pytest.raises(ValueError, match="cannot read the statistics file .*missing.json"):
        Statistics.load(tmp_path / "missing.json")


def test_all_nan_variable_is_named(tmp_path):
    ds = climate_like()
    ds["sst"][:] = np.nan
    data = FieldDataset(write(ds, tmp_path / "s.zarr"), ["ta", "sst"], ["lat", "lon"], "time")
    with pytest.raises(ValueError, match="variable 'sst' has no finite value"):
        compute_statistics(data)


def test_zero_variance_is_named(tmp_path):
    ds = climate_like()
    ds["co2"][:] = 400.0
    data = FieldDataset(write(ds, tmp_path / "s.zarr"), ["sst"], ["lat", "lon"], "time", params=["co2"])
    with pytest.raises(ValueError, match="parameter 'co2' has zero variance"):
        compute_statistics(data)
    ds2 = climate_like()
    ds2["pr"][:] = 1.0
    data = FieldDataset(write(ds2, tmp_path / "t.zarr"), [{"name": "pr", "transform": "minmax"}], ["lat", "lon"], "time")
    with pytest.raises(ValueError, match="variable 'pr' has zero variance"):
        compute_statistics(data)


def test_infinite_and_out_of_domain_values_are_named(tmp_path):
    ds = climate_like()
    ds["pr"][0, 0, 0] = np.inf
    data = FieldDataset(write(ds, tmp_path / "s.zarr"), ["pr"], ["lat", "lon"], "time")
    with pytest.raises(ValueError, match=r"\['pr'\] contain \+-inf"):
        compute_statistics(data)
    ds = climate_like()
    data = FieldDataset(write(ds, tmp_path / "t.zarr"), [{"name": "pr", "transform": "log"}], ["lat", "lon"], "time")
    with pytest.raises(ValueError, match="variable 'pr' has values down to 0.*'log' transform"):
        compute_statistics(data)


def _with_embedding(tmp_path, extra_dims=("component",)):
    import xarray as xr

    rng = np.random.default_rng(0)
    n = 24
    shape = (n, *(3 for _ in extra_dims))
    values = rng.normal(2.0, 3.0, size=shape).astype(np.float32)
    if len(extra_dims) == 1:
        values[:, 2] = 7.0  # a constant component
    ds = xr.Dataset({"x": (("sample", "y", "x"), rng.normal(size=(n, 4, 4)).astype(np.float32)),
                     "emb": (("sample", *extra_dims), values)})
    ds.to_zarr(tmp_path / "emb.zarr")
    return tmp_path / "emb.zarr", values


def test_embedding_components_are_normalised_and_a_constant_one_only_centred(tmp_path):
    path, values = _with_embedding(tmp_path)
    ds = FieldDataset(path, ["x"], ["y", "x"], embedding={"name": "emb", "transform": "zscore"})
    stats = compute_statistics(ds)
    assert [c.name for c in stats.embedding] == ["emb[component=0]", "emb[component=1]", "emb[component=2]"]
    assert stats.embedding[0].mean == pytest.approx(float(values[:, 0].astype(np.float64).mean()), rel=1e-6)
    assert (stats.embedding[2].scaling, stats.embedding[2].fixed_shift, stats.embedding[2].fixed_scale) == \
        ("fixed", 7.0, 1.0)
    ds.set_statistics(stats)
    e = ds.read_batch(np.arange(24))["embedding"].double()
    assert e[:, :2].mean(0).abs().max() < 1e-5 and (e[:, :2].std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert e[:, 2].abs().max() == 0
    again = Statistics.from_state(json.loads(json.dumps(stats.state_dict())))
    assert again == stats
    old = {k: v for k, v in stats.state_dict().items() if k != "embedding"}  # a checkpoint from before embeddings
    assert Statistics.from_state(old).embedding == ()


def test_an_embedding_with_two_component_dims_is_refused_by_name(tmp_path):
    path, _ = _with_embedding(tmp_path, extra_dims=("a", "b"))
    with pytest.raises(ValueError, match=r"embedding 'emb' has dims \('sample', 'a', 'b'\): an embedding needs"):
        FieldDataset(path, ["x"], ["y", "x"], embedding="emb")


def test_anomaly_scaling_standardises_every_grid_point(tmp_path):
    """transform 'anomaly': each point's own mean and std over the training samples (NaN points
    excluded; land points, NaN in every sample, take the channel's), out of core as in memory."""
    ds = climate_like(n_time=23)
    path = write(ds, tmp_path / "s.zarr", chunk=4)
    data = FieldDataset(path, [{"name": "sst", "transform": "anomaly"}, {"name": "pr", "transform": "log1p",
                                                                         "scaling": "anomaly"}, "ta"],
                        ["lat", "lon"], "time", params=["co2"])
    train = np.r_[0:12, 14]
    stats = compute_statistics(data, train, block_size=3)
    sst = ds["sst"].values[train].astype(np.float64)
    ocean = ~np.isnan(sst[0])
    shift, scale = stats.x[0].affine()
    np.testing.assert_allclose(shift[ocean], sst.mean(0)[ocean], rtol=1e-10)
    np.testing.assert_allclose(scale[ocean], sst.std(0)[ocean], rtol=1e-9)
    assert np.all(shift[~ocean] == stats.x[0].mean) and np.all(scale[~ocean] == stats.x[0].std)
    pr_shift, pr_scale = stats.x[1].affine()
    pr = np.log1p(ds["pr"].values[train].astype(np.float64))
    np.testing.assert_allclose(pr_shift, pr.mean(0), rtol=1e-10)
    np.testing.assert_allclose(pr_scale, pr.std(0), rtol=1e-9)
    assert stats.x[2].point_shape is None  # ta (3 levels) keeps one number per channel
    assert stats.normalised_rms() == pytest.approx(1.0, abs=1e-9)
    again = Statistics.load(stats.save(tmp_path / "statistics.json"))
    assert again == stats
    data.set_statistics(again)
    x = data.read_batch(train)["x"].double()
    assert torch.allclose(x[:, 0].mean(0)[torch.from_numpy(ocean)], torch.zeros(()).double(), atol=1e-5)
    assert torch.allclose(x[:, 1].std(0, unbiased=False), torch.ones(()).double(), atol=1e-5)


def test_anomaly_scaling_floors_a_constant_point_and_is_refused_where_it_cannot_apply(tmp_path):
    ds = climate_like(nan_points=False)
    ds["sst"][:, 0, 0] = 290.0  # one point constant over time
    path = write(ds, tmp_path / "s.zarr")
    stats = compute_statistics(FieldDataset(path, [{"name": "sst", "transform": "anomaly"}], ["lat", "lon"], "time"))
    _, scale = stats.x[0].affine()
    assert scale[0, 0] == pytest.approx(0.01 * stats.x[0].std)
    with pytest.raises(ValueError, match="parameter 'co2': transform 'anomaly' .* use 'zscore'"):
        FieldDataset(path, ["sst"], ["lat", "lon"], "time", params=[{"name": "co2", "transform": "anomaly"}])
    with pytest.raises(ValueError, match="'land_mask' is static .* anomaly would be 0"):
        FieldDataset(path, ["sst"], ["lat", "lon"], "time", fields=[{"name": "land_mask", "transform": "anomaly"}])
    # statistics of another configuration are refused by name
    other = FieldDataset(path, ["sst"], ["lat", "lon"], "time")
    with pytest.raises(ValueError, match="variable 'sst' has the transform none\\+anomaly in the statistics, "
                                         "none\\+zscore configured"):
        other.set_statistics(stats)
