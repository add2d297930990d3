"""scidiff-sample with condition fields: a tiny climate model conditioned on the land-sea mask,
sst (NaN over land) and tas coarsened 4x4, plus the co2_forcing parameter, trained once per
session; condition inputs written as a user would (a ``time`` dim, zarr or netCDF)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.training.conftest import QUIET, run_cli, run_train

TRAIN = [
    "experiment=climate_landsea", "denoiser=unet_tiny", "generate_data.size=tiny",
    "data.fields=[{name: land_sea_mask, transform: none}, {name: sst, transform: zscore}, "
    "{coarsen: {lat: 4, lon: 4}}]",
    "data.params=[{name: co2_forcing, transform: zscore}]", "data.batch_size=8", "data.num_workers=0",
    "logger=csv", "trainer.max_steps=20", "trainer.val_check_interval=20", "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=10", "callbacks.periodic_checkpoint.every_n_train_steps=20", "run_name=tiny", *QUIET,
]
PICK = [2, 14, 40]  # samples of the climate store used as condition inputs


@pytest.fixture(scope="module")
def climate(tmp_path_factory) -> dict[str, Path]:
    """The tiny climate store, the field-conditioned checkpoint trained on it, and a condition
    input with dim ``time`` (as a user's file would have) holding samples PICK."""
    from scidiff_datasets.cli import main as make_dataset

    d = tmp_path_factory.mktemp("conditions")
    store = d / "climate_tiny.zarr"
    assert make_dataset(["climate", "--out", str(store), "--size", "tiny", "--seed", "0", "-q"]) in (0, None)
    run_train([*TRAIN, f"data.path={store}", f"generate_data.path={store}"], d, d)
    src = xr.open_zarr(store).isel(sample=PICK).load()
    user = src[["tas", "sst", "land_sea_mask", "co2_forcing"]].swap_dims(sample="time").drop_vars(
        ["sample", "month", "year", "simulation"])
    inp = d / "input.zarr"
    user.to_zarr(inp, zarr_format=2, consolidated=True)
    return {"dir": d, "store": store, "ckpt": d / "outputs" / "climate_landsea" / "tiny", "input": inp}


def config(climate, out: Path, **changes) -> dict:
    cfg = {"checkpoint": str(climate["ckpt"]), "tracking_uri": None, "params": None, "members": 3,
           "batch_size": 4, "batch_invariant": True, "seed": 0,
           "sampler": {"name": "ddim", "steps": 4, "eta": 0.0, "spacing": "leading"},
           "guidance": {"scale": 1.0, "rescale": 0.0}, "observations": None,
           "conditions": {"path": str(climate["input"]), "isel": None}, "out": str(out), "overwrite": False,
           "device": "cpu", "progress": False, "mlflow": {"run": "none"}}
    cfg.update(changes)
    return cfg


def run(cfg) -> dict:
    from scidiff.sampling import sample_ensemble

    return sample_ensemble(cfg, log=lambda line: None)


def write(ds: xr.Dataset, path: Path) -> Path:
    ds.to_netcdf(path, engine="scipy") if path.suffix == ".nc" else ds.to_zarr(path, zarr_format=2, consolidated=True)
    return path


def test_fields_are_normalised_as_in_training(climate):
    """The fields the sampler feeds the model are bit-for-bit the data module's batch fields
    (mask as is, sst z-scored with NaN -> 0, tas z-scored then 4x4 block means)."""
    from scidiff.data.dataset import FieldDataset
    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.sampling.conditions import load_conditions

    pre = load_pretrained(climate["ckpt"])
    assert pre.metadata.field_names == ("land_sea_mask", "sst", "tas@coarse4x4")
    cond = load_conditions(climate["input"], pre)
    data = pre.config["data"]
    batch = FieldDataset(climate["store"], data["variables"], data["spatial_dims"], data["sample_dims"],
                         data["params"], data["fields"], statistics=pre.statistics).read_batch(PICK)
    assert torch.isnan(torch.as_tensor(xr.open_zarr(climate["input"])["sst"].values)).any()
    torch.testing.assert_close(cond.fields, batch["fields"], rtol=0, atol=0)
    assert cond.sample_dims == ("time",) and len(cond) == 3
    np.testing.assert_allclose(cond.params["co2_forcing"], xr.open_zarr(climate["input"])["co2_forcing"].values)


def test_store_has_one_sample_per_input(climate, tmp_path):
    out = tmp_path / "ens.zarr"
    summary = run(config(climate, out))
    assert summary["num_samples"] == 3 and summary["written"] == 9
    ds = xr.open_zarr(out)
    inp = xr.open_zarr(climate["input"]).load()
    assert ds["tas"].dims == ("sample", "member", "lat", "lon") and ds["tas"].shape == (3, 3, 16, 32)
    np.testing.assert_array_equal(ds["time"].values, inp["time"].values)  # the input's sample coordinate
    assert ds["time"].dims == ("sample",) and ds["condition_index"].values.tolist() == [0, 1, 2]
    np.testing.assert_allclose(ds["co2_forcing"].values, inp["co2_forcing"].values)  # params from the input
    np.testing.assert_array_equal(ds["lat"].values, inp["lat"].values)
    assert ds["tas"].attrs["units"] == "K"

    # physical units: a stored member is the denormalised sample of its seed given those fields
    from scidiff.inference import DDIM, GuidanceSpec, generate
    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.sampling.conditions import load_conditions

    pre = load_pretrained(climate["ckpt"])
    fields = load_conditions(climate["input"], pre).fields
    x = generate(pre, torch.tensor([[float(inp["co2_forcing"][1])]]), [int(ds["seed"][1, 2])],
                 sampler=DDIM(steps=4), guidance=GuidanceSpec(), fields=fields[1:2])
    tas = ds["tas"].values
    # generated alone here, in a micro-batch of the run there: equal to float32 rounding
    np.testing.assert_allclose(tas[1, 2], x[0, 0].numpy(), rtol=1e-5, atol=1e-4)
    assert np.isfinite(tas).all() and 150.0 < tas.mean() < 350.0
    assert (tas.std(axis=1) > 0).all()  # members differ


def test_the_condition_reaches_the_model(climate, tmp_path):
    """Same seeds, other fields (warmer sst and tas): other members; guidance's null
    condition drops the fields."""
    inp = xr.open_zarr(climate["input"]).load()
    warm = inp.copy()
    warm["tas"], warm["sst"] = inp["tas"] + 15.0, inp["sst"] + 15.0
    base = run(config(climate, tmp_path / "a.zarr", members=1, conditions={"path": str(climate["input"]),
                                                                            "isel": {"time": [0]}}))
    warmer = run(config(climate, tmp_path / "b.zarr", members=1, conditions={
        "path": str(write(warm, tmp_path / "warm.nc")), "isel": {"time": [0]}}))
    a = xr.open_zarr(base["out"])["tas"].values
    b = xr.open_zarr(warmer["out"])["tas"].values
    assert np.abs(a - b).max() > 1e-3

    from scidiff.conditioning import Conditioning
    from scidiff.inference.checkpoint import load_pretrained

    den = load_pretrained(climate["ckpt"]).denoiser
    x, t = torch.randn(2, 1, 16, 32, generator=torch.Generator().manual_seed(0)), torch.tensor([5, 400])
    f1, f2 = torch.randn(2, 2, 3, 16, 32, generator=torch.Generator().manual_seed(1))
    p, drop = torch.zeros(2, 1), torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        assert not torch.equal(den(x, t, Conditioning(params=p, fields=f1)),
                               den(x, t, Conditioning(params=p, fields=f2)))
        torch.testing.assert_close(den(x, t, Conditioning(params=p, fields=f1, drop=drop)),
                                   den(x, t, Conditioning(params=p, fields=f2, drop=drop)), rtol=0, atol=0)


def test_params_grid_crossed_with_inputs(climate, tmp_path):
    inp = xr.open_zarr(climate["input"]).load().drop_vars("co2_forcing")
    path = write(inp, tmp_path / "no_params.zarr")
    out = tmp_path / "grid.zarr"
    run(config(climate, out, members=1, params={"grid": {"co2_forcing": [3.0, 6.0]}},
               conditions={"path": str(path), "isel": None}))
    ds = xr.open_zarr(out)
    assert ds.sizes["sample"] == 6
    assert ds["co2_forcing"].values.tolist() == [3.0, 6.0] * 3
    assert ds["condition_index"].values.tolist() == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(ds["time"].values, np.repeat(inp["time"].values, 2))
    tas = ds["tas"].values
    assert np.abs(tas[0] - tas[1]).max() > 0  # same input, other co2


def test_resume_identity_holds_the_condition_content(climate, tmp_path):
    from scidiff.sampling import StoreError

    inp = xr.open_zarr(climate["input"]).load().isel(time=[0])
    path = write(inp, tmp_path / "one.zarr")
    out = tmp_path / "ens.zarr"
    cfg = config(climate, out, members=1, conditions={"path": str(path), "isel": None})
    assert run(cfg)["written"] == 1
    again = run(cfg)
    assert again["action"] == "resume" and again["skipped"] == 1 and again["written"] == 0
    identity = xr.open_zarr(out).attrs["identity"]
    assert str(path.resolve()) in identity
    inp["sst"] = inp["sst"] + 0.5  # the same file, other content: another run
    write(inp, tmp_path / "edited.zarr")
    os.replace(tmp_path / "one.zarr", tmp_path / "old.zarr")
    os.replace(tmp_path / "edited.zarr", path)
    with pytest.raises(StoreError, match="differs in: conditions"):
        run(cfg)


def test_coarse_grid_input_downscales_like_the_fine_field(climate):
    """tas given on the 4x coarser grid gives the same coarse condition as the fine tas."""
    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.sampling.conditions import StoreReader, condition_fields

    pre = load_pretrained(climate["ckpt"])
    fine = xr.open_zarr(climate["input"]).load()
    coarse = fine[["tas"]].coarsen(lat=4, lon=4).mean()
    read = StoreReader(coarse, "coarse.zarr", "conditions.path", pre.metadata, ["time"]).field(
        "tas", what="fine tas", coarse=(4, 4))
    variables = torch.from_numpy(np.stack([np.broadcast_to(fine["land_sea_mask"].values, fine["sst"].shape),
                                           fine["sst"].values], axis=1))
    a = condition_fields(pre, variables, torch.from_numpy(read))
    b = condition_fields(pre, variables, torch.from_numpy(fine["tas"].values[:, None]))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bad_inputs_are_one_line_errors(climate, tmp_path):
    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.sampling import ParameterError, SampleError
    from scidiff.sampling.conditions import ConditionError, load_conditions

    inp = xr.open_zarr(climate["input"]).load()
    no_sst = write(inp.drop_vars("sst"), tmp_path / "no_sst.zarr")
    with pytest.raises(ConditionError, match=rf"conditions.path: {no_sst} lacks the variable 'sst'"):
        run(config(climate, tmp_path / "o.zarr", conditions={"path": str(no_sst), "isel": None}))
    half = write(inp.isel(lat=slice(0, 8)), tmp_path / "half.zarr")
    with pytest.raises(ConditionError, match=r"spatial shape \(lat=8, lon=32\), the model's is \(lat=16, lon=32\)"):
        run(config(climate, tmp_path / "o.zarr", conditions={"path": str(half), "isel": None}))
    with pytest.raises(ParameterError, match=r"given both by params and as variables of conditions.path"):
        run(config(climate, tmp_path / "o.zarr", params={"grid": {"co2_forcing": [3.0]}}))
    with pytest.raises(SampleError, match=r"conditioned on the fields .*land_sea_mask.*give conditions.path"):
        run(config(climate, tmp_path / "o.zarr", conditions=None, params={"grid": {"co2_forcing": [3.0]}}))
    pre = load_pretrained(climate["ckpt"])
    plain = dataclasses.replace(pre, metadata=dataclasses.replace(pre.metadata, field_names=()))
    with pytest.raises(ConditionError, match=r"conditions: the checkpoint .* is not conditioned on fields"):
        load_conditions(climate["input"], plain)
    assert not (tmp_path / "o.zarr").exists()

    # through the command line: one line, exit status 2
    proc = run_cli("sample", [f"checkpoint={climate['ckpt']}", f"conditions.path={no_sst}",
                              f"out={tmp_path / 'o.zarr'}", "mlflow.run=none"], tmp_path, timeout=120, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("error: conditions.path:") and "'sst'" in lines[0] and str(no_sst) in lines[0]
