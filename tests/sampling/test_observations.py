"""Observations through scidiff-sample's workflow: read from zarr in physical units, converted
to model units, RePaint reproduces them in the stored members; bad observation inputs."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from scidiff.sampling.observations import ObservationError
from scidiff.sampling.workflow import SampleError, sample_ensemble


def config(trained_run, out, observations, members=3):
    return {
        "checkpoint": str(trained_run / "outputs" / "quickstart" / "tiny"),
        "params": {"grid": {"spectral_index": [2.0], "amplitude": [1.0]}},
        "members": members, "batch_size": 2, "seed": 0, "out": str(out), "overwrite": False, "device": "cpu",
        "progress": False, "mlflow": {"run": "none"},
        "sampler": {"name": "ddim", "steps": 4, "eta": 0.0, "spacing": "leading"},
        "guidance": {"scale": 1.0, "rescale": 0.0}, "observations": observations,
    }


@pytest.fixture
def obs_store(tmp_path):
    rng = np.random.default_rng(0)
    values = np.full((16, 16), np.nan)
    idx = rng.choice(16 * 16, size=40, replace=False)
    values.flat[idx] = rng.normal(3.0, 0.5, size=40)  # far from the data's mean 0: visible if ignored
    path = tmp_path / "obs.zarr"
    xr.Dataset({"field": (("y", "x"), values)}).to_zarr(path, zarr_format=2, consolidated=True)
    return path, values


def test_repaint_reproduces_observations_and_varies_elsewhere(trained_run, obs_store, tmp_path):
    path, values = obs_store
    out = tmp_path / "inpainted.zarr"
    lines = []
    obs = {"path": str(path), "method": "repaint", "num_steps": 4, "jump_length": 2, "resample": 2}
    summary = sample_ensemble(config(trained_run, out, obs), log=lines.append)
    assert summary["written"] == 3
    x = xr.open_zarr(out)["field"].values[0, :, ]  # [M, 16, 16]
    seen = np.isfinite(values)
    np.testing.assert_allclose(x[:, seen], np.broadcast_to(values[seen], (3, seen.sum())), atol=1e-4)
    assert x[:, ~seen].std(axis=0).mean() > 0.1  # members differ where nothing is observed


def test_bad_observations_name_the_problem(trained_run, obs_store, tmp_path):
    path, _ = obs_store
    out = tmp_path / "x.zarr"
    with pytest.raises(SampleError, match="observations.step_size: not a setting of RePaint"):
        sample_ensemble(config(trained_run, out, {"path": str(path), "method": "repaint", "step_size": 1.0}))
    with pytest.raises(ObservationError, match="missing.zarr does not exist"):
        sample_ensemble(config(trained_run, out, {"path": str(tmp_path / "missing.zarr"), "method": "dps"}))
    other = tmp_path / "other.zarr"
    xr.Dataset({"temperature": (("y", "x"), np.zeros((32, 32)))}).to_zarr(other, zarr_format=2)
    with pytest.raises(ObservationError, match=r"lacks the variable\(s\) \['field'\]"):
        sample_ensemble(config(trained_run, out, {"path": str(other), "method": "repaint"}))
    assert not out.exists()
