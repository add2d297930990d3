"""scidiff-invert through its command line, on the session's tiny conditional GRF run.

(The round trip with an exact denoiser, < 1e-3 relative error at 50 steps, is pinned
in tests/diffusion/test_samplers.py::test_inversion_round_trip.)"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.training.conftest import run_cli

RUN = "outputs/quickstart/tiny"


def run_invert(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return run_cli("invert", args, cwd, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def fields(data_dir, tmp_path_factory) -> Path:
    """Four GRF fields in physical units with their parameters, as a user would give them."""
    src = xr.open_zarr(data_dir / "grf_quickstart.zarr").isel(sample=slice(40, 44)).load()
    ds = xr.Dataset({name: (src[name].dims, src[name].values, dict(src[name].attrs))
                     for name in ("field", "spectral_index", "amplitude")},
                    coords={k: (src[k].dims, src[k].values, dict(src[k].attrs)) for k in ("sample", "y", "x")})
    path = tmp_path_factory.mktemp("invert") / "fields.zarr"
    ds.to_zarr(path, zarr_format=2, consolidated=True)
    return path


def test_invert_writes_the_documented_store(trained_run, fields, tmp_path):
    out = tmp_path / "latent.zarr"
    proc = run_invert([f"checkpoint={RUN}", f"input={fields}", f"out={out}", "sampler.steps=10", "refine_steps=2"],
                      trained_run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scidiff-invert: 4 fields inverted with 10 DDIM steps")
    ds = xr.open_zarr(out)
    inp = xr.open_zarr(fields).load()
    assert ds.latent.dims == ("sample", "channel", "y", "x") and list(ds.channel.values) == ["field"]
    assert ds.field.dims == ("sample", "y", "x") and ds.field.attrs["units"] == inp.field.attrs["units"]
    for name in ("field_error", "field_rmse"):
        assert name in ds.data_vars
    np.testing.assert_array_equal(ds.sample.values, inp.sample.values)
    np.testing.assert_array_equal(ds.y.values, inp.y.values)
    for p in ("spectral_index", "amplitude"):
        np.testing.assert_allclose(ds[p].values, inp[p].values)
    assert ds.attrs["steps"] == 10 and ds.attrs["spacing"] == "leading" and ds.attrs["checkpoint_weights"] == "ema"
    assert len(ds.attrs["checkpoint_sha256"]) == 64

    # the reported error is the error recomputed from the store and the input
    diff = ds.field.values.astype(np.float64) - inp.field.values.astype(np.float64)
    rmse = float(np.sqrt(np.mean(diff**2)))
    assert ds.attrs["rmse_field"] == pytest.approx(rmse, rel=1e-6)
    assert ds.attrs["relative_error_field"] == pytest.approx(rmse / float(np.std(inp.field.values.astype(np.float64))),
                                                             rel=1e-6)
    printed = re.search(r"RMSE field (\S+) 1 \(relative (\S+)\)", lines[0])
    assert printed and float(printed.group(1)) == pytest.approx(rmse, rel=1e-3)
    np.testing.assert_allclose(ds.field_error.values, diff, atol=1e-6)
    np.testing.assert_allclose(ds.field_rmse.values, np.sqrt(np.mean(diff.reshape(4, -1) ** 2, axis=1)), rtol=1e-5)
    # a briefly trained model still inverts faithfully: reconstruction well below the field's spread
    assert ds.attrs["relative_error_field"] < 0.1

    # the latent regenerates the stored reconstruction (ddim_sample, same steps, EMA weights)
    from scidiff.conditioning import Conditioning
    from scidiff.diffusion import samplers
    from scidiff.inference.checkpoint import load_pretrained

    torch.set_num_threads(1)
    pre = load_pretrained(trained_run / RUN)
    params = torch.tensor(np.stack([inp.spectral_index.values, inp.amplitude.values], 1), dtype=torch.float32)
    cond = Conditioning(params=pre.params_to_model(params))
    x_T = torch.from_numpy(ds.latent.values)
    regen = pre.to_physical(samplers.ddim_sample(pre.denoiser, pre.diffusion, x_T, 10, cond=cond))
    np.testing.assert_allclose(regen[:, 0].numpy(), ds.field.values, atol=2e-4)


def test_invert_cli_errors_are_one_line_with_status_2(trained_run, fields, tmp_path):
    def error(args):
        proc = run_invert(args, trained_run)
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        return lines[0]

    base = [f"checkpoint={RUN}", f"out={tmp_path / 'o.zarr'}"]
    assert "stepz: unknown config key" in error([*base, f"input={fields}", "stepz=3"])
    # a conditional model needs its parameters in the input: the message names the one missing
    lacking = tmp_path / "no_amplitude.zarr"
    xr.open_zarr(fields).load().drop_vars("amplitude").to_zarr(lacking, zarr_format=2, consolidated=True)
    assert "lacks the parameter(s) ['amplitude']" in error([*base, f"input={lacking}"])
    # +inf is not a missing point: refused, naming the variable
    infinite = tmp_path / "inf.zarr"
    ds = xr.open_zarr(fields).load()
    ds["field"][0, 0, 0] = np.inf
    ds.to_zarr(infinite, zarr_format=2, consolidated=True)
    assert "variable 'field' holds +-inf at 1 points" in error([*base, f"input={infinite}"])
    assert not (tmp_path / "o.zarr").exists()


def test_reconstruction_errors_leave_missing_points_out():
    from scidiff.sampling.invert import reconstruction_errors

    x = np.array([[[1.0, 2.0, np.nan, 4.0]], [[0.0, 2.0, 3.0, np.nan]]])  # [N=2, C=1, S=4]
    recon = np.array([[[1.5, 2.0, 100.0, 4.0]], [[0.0, 1.0, 3.0, -7.0]]])
    err = reconstruction_errors(x, recon, ["v"])["v"]
    valid = x[np.isfinite(x)]
    assert err["rmse"] == pytest.approx(np.sqrt((0.5**2 + 1.0**2) / 6))
    assert err["relative"] == pytest.approx(err["rmse"] / np.std(valid))
