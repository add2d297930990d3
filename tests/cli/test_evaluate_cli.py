"""scidiff-evaluate end to end on the shared tiny conditional GRF run: the MLflow store read
back through the client, the evaluation file against the logged numbers, bits/dim in
physical units against an independent log-determinant, the noise floor and the verdict
(printed, logged, and exit status 3 with verdict.fail_on_unfaithful), one-line errors."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from scidiff.cli.evaluate import main
from tests.training.conftest import run_cli

ENV = {"PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = ["split=val", "max_samples=3", "batch_size=3", "bound.estimator=importance", "bound.num_terms=4",
        "sampler.steps=5", "sampling.members=3", "progress=false", "metrics.wasserstein_bins=200"]


def run_evaluate(args: list[str], cwd: Path, data_dir: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    """``scidiff-evaluate args`` as a process of its own (forked from the tests' zygote: ``run_cli``)."""
    return run_cli("evaluate", args, cwd, data_dir, timeout, check=False, extra_env=ENV)


def test_evaluate_logs_to_the_training_run(trained_run, data_dir, tmp_path):
    """Run from another directory: the checkpoint's store (sqlite:///mlflow.db, relative to
    the training's directory) is found, and nothing is written where the command runs."""
    from mlflow.tracking import MlflowClient

    run_dir = trained_run / "outputs" / "quickstart" / "tiny"
    before = sorted(p.name for p in trained_run.iterdir())
    proc = run_evaluate([f"checkpoint={run_dir}", *TINY], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    line = lines[-1]
    out = run_dir / "eval" / "val"
    # the verdict table before the last line: a header, 10 metrics, the overall verdict
    assert lines[-2].startswith("verdict: faithful (10/10") or lines[-2].startswith("verdict: NOT faithful: ")
    assert lines[-14].startswith("noise floor: 3 real fields per sample from the 'all' pool (")
    assert lines[-13].split()[:4] == ["metric", "channel", "model", "floor"]
    assert [r.split()[0] for r in lines[-12:-2]] == ["spectral_error", "rank_deviation", "w1", "bias_rms", "std_ratio",
                                                     "spread_skill", "domain_mean_std_ratio", "crps", "energy_score",
                                                     "shell_correlation"]
    assert "spectral error (mean |ln P_samples/P_data| over shells) field" in line and "(floor " in line
    assert line.startswith("scidiff-evaluate val (3 samples) | bound ") and "bits/dim" in line
    assert f"file {(out / 'evaluation.nc').resolve()}" in line and "MLflow run" in line and "CRPS field" in line
    assert not (out / "error.log").exists()
    assert list(tmp_path.iterdir()) == []  # no run directory, no store, no log where the command ran
    assert sorted(p.name for p in trained_run.iterdir()) == before
    assert sorted(p.name for p in (trained_run / "outputs").iterdir()) == ["quickstart"]

    # the metrics are in the training run (the one the checkpoint names), at its step
    client = MlflowClient(tracking_uri=f"sqlite:///{trained_run / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_id in line
    logged = {k[len("eval/val/"):]: v for k, v in run.data.metrics.items() if k.startswith("eval/val/")}
    for key in ("bpd", "bpd_se", "bpd_model", "bpd_mc_se", "log_det_bpd", "crps/field", "spread_skill/field",
                "spectral_error/field", "energy_score", "w1/field", "bias_rms/field", "num_samples",
                "floor/crps/field", "floor/std_ratio/field", "floor/spectral_error/field", "floor/energy_score"):
        assert key in logged, key
    assert run.data.tags["verdict"] in ("faithful", "not faithful")
    assert run.data.tags["verdict"] == ("faithful" if lines[-2].startswith("verdict: faithful") else "not faithful")
    assert logged["num_samples"] == 3 and logged["crps/field"] > 0
    history = client.get_metric_history(run.info.run_id, "eval/val/bpd")
    assert [m.step for m in history] == [30]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "eval/val")}
    assert {f"eval/val/{n}" for n in ("samples.png", "power_spectra.png", "rank_histogram.png", "maps.png",
                                      "evaluation.nc", "verdict.json")} <= artifacts

    # the file holds the logged numbers (MLflow keeps float64)
    with xr.open_dataset(out / "evaluation.nc") as ds:
        in_file = dict(zip(ds["metric"].values.tolist(), ds["metric_value"].values.tolist()))
        assert ds.attrs["mlflow_run_id"] == run.info.run_id
        bpd, bpd_model = ds["bpd"].values, ds["bpd_model"].values
        index = ds["index"].values
    assert {k for k, v in in_file.items() if math.isfinite(v)} == set(logged)
    for key, value in logged.items():
        assert in_file[key] == pytest.approx(value, rel=1e-12), key

    # physical units: the quickstart normalises with the training split's mean and std
    # (zscore), so bits/dim in physical units = normalised + log2(std), per sample
    from scidiff.inference.checkpoint import load_pretrained

    pre = load_pretrained(run_dir)
    train = np.asarray(pre.split_indices["train"])
    field = xr.open_zarr(pre.config["data"]["path"])["field"].values  # the store the run was trained on
    shift = math.log2(field[train].astype(np.float64).std())  # population std, as the statistics
    np.testing.assert_allclose(bpd - bpd_model, shift, atol=1e-9)
    assert logged["bpd"] - logged["bpd_model"] == pytest.approx(shift, abs=1e-9)
    assert np.all(np.isin(index, pre.split_indices["val"]))


def test_bad_input_is_one_line_from_the_real_process(tmp_path, trained_run, data_dir):
    run_dir = trained_run / "outputs" / "quickstart" / "tiny"
    proc = run_evaluate([f"checkpoint={run_dir}", "bound.estimater=exact"], tmp_path, data_dir, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "bound.estimater" in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written (the corpus: tests/cli/test_bad_inputs.py)


def test_unfaithful_ensemble_exits_3_after_writing_everything(trained_run, data_dir, tmp_path, capsys, monkeypatch):
    """Members that are real fields scaled by 2 (std_ratio ~2): with verdict.fail_on_unfaithful
    the command names the failing metrics and exits 3, and the file, the figures and the
    MLflow metrics (with the floor and the verdict tag) are all written."""
    from mlflow.tracking import MlflowClient

    from scidiff.inference.checkpoint import load_pretrained

    run_dir = trained_run / "outputs" / "quickstart" / "tiny"
    pre = load_pretrained(run_dir)
    val = np.asarray(pre.split_indices["val"])[:4]
    field = xr.open_zarr(pre.config["data"]["path"])["field"].values.astype(np.float64)
    others = [(val + 1 + k) % field.shape[0] for k in range(3)]  # other real fields, three members
    members = 2.0 * np.stack([field[o] for o in others], axis=1)
    ens = tmp_path / "wide.zarr"
    xr.Dataset({"field": (("sample", "member", "y", "x"), members.astype(np.float32))},
               coords={"data_index": ("sample", val)}).to_zarr(ens)
    # a new run in its own experiment of the training's store (a fresh store costs ~10 s of migrations)
    uri = f"sqlite:///{trained_run / 'mlflow.db'}"
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # a new experiment's artifacts go to ./mlruns of where it is created
    with pytest.raises(SystemExit) as stop:  # in process: a subprocess would spend seconds importing
        main([f"checkpoint={run_dir}", f"ensemble={ens}", f"out={out}", "split=val", "bound.enabled=false",
              "progress=false", "metrics.wasserstein_bins=200", "verdict.fail_on_unfaithful=true",
              f"logger.tracking_uri={uri}", "logger.new_run=true", "logger.experiment_name=floor-verdict-test"])
    assert stop.value.code == 3, capsys.readouterr().err[-3000:]
    stdout = capsys.readouterr().out
    lines = stdout.strip().splitlines()
    assert lines[-2].startswith("verdict: NOT faithful: ") and "std_ratio/field" in lines[-2]
    assert any(r.split()[:2] == ["std_ratio", "field"] and " FAIL " in r for r in lines)
    assert lines[-1].startswith("scidiff-evaluate val (4 samples)") and "verdict NOT faithful" in lines[-1]
    assert {p.name for p in out.iterdir()} >= {"evaluation.nc", "power_spectra.png", "rank_histogram.png"}
    with xr.open_dataset(out / "evaluation.nc") as ds:
        assert ds.attrs["verdict"] == "not faithful"
        in_file = dict(zip(ds["metric"].values.tolist(), ds["metric_value"].values.tolist()))
    assert in_file["std_ratio/field"] == pytest.approx(2.0, rel=0.35)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(ds.attrs["mlflow_run_id"])
    assert run.data.tags["verdict"] == "not faithful"
    assert run.data.metrics["eval/val/floor/std_ratio/field"] == pytest.approx(in_file["floor/std_ratio/field"])
    assert run.data.metrics["eval/val/std_ratio/field"] == pytest.approx(in_file["std_ratio/field"])
    assert "eval/val/verdict.json" in {a.path for a in client.list_artifacts(run.info.run_id, "eval/val")}


def test_kill_9_then_rerun_gives_the_uninterrupted_result(trained_run, data_dir, tmp_path):
    """kill -9 at a random point of an evaluation, then the same command again: the same numbers
    as an uninterrupted run, no half-written file or hidden temporary, no MLflow run left RUNNING."""
    import random
    import signal
    import time

    from mlflow.tracking import MlflowClient

    run_dir = trained_run / "outputs" / "quickstart" / "tiny"
    args = [f"checkpoint={run_dir}", *TINY, "logger.new_run=true", "logger.experiment_name=eval-kill"]
    t0 = time.monotonic()
    ref = run_evaluate([*args, f"out={tmp_path / 'ref'}"], tmp_path, data_dir)
    assert ref.returncode == 0, ref.stderr[-2000:]
    duration = time.monotonic() - t0

    out = tmp_path / "cut"
    env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), **ENV}
    proc = subprocess.Popen([sys.executable, "-m", "scidiff.cli.evaluate", *args, f"out={out}"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(7).uniform(0.3, 0.8) * duration)   # import, load, bound, members or floor
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if (out / "evaluation.nc").exists():                          # too late to cut: it finished
        pytest.skip("the evaluation finished before the kill")
    again = run_evaluate([*args, f"out={out}"], tmp_path, data_dir)
    assert again.returncode == 0, again.stderr[-2000:]

    a, b = xr.open_dataset(tmp_path / "ref" / "evaluation.nc"), xr.open_dataset(out / "evaluation.nc")
    timing = np.array(["seconds" in str(m) for m in a["metric"].values])   # wall-clock costs differ
    for name in a.data_vars:
        x, y = a[name].values, b[name].values
        if "metric" in a[name].dims:
            x, y = x[~timing], y[~timing]
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert not [p.name for p in out.rglob(".*")]                 # no temporaries left behind
    client = MlflowClient(tracking_uri=f"sqlite:///{trained_run / 'mlflow.db'}")
    exp = client.get_experiment_by_name("eval-kill")
    statuses = sorted(r.info.status for r in client.search_runs([exp.experiment_id]))
    # the reference and the rerun FINISHED; the killed one (if it got as far as creating its run)
    # cannot end itself: it is the only other, and not counted as a result
    assert statuses.count("FINISHED") == 2 and len(statuses) <= 3


def test_a_bf16_evaluation_is_a_variant_of_its_own():
    """Evaluating with execution.precision=bf16 writes eval/<split>-bf16 and a new MLflow run, never the
    float32 evaluation's place (the same suffix rule as an adapter or a ControlNet scale)."""
    from types import SimpleNamespace

    from scidiff.cli.evaluate import variant_suffix
    from scidiff.inference.checkpoint import Pretrained
    from scidiff.nets.execution import Execution

    def identity(**kw):
        fields = {"adapter": {}, "control_scale": None, "execution": Execution(), **kw}
        return SimpleNamespace(model_identity=Pretrained.model_identity.fget(SimpleNamespace(**fields)))

    assert variant_suffix(identity()) == ""
    assert variant_suffix(identity(execution=Execution(precision="bf16"))) == "-bf16"
    assert variant_suffix(identity(execution=Execution(compile=True, channels_last=True))) == ""
    assert variant_suffix(identity(control_scale=0.5, execution=Execution(precision="bf16"))) == "-control0.5-bf16"
