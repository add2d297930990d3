"""An ensemble store as the ecosystem reads it: ``xarray.open_zarr`` (dask), CF attributes,
no bookkeeping data variable, and ensemble scores called on it as a user would --
``xskillscore.crps_ensemble`` and ``scoringrules.crps_ensemble`` -- checked against
``properscoring.crps_ensemble``."""

from __future__ import annotations

import inspect

import numpy as np
import properscoring as ps
import pytest
import scoringrules as sr
import xarray as xr
import xskillscore as xs

from scidiff.inference import DDIM, GuidanceSpec, member_seeds
from scidiff.sampling.ensemble import rank_members, run_ensemble
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import create_store
from tests.sampling.test_ensemble import OneOfRanks
from tests.sampling.test_store import climate_metadata

N, M = 3, 6


def reference_crps(obs: np.ndarray, ens: np.ndarray) -> np.ndarray:
    """properscoring's CRPS, float64, members on axis 1 of ``ens``."""
    return ps.crps_ensemble(obs.astype(np.float64), np.moveaxis(ens.astype(np.float64), 1, -1))


@pytest.fixture(scope="module")
def climate_store(tmp_path_factory):
    """A 3 x 6 two-variable store filled through ``write_members`` by two 'ranks', each writing
    its own samples a few members at a time; returns (path, members [N, M, 2, 5, 8])."""
    path = tmp_path_factory.mktemp("eco") / "ens.zarr"
    sets = ParameterSets(names=("co2",), values=np.array([[280.0], [420.0], [560.0]]))
    store = create_store(path, metadata=climate_metadata(), sets=sets,
                         seeds=np.arange(N * M, dtype=np.int64).reshape(N, M), attrs={"identity": {"test": 1}})
    rng = np.random.default_rng(0)
    members = np.stack([rng.normal(288.0, 5.0, (N, M, 5, 8)), rng.normal(1.0e5, 300.0, (N, M, 5, 8))], axis=2)
    members = members.astype(np.float32)
    for rank in (1, 0):
        pairs = rank_members(N, M, rank, 2)
        for i in range(0, len(pairs), 4):  # 4 members per write: samples are split between writes
            part = pairs[i:i + 4]
            store.write_members([j for j, _ in part], [k for _, k in part],
                                np.stack([members[j, k] for j, k in part]))
    assert store.done().all()
    return path, members


def observations(seed: int = 1) -> xr.Dataset:
    rng = np.random.default_rng(seed)
    dims = ("sample", "lat", "lon")
    return xr.Dataset({"t2m": (dims, rng.normal(288.0, 5.0, (N, 5, 8))),
                       "msl": (dims, rng.normal(1.0e5, 300.0, (N, 5, 8)))})


def test_the_store_opens_as_a_cf_dataset_of_members_only(climate_store):
    path, members = climate_store
    ds = xr.open_zarr(path)
    assert ds.attrs["Conventions"] == "CF-1.10"
    assert set(ds.data_vars) == {"t2m", "msl"} and "done" not in ds.variables
    for name in ("t2m", "msl", "co2", "lat", "lon"):
        assert ds[name].attrs.get("units"), name
    assert ds["t2m"].chunks[1] == (M,) and ds["msl"].chunks[1] == (M,)  # member: one dask chunk
    np.testing.assert_array_equal(ds["t2m"].values, members[:, :, 0])
    # Dataset-wide reductions over members see the members only
    mean = ds.mean("member")
    assert set(mean.data_vars) == {"t2m", "msl"}
    np.testing.assert_allclose(mean["msl"].values, members[:, :, 1].mean(axis=1), rtol=1e-6)
    assert bool(xr.open_zarr(path, group="progress")["done"].all())  # the completion record, for who asks


def test_xskillscore_on_the_dask_arrays(climate_store):
    path, members = climate_store
    ds, obs = xr.open_zarr(path), observations()
    expected = {name: reference_crps(obs[name].values, members[:, :, c]) for c, name in enumerate(("t2m", "msl"))}
    # one variable, per point and the mean over everything (xskillscore's default)
    per_point = xs.crps_ensemble(obs["t2m"], ds["t2m"], member_dim="member", dim=[])
    np.testing.assert_allclose(per_point.values, expected["t2m"], rtol=1e-6)
    mean = xs.crps_ensemble(obs["t2m"], ds["t2m"], member_dim="member")
    np.testing.assert_allclose(float(mean), expected["t2m"].mean(), rtol=1e-6)
    # the whole Dataset at once
    both = xs.crps_ensemble(obs, ds, member_dim="member", dim=["lat", "lon"]).compute()
    assert set(both.data_vars) == {"t2m", "msl"}
    for name in ("t2m", "msl"):
        np.testing.assert_allclose(both[name].values, expected[name].mean(axis=(1, 2)), rtol=1e-6)


def test_scoringrules_on_the_dask_arrays(climate_store):
    path, members = climate_store
    ds, obs = xr.open_zarr(path), observations()
    expected = reference_crps(obs["msl"].values, members[:, :, 1])
    # DataArrays, members on axis 1 (the third argument: m_axis in scoringrules 0.10, axis in earlier releases)
    got = sr.crps_ensemble(obs["msl"], ds["msl"], 1)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6)
    if "m_axis" in inspect.signature(sr.crps_ensemble).parameters:
        np.testing.assert_allclose(np.asarray(sr.crps_ensemble(obs["msl"], ds["msl"], m_axis=1)), expected, rtol=1e-6)
    # the dask way: a core dimension, computed chunk by chunk
    lazy = xr.apply_ufunc(sr.crps_ensemble, obs["msl"], ds["msl"], input_core_dims=[[], ["member"]],
                          dask="parallelized", output_dtypes=[np.float64])
    np.testing.assert_allclose(lazy.compute().values, expected, rtol=1e-6)


def test_a_store_of_run_ensemble_over_two_ranks_is_scored_directly(trained_run, tmp_path):
    """The real generation path: two ranks (one after another), micro-batches straddling their
    samples; xskillscore and properscoring agree on the result."""
    from scidiff.inference.checkpoint import load_pretrained

    pretrained = load_pretrained(trained_run / "outputs" / "quickstart" / "tiny")
    sets = ParameterSets(names=("spectral_index", "amplitude"), values=np.array([[1.5, 1.0], [3.0, 1.5]]))
    seeds = member_seeds(5, len(sets), 3)
    store = create_store(tmp_path / "ens.zarr", metadata=pretrained.metadata, sets=sets, seeds=seeds,
                         attrs={"identity": {"seed": 5}})
    for rank in (0, 1):
        run_ensemble(pretrained, store, sets, seeds, sampler=DDIM(steps=2), guidance=GuidanceSpec(),
                     batch_size=2, micro_batch=4, progress=False, dist_ctx=OneOfRanks(rank, 2))
    assert store.done().all()
    ds = xr.open_zarr(store.path)
    assert "done" not in ds.variables and ds.attrs["Conventions"] == "CF-1.10"
    field = ds["field"]
    assert np.isfinite(field.values).all() and field.chunks[1] == (3,)
    obs = field.isel(member=0, drop=True).drop_vars("seed", errors="ignore") * 0.5
    crps = xs.crps_ensemble(obs, field, member_dim="member", dim=[])
    np.testing.assert_allclose(crps.values, reference_crps(obs.values, field.values), rtol=1e-6)
