"""scidiff-train end to end, in subprocesses: fast_dev_run of every experiment, the MLflow
store read back through the client, one-line config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scidiff.cli.train import CONFIG_DIR
from tests.training.conftest import QUIET, Command, run_commands, run_train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))
LATENT_EXPERIMENTS = [e for e in EXPERIMENTS if e.endswith("_latent")]
# quickstart_latent and its autoencoder train for real in tests/cli/test_latent_cli.py
LATENT_DEV_RUNS = [e for e in LATENT_EXPERIMENTS if e != "quickstart_latent"]


def _dev_overrides(experiment: str, tmp_path: Path, store: str) -> list[str]:
    if experiment.startswith("quickstart"):
        return []
    out = [f"data.path={tmp_path}/{store}.zarr", f"generate_data.path={tmp_path}/{store}.zarr"]
    if not experiment.endswith(("_autoencoder", "_latent")):  # a latent experiment's denoiser suits its latent grid
        out.append("denoiser=unet_tiny")
    return out


# Experiments whose training other tests run already (a dev run would only repeat it):
RUN_ELSEWHERE = {
    "quickstart": "trained for real by the shared trained_run fixture (tests/training/conftest.py) and others",
    "quickstart_autoencoder": "trained for real in tests/cli/test_latent_cli.py",
    "quickstart_contrastive": "trained for real in tests/cli/test_contrastive_cli.py",
    "grf_autoencoder": "its first step in test_latent_experiment_dev_run[grf_latent] below",
    "climate_autoencoder": "its first step in test_latent_experiment_dev_run[climate_latent] below",
    "voxels_autoencoder": "its first step in test_latent_experiment_dev_run[voxels_latent] below",
    "climate": "the base of test_climate_controlnet_dev_run below",
    # voxels with the descriptors as an embedding: end to end in tests/cli/test_embedding_cli.py, its config in
    # tests/training/test_configs.py
    "voxels_descriptors": "the embedding path in tests/cli/test_embedding_cli.py",
}


FAST_PATHS = {"grf": ["trainer.precision=bf16-mixed", "module.channels_last=true"]}
# a fine-tuning or a ControlNet needs a trained base: tests/cli/test_finetune_cli.py (and the climate
# ControlNet's own run below)
DEV_RUNS = [e for e in EXPERIMENTS if e not in LATENT_EXPERIMENTS and not e.endswith(("_finetune", "_controlnet"))
            and e not in RUN_ELSEWHERE]
# the quickstart at the other spatial ranks: one training step, then what a user runs next (a 2-member ensemble
# into zarr, an evaluation with its verdict), each through the CLI
RANK_RUNS = {"quickstart_1d": ("x",), "quickstart_3d": ("z", "y", "x")}
ONE_STEP = ["trainer.max_steps=1", "trainer.val_check_interval=1", "trainer.limit_val_batches=1",
            "callbacks.periodic_checkpoint.every_n_train_steps=1", "generate_data.size=tiny", "logger=none",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="module")
def dev_runs(tmp_path_factory, data_dir) -> dict[str, tuple[Path, list]]:
    """Every dev run of this module, in one scidiff-train process (``run_commands``), each in its own
    directory: {name: (directory, [CompletedProcess of each of its commands])}.

    * each experiment of ``DEV_RUNS``: it generates its store (tiny size) and runs one train + one val
      batch of 2 (``fast_dev_run``); the 2-D GRF run takes the GPU recipe's CPU-capable fast paths from the
      command line (bf16-mixed, channels-last);
    * each latent experiment with its own autoencoder experiment: one autoencoder step on the tiny
      store, then one step of the latent model on it (the latent tests train them for real);
    * ``climate_controlnet`` on a one-step ``climate`` model;
    * the quickstart with ``diffusion=edm``, one step.
    """
    plan: dict[str, tuple[Path, list[Command]]] = {}
    for experiment in DEV_RUNS:
        cwd = tmp_path_factory.mktemp(experiment)
        overrides = [f"experiment={experiment}", "trainer.fast_dev_run=true", "generate_data.size=tiny", *QUIET,
                     *_dev_overrides(experiment, cwd, experiment), *FAST_PATHS.get(experiment, []),
                     "data.batch_size=2"]  # the experiments' batches are GPU-sized (the voxels': 38 s a step here)
        if experiment.endswith("_autoencoder"):
            overrides += ["callbacks.reconstructions=null", "autoencoder.model_channels=8"]
        plan[experiment] = (cwd, [Command("train", overrides, cwd)])
        if experiment in RANK_RUNS:
            run = f"outputs/{experiment}/dev"
            plan[experiment] = (cwd, [
                Command("train", [f"experiment={experiment}", "run_name=dev", *ONE_STEP, *QUIET], cwd),
                Command("sample", [f"checkpoint={run}", "members=2", "sampler=ddim", "sampler.steps=3", "out=ens.zarr",
                                   "params.list=[{spectral_index: 2.25, amplitude: 1.0}]"], cwd),
                Command("evaluate", [f"checkpoint={run}", "split=val", "max_samples=3", "sampling.members=2",
                                     "sampler=ddim", "sampler.steps=3", "progress=false"], cwd)])
    for experiment in LATENT_DEV_RUNS:
        cwd = tmp_path_factory.mktemp(experiment)
        base = experiment[: -len("_latent")]
        store = f"{base}_tiny"
        ae = cwd / "outputs" / f"{base}_autoencoder" / "ae"
        # the tiny stores' latents are smaller than the experiments' (climate: 4 x 8): a shallower UNet
        plan[experiment] = (cwd, [
            Command("train", [f"experiment={base}_autoencoder", "run_name=ae", "autoencoder.model_channels=8",
                              "callbacks.reconstructions=null", *ONE_STEP,
                              *_dev_overrides(f"{base}_autoencoder", cwd, store)], cwd),
            Command("train", [f"experiment={experiment}", f"latent.autoencoder={ae}", "latent.statistics_samples=32",
                              "denoiser.channel_mult=[1,2]", "denoiser.attention_levels=[1]",
                              "denoiser.model_channels=16", "denoiser.head_channels=16", "trainer.fast_dev_run=true",
                              "generate_data.size=tiny", *QUIET, *_dev_overrides(experiment, cwd, store)], cwd)])
    cwd = tmp_path_factory.mktemp("climate_controlnet")
    store = _dev_overrides("climate", cwd, "climate_tiny")
    plan["climate_controlnet"] = (cwd, [
        Command("train", ["experiment=climate", "run_name=base", *ONE_STEP, *store], cwd),
        Command("train", ["experiment=climate_controlnet", f"finetune.base={cwd / 'outputs/climate/base'}",
                          "run_name=cn", *ONE_STEP, *store], cwd)])
    cwd = tmp_path_factory.mktemp("climate_anomaly")
    store = _dev_overrides("climate", cwd, "climate_tiny")
    plan["climate_anomaly"] = (cwd, [
        Command("train", ["experiment=climate", "run_name=anom", "data.variables=[{name: tas, transform: anomaly}]",
                          *ONE_STEP, *store], cwd),
        Command("evaluate", ["checkpoint=outputs/climate/anom", "split=val", "max_samples=3", "sampling.members=2",
                             "sampler=ddim", "sampler.steps=3", "progress=false", "bound.estimator=importance",
                             "bound.num_terms=4", f"data_path={cwd}/climate_tiny.zarr"],
                cwd)])
    cwd = tmp_path_factory.mktemp("edm")
    plan["edm"] = (cwd, [Command("train", ["experiment=quickstart", "diffusion=edm", "run_name=edm", *ONE_STEP, *QUIET],
                                 cwd)])
    done = iter(run_commands([c for _, commands in plan.values() for c in commands], data_dir, check=False))
    return {name: (cwd, [next(done) for _ in commands]) for name, (cwd, commands) in plan.items()}


def succeeded(procs: list) -> list:
    for proc in procs:
        assert proc.returncode == 0, f"scidiff-train {' '.join(proc.args)} failed:\n{proc.stderr[-4000:]}"
    return procs


@pytest.mark.parametrize("experiment", DEV_RUNS)
def test_experiment_fast_dev_run(experiment, dev_runs):
    """One train + one val batch of the experiment on its generated tiny store (see ``dev_runs``)."""
    cwd, procs = dev_runs[experiment]
    proc = succeeded(procs)[0]
    assert "scidiff-train: 1 steps" in proc.stdout
    summary = json.loads(next((cwd / "outputs").rglob("summary.json")).read_text())
    assert summary["global_step"] == 1


@pytest.mark.parametrize("experiment", sorted(RANK_RUNS))
def test_quickstart_at_other_ranks_samples_and_evaluates(experiment, dev_runs):
    """experiment=quickstart_1d (64-point profiles) and quickstart_3d (8^3 voxels): the UNet is built
    with the data's rank, the ensemble store has the store's spatial dims, and the evaluation reports
    the bound against the exact NLL and the spectral error beside its floor."""
    import xarray as xr

    from scidiff.inference.checkpoint import load_pretrained

    cwd, procs = dev_runs[experiment]
    succeeded(procs)
    dims = RANK_RUNS[experiment]
    model = load_pretrained(cwd / f"outputs/{experiment}/dev")
    assert model.denoiser.dims == len(dims) and model.metadata.spatial_dims == dims
    ens = xr.open_zarr(cwd / "ens.zarr")
    assert ens["field"].dims == ("sample", "member", *dims) and ens.sizes["member"] == 2
    assert bool(ens["field"].notnull().all())
    ev = xr.open_dataset(cwd / f"outputs/{experiment}/dev/eval/val/evaluation.nc")
    metrics = dict(zip(ev["metric"].values.tolist(), ev["metric_value"].values.tolist()))
    assert metrics["bpd"] > metrics["true_nll_bpd"] > 0   # the (exact) bound bounds the exact NLL from above
    assert metrics["spectral_error/field"] > 0 and metrics["floor/spectral_error/field"] > 0


@pytest.mark.parametrize("experiment", LATENT_DEV_RUNS)
def test_latent_experiment_dev_run(experiment, dev_runs):
    """One autoencoder step, then one step of the latent model on its latents (see ``dev_runs``)."""
    _, proc = succeeded(dev_runs[experiment][1])   # the autoencoder's step, then the latent model's
    assert "scidiff-train: 1 steps" in proc.stdout and "on the latent" in proc.stdout


def test_climate_controlnet_dev_run(dev_runs):
    """experiment=climate_controlnet on a one-step climate model: the land-sea mask stays the base's
    field, the coarse tas is the new one, and the run loads as a ControlNet."""
    from scidiff.inference.checkpoint import load_pretrained

    cwd, procs = dev_runs["climate_controlnet"]
    assert "fine-tuned (controlnet)" in succeeded(procs)[1].stdout
    model = load_pretrained(cwd / "outputs/climate_controlnet/cn")
    assert model.metadata.field_names == ("land_sea_mask", "tas@coarse4x4") and model.control_scale == 1.0
    assert model.statistics.fields == load_pretrained(cwd / "outputs/climate/base").statistics.fields


def test_climate_with_anomaly_scaling_trains_and_evaluates_in_kelvin(dev_runs):
    """experiment=climate with tas as a standardised anomaly (a mean and std per grid point): the run's
    statistics hold the maps, the members come back in kelvin, and the bound's log-determinant is the
    cos(latitude)-weighted mean of -log2(std_p) over the grid."""
    import numpy as np
    import xarray as xr

    from scidiff.evaluation.data import area_weights
    from scidiff.inference.checkpoint import load_pretrained

    cwd, procs = dev_runs["climate_anomaly"]
    succeeded(procs)
    model = load_pretrained(cwd / "outputs/climate/anom")
    tas = model.statistics.x[0]
    assert tas.scaling == "anomaly" and tuple(tas.point_shape) == model.metadata.spatial_shape
    shift, scale = tas.affine()
    assert shift.std() > 5 and scale.std() > 0.1    # the climatology varies over the grid: equator to pole
    ev = xr.open_dataset(cwd / "outputs/climate/anom/eval/val/evaluation.nc")
    metrics = dict(zip(ev["metric"].values.tolist(), ev["metric_value"].values.tolist()))
    w = area_weights(model.metadata, "auto").numpy()
    expected = -(w * np.log2(scale)).sum() / w.sum()
    assert metrics["log_det_bpd"] == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx(-np.log2(scale).mean(), rel=1e-3)  # the unweighted mean would differ
    # in kelvin, and near the truth even after one step: the members start from each point's climatology
    # (a z-scored model's are spread over the whole channel's 16 K)
    assert np.isfinite(metrics["bpd"]) and 0 < metrics["crps/tas"] < 10


def test_edm_sigma_data_auto_is_resolved_from_the_training_statistics(dev_runs):
    """diffusion=edm has sigma_data: auto; the run records the number (the RMS of the z-scored
    training fields: 1) in its config, and the checkpoint loads with it."""
    from scidiff.inference.checkpoint import load_pretrained

    cwd, procs = dev_runs["edm"]
    succeeded(procs)
    pre = load_pretrained(cwd / "outputs" / "quickstart" / "edm")
    assert pre.config["diffusion"]["sigma_data"] == pytest.approx(1.0, abs=1e-5)
    assert pre.diffusion.prediction == "edm" and pre.diffusion.sigma_data == pytest.approx(1.0, abs=1e-5)
    assert pre.diffusion.timestep_sampling == "lognormal"


def test_last_checkpoint_holds_the_final_weights_with_minimal_callbacks(tmp_path, data_dir):
    """7 steps with a checkpoint every 5: last.ckpt holds step 7 (Lightning alone left step 5
    there), files follow the umask (not mkstemp's 0600); callbacks=minimal with the quickstart
    (which tunes callbacks.samples) and logger=none runs, saying in one line what it ignores."""
    import torch

    proc = run_train(["experiment=quickstart", "run_name=fin", "trainer.max_steps=7", "trainer.val_check_interval=7",
                      "callbacks.periodic_checkpoint.every_n_train_steps=5", "callbacks=minimal", "logger=none",
                      "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"], tmp_path, data_dir,
                     extra_env={"PYTHONWARNINGS": "default"})
    assert "scidiff-train: 7 steps" in proc.stdout
    assert "warning: callbacks.samples: no _target_" in proc.stderr
    ckpts = tmp_path / "outputs" / "quickstart" / "fin" / "checkpoints"
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 7
    assert torch.load(ckpts / "step0000005.ckpt", weights_only=True)["global_step"] == 5
    assert (ckpts / "last.ckpt").stat().st_mode & 0o044 == 0o044  # group and others may read it


def test_quickstart_logs_to_mlflow(tmp_path, data_dir):
    """After a short run the SQLite store holds params, the loss curve and the checkpoint."""
    from mlflow.tracking import MlflowClient

    args = ["experiment=quickstart", "run_name=ml", "trainer.max_steps=12", "trainer.val_check_interval=6",
            "trainer.log_every_n_steps=2", "callbacks.periodic_checkpoint.every_n_train_steps=6",
            "callbacks.samples.num_steps=2", "callbacks.samples.num_samples=2"]
    proc = run_train(args, tmp_path, data_dir, extra_env={"PYTHONWARNINGS": ""})  # a user's default warnings
    # the output a user reads (redirected: status lines, no bars), and nothing from the libraries
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("scidiff-train: run ") and "12 steps on cpu x1" in lines[0] and "s/step" in lines[0]
    assert [ln.split(" | ")[0] for ln in lines[1:3]] == ["step 6/12", "step 12/12"] and "val/loss" in lines[2]
    assert len(lines) == 4 and proc.stderr == "", proc.stderr
    assert (tmp_path / "outputs/quickstart/ml/train.log").read_text() == proc.stdout   # the run's log
    line = lines[-1]
    db = (tmp_path / "mlflow.db").resolve()
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in line and "last.ckpt" in line

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["trainer.max_steps"] == "12"
    assert run.data.params["optimizer.lr"] == "0.002"
    assert run.data.tags.get("git_commit")
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 3, 5, 7, 9, 11] or len(losses) >= 5
    assert all(0.0 < m.value < 10.0 for m in losses)
    val = client.get_metric_history(run.info.run_id, "val/loss")
    assert len(val) == 2
    assert any(k.startswith("val/loss_t") for k in run.data.metrics)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "statistics.json", "checkpoints", "figures"} <= top
    ckpts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert {"last.ckpt", "best.ckpt"} <= ckpts
    local = Path(client.download_artifacts(run.info.run_id, "checkpoints/last.ckpt", str(tmp_path / "dl")))
    import torch

    ckpt = torch.load(local, weights_only=True)
    assert ckpt["global_step"] == 12 and ckpt["scidiff"]["mlflow_run_id"] == run.info.run_id


@pytest.mark.parametrize(
    ("override", "expected"),
    [   # the whole corpus runs in-process in tests/cli/test_bad_inputs.py; here the real process's stderr
        ("trainer.max_stepz=3", "trainer.max_stepz: unknown config key"),                  # before Hydra
        ("data.variables=[temperature]", "variable 'temperature' not found in store"),      # inside the run
    ],
)
def test_bad_config_fails_with_one_line(override, expected, tmp_path, data_dir):
    proc = run_train(["experiment=quickstart", override], tmp_path, data_dir, check=False, timeout=60)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert not (tmp_path / "outputs").exists()      # nothing ran
