import numpy as np
import pytest
import xarray as xr

from tests.data.conftest import climate_like
from scidiff.data import CoordinateSplit, FractionSplit, IndexSplit


def _ensemble(n_sim=5, n_time=8):
    return xr.Dataset(
        {"u": (("simulation", "time", "x"), np.zeros((n_sim, n_time, 3)))},
        coords={"simulation": np.arange(n_sim), "time": np.arange(n_time)},
    )


def _all_disjoint_and_cover(s, n):
    both = np.concatenate(list(s.values()))
    assert len(np.unique(both)) == len(both)
    assert both.min() >= 0 and both.max() < n


def test_index_split_ranges():
    s = IndexSplit(train=[0, 16], val=[16, 20], test=[20, None]).indices(climate_like(), ["time"])
    assert s["train"].tolist() == list(range(16))
    assert s["val"].tolist() == [16, 17, 18, 19]
    assert s["test"].tolist() == [20, 21, 22, 23]
    s = IndexSplit(train=[[0, 4], [8, 12]], test=[-2, None]).indices(climate_like(), ["time"])
    assert s["train"].tolist() == [0, 1, 2, 3, 8, 9, 10, 11] and s["test"].tolist() == [22, 23]
    assert s["val"].size == 0


def test_overlap_is_an_error_naming_the_splits():
    with pytest.raises(ValueError, match="splits 'train' and 'val' overlap in 2 samples"):
        IndexSplit(train=[0, 10], val=[8, 12]).indices(climate_like(), ["time"])
    with pytest.raises(ValueError, match="outside the 24 samples"):
        IndexSplit(train=[0, 30]).indices(climate_like(), ["time"])


def test_fraction_split_deterministic_and_disjoint():
    ds = climate_like(n_time=24)
    a = FractionSplit(0.75, 0.125, 0.125).indices(ds, ["time"])
    assert a["train"].tolist() == list(range(18)) and a["test"].tolist() == [21, 22, 23]
    b1 = FractionSplit(0.5, 0.25, 0.25, shuffle=True, seed=3).indices(ds, ["time"])
    b2 = FractionSplit(0.5, 0.25, 0.25, shuffle=True, seed=3).indices(ds, ["time"])
    assert all(np.array_equal(b1[k], b2[k]) for k in b1)
    assert not np.array_equal(b1["train"], np.arange(12))
    _all_disjoint_and_cover(b1, 24)
    assert sum(v.size for v in b1.values()) == 24
    with pytest.raises(ValueError, match="sum to at most 1"):
        FractionSplit(0.8, 0.3, 0.1).indices(ds, ["time"])


def test_fraction_split_by_group_keeps_simulations_whole():
    ds = _ensemble()
    s = FractionSplit(0.6, 0.2, 0.2, group="simulation").indices(ds, ["simulation", "time"])
    sims = {k: set((v // 8).tolist()) for k, v in s.items()}
    assert sims == {"train": {0, 1, 2}, "val": {3}, "test": {4}}
    assert s["train"].size == 24
    with pytest.raises(ValueError, match="group='member' is not a coordinate"):
        FractionSplit(group="member").indices(ds, ["simulation", "time"])


def test_fraction_split_by_a_coordinate_along_a_flat_sample_dim():
    # the climate store's layout: sample = (simulation * years + year) * 12 + month
    sim = np.repeat(np.arange(4), 24)
    ds = xr.Dataset({"tas": (("sample", "x"), np.zeros((96, 2)))}, coords={"simulation": ("sample", sim)})
    s = FractionSplit(0.5, 0.25, 0.25, group="simulation").indices(ds, ["sample"])
    assert [sorted(set(sim[v])) for v in s.values()] == [[0, 1], [2], [3]]
    assert s["train"].tolist() == list(range(48))
    s = CoordinateSplit("simulation", train=[0, 2], test=[3, 3]).indices(ds, ["sample"])
    assert s["test"].tolist() == list(range(72, 96))


def test_coordinate_split_by_year_and_by_date():
    ds = climate_like(n_time=24)  # every 182 days from 2000-01-01
    years = ds["time.year"].values
    s = CoordinateSplit("time.year", train=[2000, 2007], val=[2008, 2009], test=[2010, 2011]).indices(ds, ["time"])
    assert set(years[s["train"]]) == set(range(2000, 2008))
    assert set(years[s["test"]]) == {2010, 2011}
    _all_disjoint_and_cover(s, 24)
    d = CoordinateSplit("time", train=[None, "2005-12-31"], test=["2006-01-01", None]).indices(ds, ["time"])
    assert d["train"].size + d["test"].size == 24
    assert ds["time"].values[d["train"]].max() < np.datetime64("2006-01-01")


def test_coordinate_split_on_one_of_two_sample_dims():
    ds = _ensemble()
    s = CoordinateSplit("simulation", train=[0, 2], test=[4, 4]).indices(ds, ["simulation", "time"])
    assert s["train"].tolist() == list(range(24)) and s["test"].tolist() == list(range(32, 40))
    with pytest.raises(ValueError, match="coord='year' is not a coordinate"):
        CoordinateSplit("year", train=[0, 1]).indices(ds, ["simulation", "time"])
    with pytest.raises(ValueError, match="sample dims \\['sample'\\] are not dimensions"):
        CoordinateSplit("time", train=[0, 1]).indices(ds, ["sample"])
