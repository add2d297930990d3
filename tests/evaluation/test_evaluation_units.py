"""evaluation.nc is CF: ``Conventions``, and every data variable carries ``units`` and a
``long_name`` -- checked on a file written by ``write_evaluation_file`` from a real
``evaluate`` of a two-variable store whose variables differ in units (K and kg m-2 s-1) on a
grid in km."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from scidiff.data import FieldDataModule, FractionSplit
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule
from scidiff.evaluation import evaluate
from scidiff.evaluation.report import metric_units, netcdf_engine, power_units, write_evaluation_file
from scidiff.evaluation.settings import BoundSettings, EvaluationSettings, SamplingSettings
from scidiff.inference import DDIM, Pretrained

N, H, W = 16, 8, 12
UNITS = {"tas": "K", "pr": "kg m-2 s-1"}


class TwoChannelDenoiser(nn.Module):
    """A fixed periodic 3x3 convolution over two channels (deterministic weights)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="circular")
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, cond=None):
        return self.conv(x)


@pytest.fixture(scope="module")
def evaluation_file(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("units")
    rng = np.random.default_rng(0)
    white = rng.standard_normal((2, N, H, W))
    smooth = (white + np.roll(white, 1, axis=2) + np.roll(white, 1, axis=3)) / math.sqrt(3.0)
    ds = xr.Dataset(
        {"tas": (("sample", "y", "x"), 280.0 + 5.0 * smooth[0], {"units": UNITS["tas"], "long_name": "temperature"}),
         "pr": (("sample", "y", "x"), 1e-4 * np.exp(smooth[1]), {"units": UNITS["pr"], "long_name": "rain"})},
        coords={"sample": np.arange(N), "y": ("y", np.arange(H) * 25.0, {"units": "km"}),
                "x": ("x", np.arange(W) * 25.0, {"units": "km"})},
    )
    ds.to_zarr(tmp / "data.zarr", zarr_format=2, consolidated=True)
    cfg = {"path": str(tmp / "data.zarr"), "variables": [{"name": "tas", "transform": "zscore"},
                                                         {"name": "pr", "transform": "zscore"}],
           "spatial_dims": ["y", "x"], "sample_dims": "sample", "batch_size": 4, "mask": "never", "num_workers": 0}
    dm = FieldDataModule(**cfg, split=FractionSplit(0.5, 0.25, 0.25))
    dm.setup()
    data_cfg = {"_target_": "scidiff.data.FieldDataModule", "_convert_": "all", **cfg,
                "split": {"_target_": "scidiff.data.FractionSplit", "train": 0.5, "val": 0.25, "test": 0.25}}
    pretrained = Pretrained(
        denoiser=TwoChannelDenoiser().eval().requires_grad_(False),
        diffusion=GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=30)), metadata=dm.metadata,
        statistics=dm.statistics, config={"data": data_cfg}, checkpoint=tmp / "fake.ckpt", sha256="0" * 64,
        global_step=1, weights="raw", split_indices={k: v.tolist() for k, v in dm.split_indices.items()},
    )
    ev = evaluate(pretrained, EvaluationSettings(split="val", batch_size=4,
                                                 bound=BoundSettings(estimator="exact", timestep_batch=30),
                                                 sampling=SamplingSettings(members=3), sampler=DDIM(steps=2)),
                  device="cpu", progress=False)
    return write_evaluation_file(ev, tmp / "evaluation.nc")


def test_every_data_variable_has_units_and_a_long_name(evaluation_file):
    with xr.open_dataset(evaluation_file, engine=netcdf_engine()) as ds:
        assert ds.attrs["Conventions"] == "CF-1.10"
        assert {"crps_map", "bias", "std_samples", "std_data", "power_data", "rank_histogram",
                "metric_value", "bpd"} <= set(ds.data_vars)
        missing = {name: sorted({"units", "long_name"} - set(ds[name].attrs)) for name in ds.data_vars}
        assert {k: v for k, v in missing.items() if v} == {}
        for name in ds.data_vars:
            assert str(ds[name].attrs["units"]).strip(), name
        # the two variables differ in units: a per-channel listing, and each one in channel_units
        for name in ("crps_map", "bias", "std_samples", "std_data"):
            assert ds[name].attrs["units"] == "tas: K; pr: kg m-2 s-1"
        assert [str(u) for u in ds["channel_units"].values] == ["K", "kg m-2 s-1"]
        assert ds["power_data"].attrs["units"] == "tas: K^2 km^2; pr: (kg m-2 s-1)^2 km^2"
        assert ds["rank_histogram"].attrs["units"] == "1" and ds["bpd"].attrs["units"] == "bit"
        assert ds["wavenumber"].attrs["units"] == "km-1" and ds["x"].attrs["units"] == "km"
        # the metric table: each metric's units beside it
        units = dict(zip(ds["metric"].values.tolist(), ds["metric_units"].values.tolist()))
        assert units["crps/tas"] == "K" and units["crps/pr"] == "kg m-2 s-1" and units["bpd"] == "bit"
        assert units["spread_skill/pr"] == "1" and units["num_samples"] == "1"
        assert ds["metric_value"].attrs["units"] == "see metric_units"
        assert {k: u for k, u in units.items() if not u} == {}  # every metric's units are known
        assert all(str(u) for u in ds["verdict_metric_units"].values)


def test_one_unit_for_channels_that_share_it():
    assert metric_units("floor/crps/tas", {"tas": "K"}) == "K"
    assert metric_units("gap_se/ode", {}) == "bit" and metric_units("sampling_seconds_per_1000", {}) == "s"
    assert metric_units("something_new", {}) == ""
    assert power_units("1", ("grid spacing", "grid spacing")) == "1"
    assert power_units("K", ("x units",)) == ""  # a grid without a known length unit
