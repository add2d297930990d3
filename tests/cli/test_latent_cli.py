"""Latent diffusion end to end, as a user runs it: ``scidiff-train experiment=quickstart_autoencoder``,
then ``experiment=quickstart_latent latent.autoencoder=<that run>``, then ``scidiff-sample``,
``scidiff-evaluate`` and ``scidiff-invert`` on the latent model, in subprocesses; the stores and
the MLflow runs they wrote read back; and the bad inputs of latent runs (one line each, nothing
written)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.cli.test_bad_inputs import assert_refused
from tests.training.conftest import QUIET, Command, run_cli, run_commands, run_train

AE = "outputs/quickstart_autoencoder/ae"
LATENT = "outputs/quickstart_latent/lat"
SHORT = ["trainer.max_steps=16", "trainer.val_check_interval=8", "trainer.limit_val_batches=2",
         "callbacks.periodic_checkpoint.every_n_train_steps=8"]


@pytest.fixture(scope="module")
def latent_runs(tmp_path_factory, data_dir) -> Path:
    """A tiny autoencoder of the quickstart fields, registered in MLflow's model registry, and a
    latent model on it named by the registry (16 steps each); in ``bad/``, one step of an autoencoder
    of the 32x32 GRFs (for ``broken``)."""
    cwd = tmp_path_factory.mktemp("latent")
    (cwd / "bad").mkdir()
    quiet = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    run_commands([
        # GroupNorm: after 16 steps its decoder's output has the data's scale; without normalisation
        # (the quickstart's) PyTorch's default initialisation starts it near zero
        Command("train", ["experiment=quickstart_autoencoder", "run_name=ae", "autoencoder.model_channels=8",
                          "autoencoder.norm=group", *SHORT,
                          "register_model=qs_autoencoder", *quiet], cwd),
        Command("train", ["experiment=quickstart_latent", "latent.autoencoder=models:/qs_autoencoder/1", "run_name=lat",
                          *SHORT, *QUIET, "module.cond_dropout=0.2"], cwd),
        Command("train", ["experiment=grf_autoencoder", "run_name=ae32",
                          "data.path=${oc.env:SCIDIFF_DATA_DIR}/grf_tiny.zarr", "data.num_workers=0",
                          "autoencoder.model_channels=8", "trainer.max_steps=1", "trainer.val_check_interval=1",
                          "trainer.limit_val_batches=1", "callbacks.periodic_checkpoint.every_n_train_steps=1",
                          "logger=none", "callbacks.reconstructions=null", *quiet], cwd / "bad"),
    ], data_dir)
    return cwd


def test_the_autoencoder_run_logs_reconstruction_metrics_and_figures(latent_runs):
    from mlflow.tracking import MlflowClient

    run_dir = latent_runs / AE
    summary = json.loads((run_dir / "summary.json").read_text())
    client = MlflowClient(f"sqlite:///{latent_runs / 'mlflow.db'}")
    run = client.get_run(summary["mlflow_run_id"])
    for key in ("val/loss", "val/rmse_field", "val/log_spectrum_rmse", "val/kl"):
        assert np.isfinite(run.data.metrics[key]), key
    assert run.data.params["stage"] == "autoencoder"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert "figures/reconstructions_step0000016.png" in artifacts
    assert (run_dir / "figures" / "reconstructions_step0000016.png").is_file()


def test_the_latent_checkpoint_holds_the_autoencoder_and_the_latent_statistics(latent_runs, data_dir):
    """The statistics are those of the posterior means of the training fields, per channel;
    the fields are normalised with the autoencoder's own statistics."""
    from scidiff.cli.train import compose_config, open_data
    from scidiff.inference.checkpoint import load_autoencoder, load_pretrained

    pre = load_pretrained(latent_runs / LATENT)
    ae = load_autoencoder(latent_runs / AE)
    assert pre.is_latent and pre.sample_shape == (4, 8, 8) and pre.field_shape == (1, 16, 16)
    assert pre.latent_info["sha256"] == ae.sha256 and pre.latent_info["posterior"] == "mean"  # the registered file
    ae_run = json.loads((latent_runs / AE / "summary.json").read_text())["mlflow_run_id"]
    assert pre.latent_info["mlflow_run_id"] == ae_run
    for a, b in zip(pre.latent.autoencoder.state_dict().values(), ae.autoencoder.state_dict().values()):
        assert torch.equal(a, b)
    assert pre.statistics.x == ae.statistics.x
    os.environ["SCIDIFF_DATA_DIR"] = str(data_dir)
    try:
        dm = open_data(compose_config(["experiment=quickstart"]))
    finally:
        del os.environ["SCIDIFF_DATA_DIR"]
    train = dm.datasets["train"]
    x = train.read_batch(np.asarray(train.indices))["x"]
    z = ae.autoencoder.encode(x).mean.double().transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(pre.latent.mean, z.mean(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pre.latent.std, z.std(1, unbiased=False), atol=1e-4, rtol=1e-4)


def test_sampling_decodes_to_a_store_like_a_field_model(latent_runs, trained_run, data_dir):
    """The ensemble store of a latent model has the layout of a field model's (dims, coordinates,
    units, attributes); members are reproducible and do not depend on the batch size."""
    grid = ["params.grid={spectral_index: [1.5, 3.0], amplitude: [1.0]}", "members=3", "sampler.steps=4"]
    run_commands([Command("sample", [f"checkpoint={LATENT}", "out=a.zarr", "batch_size=2", *grid], latent_runs),
                  Command("sample", [f"checkpoint={LATENT}", "out=b.zarr", "batch_size=6", "guidance.scale=2.0", *grid],
                          latent_runs),
                  Command("sample", [f"checkpoint={LATENT}", "out=c.zarr", "batch_size=6", *grid], latent_runs),
                  Command("sample", ["checkpoint=outputs/quickstart/tiny", f"out={latent_runs}/pixel.zarr", *grid],
                          trained_run)], data_dir)
    a, c = xr.open_zarr(latent_runs / "a.zarr"), xr.open_zarr(latent_runs / "c.zarr")
    pixel = xr.open_zarr(latent_runs / "pixel.zarr")
    assert a["field"].dims == pixel["field"].dims == ("sample", "member", "y", "x")
    assert dict(a.sizes) == dict(pixel.sizes)
    assert a["field"].attrs == pixel["field"].attrs and set(a.coords) == set(pixel.coords)
    assert set(a.attrs) == set(pixel.attrs)
    np.testing.assert_array_equal(a["field"].values, c["field"].values)
    values = a["field"].values
    assert np.isfinite(values).all() and values.std() > 0.1
    guided = xr.open_zarr(latent_runs / "b.zarr")["field"].values
    assert not np.allclose(guided, values)  # guidance reaches the latent denoiser


def test_evaluation_reports_fields_physical_metrics_the_autoencoder_and_a_latent_bound(latent_runs, data_dir):
    proc = run_cli("evaluate", [f"checkpoint={LATENT}", "split=val", "max_samples=6", "sampling.members=2",
                                "sampler.steps=4", "bound.estimator=importance", "bound.num_terms=4", "out=ev"],
                   latent_runs, data_dir, timeout=300)
    line = proc.stdout.strip().splitlines()[-1]
    assert "latent bound" in line and "not the data's" in line and "autoencoder reconstruction RMSE field" in line
    ev = xr.open_dataset(latent_runs / "ev" / "evaluation.nc")
    metrics = dict(zip(ev["metric"].values.tolist(), ev["metric_value"].values.tolist()))
    units = dict(zip(ev["metric"].values.tolist(), ev["metric_units"].values.tolist()))
    for key in ("latent_bpd", "autoencoder_rmse/field", "autoencoder_spectral_error/field", "spectral_error/field"):
        assert np.isfinite(metrics[key]), key
    assert units["autoencoder_rmse/field"] == "1" and units["latent_bpd"] == "bit"  # the field's units: "1"
    assert "bpd" not in metrics and "bpd_model" not in metrics  # nothing reads as a density of the data
    assert "latent_bpd" in ev and "bound_terms" not in ev
    assert any("latent: bounds on -log2 p(z)" in str(v) for v in ev.attrs.values())


def test_inversion_encodes_inverts_the_latent_and_decodes(latent_runs, data_dir):
    ds = xr.open_zarr(data_dir / "grf_quickstart.zarr").isel(sample=slice(0, 3)).load()
    for v in ds.variables.values():
        v.encoding.clear()
    ds.to_zarr(latent_runs / "inp.zarr", zarr_format=2, consolidated=True)
    proc = run_cli("invert", [f"checkpoint={LATENT}", "input=inp.zarr", "out=inv.zarr", "sampler.steps=8"],
                   latent_runs, data_dir, timeout=300)
    assert "3 fields inverted" in proc.stdout
    inv = xr.open_zarr(latent_runs / "inv.zarr")
    assert inv["latent"].dims == ("sample", "latent_channel", "latent_y", "latent_x")
    assert inv["latent"].shape == (3, 4, 8, 8) and inv["field"].shape == (3, 16, 16)
    assert np.isfinite(inv["field"].values).all()


def test_resuming_a_latent_run_keeps_its_latent_statistics(latent_runs, data_dir):
    ckpt = latent_runs / LATENT / "checkpoints" / "last.ckpt"
    before = torch.load(ckpt, weights_only=True)["state_dict"]
    run_train(["experiment=quickstart_latent", f"latent.autoencoder={AE}", "run_name=lat", "resume=auto",
               *SHORT, "trainer.max_steps=20", *QUIET, "module.cond_dropout=0.2"], latent_runs, data_dir)
    after = torch.load(ckpt, weights_only=True)
    assert after["global_step"] == 20
    for key in ("latent.mean", "latent.std"):
        assert torch.equal(before[key], after["state_dict"][key])


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def broken(latent_runs) -> Path:
    """A latent checkpoint without its autoencoder weights, beside the autoencoder on another grid
    that ``latent_runs`` trained in ``bad/``."""
    d = latent_runs / "bad"
    full = torch.load(latent_runs / LATENT / "checkpoints" / "last.ckpt", weights_only=True)
    full["state_dict"] = {k: v for k, v in full["state_dict"].items() if not k.startswith("latent.autoencoder.")}
    torch.save(full, d / "no_autoencoder.ckpt")
    return d


TRAIN_CASES = [
    ([], "latent.autoencoder: required"),
    (["latent.autoencoder=/nonexistent/ae"], "latent.autoencoder: /nonexistent/ae does not exist"),
    (["latent.autoencoder=outputs/quickstart_latent/lat"], "latent.autoencoder: outputs/quickstart_latent/lat/"
                                                           "checkpoints/last.ckpt is a diffusion model's checkpoint, "
                                                           "not an autoencoder's"),
    (["latent.autoencoder={broken}/outputs/grf_autoencoder/ae32"], "was trained on the grid {'y': 32, 'x': 32}"),
    (["latent.posterior=median"], "latent.posterior: expected"),
]


@pytest.mark.parametrize(("args", "expected"), TRAIN_CASES, ids=[" ".join(a) for a, _ in TRAIN_CASES])
def test_latent_training_refuses_bad_input(args, expected, latent_runs, broken, data_dir, capsys, monkeypatch):
    from scidiff.cli.train import main
    from tests.cli.test_bad_inputs import fill

    values = {"broken": broken}
    args, expected = fill(args, **values), fill([expected], **values)[0]
    monkeypatch.chdir(latent_runs)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    if not any(a.startswith("latent.autoencoder=") for a in args) and "required" not in expected:
        args = [f"latent.autoencoder={AE}", *args]
    assert_refused(main, ["experiment=quickstart_latent", "run_name=bad", "trainer.max_steps=2", *args], expected,
                   capsys, monkeypatch, latent_runs / "outputs", latent_runs / "mlflow.db", broken)


def test_autoencoder_training_refuses_a_grid_not_divisible_by_the_factor(latent_runs, data_dir, capsys, monkeypatch):
    from scidiff.cli.train import main

    monkeypatch.chdir(latent_runs)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    assert_refused(main, ["experiment=quickstart_autoencoder", "run_name=bad", "autoencoder.downsample=[32, 2]",
                          "trainer.max_steps=2"],
                   "autoencoder.downsample: grid axis 0 has 16 points, not divisible by the downsampling factor 32",
                   capsys, monkeypatch, latent_runs / "outputs", latent_runs / "mlflow.db")


def test_a_latent_model_without_its_autoencoder_is_refused_when_sampled(latent_runs, broken, capsys, monkeypatch):
    from scidiff.cli.sample import main

    monkeypatch.chdir(latent_runs)
    assert_refused(main, [f"checkpoint={broken}/no_autoencoder.ckpt", "out=never.zarr", "members=2",
                          "params.grid={spectral_index: [2.0], amplitude: [1.0]}"],
                   "is a latent diffusion model but holds no autoencoder weights", capsys, monkeypatch,
                   latent_runs / "outputs", broken)


def test_an_autoencoder_is_not_a_diffusion_model(latent_runs, capsys, monkeypatch):
    from scidiff.cli.sample import main

    monkeypatch.chdir(latent_runs)
    assert_refused(main, [f"checkpoint={AE}", "out=never.zarr", "members=2"],
                   "is an autoencoder (stage=autoencoder), not a diffusion model", capsys, monkeypatch,
                   latent_runs / "outputs")


def test_inpainting_a_latent_model_says_what_it_supports(latent_runs, data_dir, capsys, monkeypatch):
    from scidiff.cli.sample import main

    monkeypatch.chdir(latent_runs)
    ds = xr.open_zarr(data_dir / "grf_quickstart.zarr").isel(sample=slice(0, 1)).load()
    for v in ds.variables.values():
        v.encoding.clear()
    ds.to_zarr(latent_runs / "obs.zarr", zarr_format=2, consolidated=True, mode="w")
    assert_refused(main, [f"checkpoint={LATENT}", "out=never.zarr", "members=2", "observations={path: obs.zarr}",
                          "params.grid={spectral_index: [2.0], amplitude: [1.0]}"],
                   "observations: inpainting runs on a field-space model", capsys, monkeypatch,
                   latent_runs / "outputs", latent_runs / "obs.zarr")


def test_an_autoencoder_of_other_variables_or_another_rank_is_refused_by_name(latent_runs):
    import dataclasses

    from scidiff.inference.checkpoint import CheckpointError, load_autoencoder

    ae = load_autoencoder(latent_runs / AE)
    meta = ae.metadata
    ae.check_data(meta)
    with pytest.raises(CheckpointError, match=r"latent.autoencoder: .* trained on the variables \['field'\], the "
                                              r"data has \['tas'\]"):
        ae.check_data(dataclasses.replace(meta, channel_names=("tas",)))
    cube = dataclasses.replace(meta, spatial_dims=("z", "y", "x"), spatial_shape=(16, 16, 16))
    with pytest.raises(CheckpointError, match=r"latent.autoencoder: .* is a 2-D autoencoder .* the data is 3-D"):
        ae.check_data(cube)


def test_a_denoiser_too_deep_for_the_latent_grid_is_refused_before_training(latent_runs, data_dir, capsys,
                                                                             monkeypatch):
    """The quickstart's 8 x 8 latent through four levels with reflect padding: one line naming
    denoiser.channel_mult, not torch's padding error at the first step."""
    from scidiff.cli.train import main

    monkeypatch.chdir(latent_runs)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    assert_refused(main, ["experiment=quickstart_latent", f"latent.autoencoder={AE}", "run_name=deep",
                          "boundary=reflect", "denoiser.channel_mult=[1,2,2,2,2]", "trainer.max_steps=2"],
                   "denoiser.channel_mult: spatial shape (8, 8) is too small for 5 levels", capsys, monkeypatch,
                   latent_runs / "outputs", latent_runs / "mlflow.db")
