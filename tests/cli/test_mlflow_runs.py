"""The MLflow runs of the commands: how they end, the model registry, which store they log to.

* a command that fails ends the runs it opened ``FAILED`` (an exception) or ``KILLED``
  (``SIGTERM``, Ctrl-C), never leaving them ``RUNNING``; a resumed run is ``RUNNING`` again
  and ends ``FINISHED`` or ``FAILED`` like a new one; ``kill -9`` leaves it ``RUNNING`` until
  a resume (``scidiff.inference.tracking``, ``scidiff.cli.runner.ending_runs``);
* ``register_model=<name>`` registers the final checkpoint, and ``models:/<name>/<version>``
  is a checkpoint wherever one is accepted;
* a command run from another directory logs to the checkpoint's store, not to one there.

The training runs are subprocesses, as a user runs them (signals included); the rest runs
in process on the session's tiny conditional run (``trained_run``).
"""

from __future__ import annotations

import json
import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.training.conftest import QUIET, run_train

ROOT = Path(__file__).resolve().parents[2]
SETS = "params.grid={spectral_index: [1.5, 3.0], amplitude: [1.0]}"
TINY = ["experiment=quickstart", "data.params=[{name: spectral_index, transform: zscore}, {name: amplitude, "
        "transform: log}]", "trainer.max_steps=6", "trainer.val_check_interval=6",
        "callbacks.periodic_checkpoint.every_n_train_steps=2", *QUIET]
ENV = {"PYTHONPATH": str(ROOT)}  # the failing callback lives in tests/training/failing.py


def fail(step: int, how: str, record: Path | None = None) -> str:
    extra = "" if record is None else f", record: '{record}'"
    return f"+callbacks.fail={{_target_: tests.training.failing.FailAt, step: {step}, how: {how}{extra}}}"


def runs(cwd: Path, experiment: str = "quickstart") -> dict[str, object]:
    """The runs of ``experiment`` in ``<cwd>/mlflow.db`` by run name."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{cwd / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_name: r for r in client.search_runs([exp.experiment_id])} if exp else {}


def error_lines(proc) -> list[str]:
    return [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]


# ----------------------------------------------------------------------------- how runs end
def test_a_failing_command_ends_the_runs_it_owns(tmp_path, capsys, monkeypatch):
    """``guarded`` (every command's error handling): an exception ends the owned runs FAILED and
    exits 1; an interrupt ends them KILLED, says so in one line and exits 130; a success
    leaves them as their owner ended them; runs not owned (a training run a sampling is
    recorded on) keep their status."""
    from mlflow.tracking import MlflowClient

    from scidiff.cli.runner import guarded
    from scidiff.inference.tracking import own_run, owned_runs

    monkeypatch.delenv("SCIDIFF_TRACEBACK", raising=False)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("owned", artifact_location=(tmp_path / "mlruns").as_uri())
    other = client.create_run(exp).info.run_id  # someone else's run: never touched

    def work(error: BaseException | None):
        def run():
            run_id = client.create_run(exp).info.run_id
            own_run(uri, run_id)
            ids.append(run_id)
            if error is not None:
                raise error
            client.set_terminated(run_id)  # the owner ends it
        return run

    ids: list[str] = []
    for error, status, code in ((RuntimeError("boom"), "FAILED", 1), (KeyboardInterrupt(), "KILLED", 130),
                                (None, "FINISHED", None)):
        try:
            guarded(work(error))
            exit_code = None
        except SystemExit as exc:
            exit_code = exc.code
        err = capsys.readouterr().err
        assert exit_code == code and client.get_run(ids[-1]).info.status == status, err
        assert owned_runs() == []
        if isinstance(error, KeyboardInterrupt):
            assert err == f"error: stopped by SIGINT; MLflow run {ids[-1]} ended KILLED\n"
    assert client.get_run(other).info.status == "RUNNING"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # given back


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize(("how", "step", "status"), [("SIGTERM", 3, 143), ("SIGTERM", -1, 143), ("SIGINT", 3, 130)],
                         ids=["sigterm-in-fit", "sigterm-in-setup", "sigint-in-fit"])
def test_an_interrupted_training_ends_its_run_killed(how, step, status, tmp_path, data_dir):
    """SIGTERM (what SLURM sends before it kills a job) and Ctrl-C: in fit (Lightning stops at
    the step's end) and before Lightning handles signals (setup, where the run exists already):
    the run ends KILLED, the exit status is 128 + the signal, one line says so."""
    proc = run_train([*TINY, "run_name=sig", fail(step, how)], tmp_path, data_dir, check=False, extra_env=ENV)
    assert proc.returncode == status, proc.stderr[-3000:]
    run = runs(tmp_path)["quickstart/sig"]
    assert run.info.status == "KILLED"
    assert error_lines(proc) == [f"error: stopped by {how}; MLflow run {run.info.run_id} ended KILLED"]


def test_failed_resumed_and_killed_runs_end_as_they_should_and_register(tmp_path, data_dir):
    """One run through every ending: an exception (FAILED); resumed it is RUNNING again, and
    ``kill -9`` leaves it RUNNING (nothing can catch it); resumed and failing, FAILED again;
    resumed to the end, FINISHED, with its final checkpoint registered in the model registry."""
    args = [*TINY, "run_name=life"]
    first = run_train([*args, fail(3, "raise")], tmp_path, data_dir, check=False, extra_env=ENV)
    assert first.returncode == 1 and "injected failure at step 3" in first.stderr
    run_id = runs(tmp_path)["quickstart/life"].info.run_id
    assert runs(tmp_path)["quickstart/life"].info.status == "FAILED"

    seen = tmp_path / "status_while_resumed.txt"
    killed = run_train([*args, "resume=auto", fail(5, "SIGKILL", seen)], tmp_path, data_dir, check=False,
                       extra_env=ENV)
    assert killed.returncode == -signal.SIGKILL
    assert seen.read_text() == "RUNNING"  # the resume reopened the FAILED run
    assert runs(tmp_path)["quickstart/life"].info.status == "RUNNING"  # kill -9: nobody could end it

    again = run_train([*args, "resume=auto", fail(5, "raise")], tmp_path, data_dir, check=False, extra_env=ENV)
    assert again.returncode == 1
    assert runs(tmp_path)["quickstart/life"].info.status == "FAILED"

    done = run_train([*args, "resume=auto", "register_model=life-model"], tmp_path, data_dir, extra_env=ENV)
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith("scidiff-train: steps 4 -> 6") and line.endswith("| registered life-model v1")
    final = runs(tmp_path)
    assert list(final) == ["quickstart/life"] and final["quickstart/life"].info.run_id == run_id
    assert final["quickstart/life"].info.status == "FINISHED"

    from mlflow.tracking import MlflowClient

    from scidiff.inference.checkpoint import file_sha256

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    version = client.get_model_version("life-model", "1")
    last = tmp_path / "outputs" / "quickstart" / "life" / "checkpoints" / "last.ckpt"
    assert version.source == f"runs:/{run_id}/checkpoints/last.ckpt" and version.run_id == run_id
    assert version.tags["scidiff.checkpoint_sha256"] == file_sha256(last)
    assert version.tags["scidiff.global_step"] == "6"
    summary = json.loads((last.parents[1] / "summary.json").read_text())
    assert summary["registered_model"] == {"name": "life-model", "version": 1, "uri": "models:/life-model/1"}


@pytest.mark.parametrize(("override", "expected"), [
    ("logger=none", "register_model: grf: the model registry is MLflow's; needs logger=mlflow (got logger=none)"),
    ("register_model=a/b", "register_model: expected a model name (no '/' or '@'), got 'a/b'"),
    ("callbacks.periodic_checkpoint.save_last=false", "register_model: grf: no checkpoint callback writes last.ckpt"),
])
def test_register_model_is_checked_before_anything_runs(override, expected, tmp_path, data_dir, monkeypatch):
    """What scidiff-train checks before it starts (exit 2 with the message as one line)."""
    from scidiff.cli.errors import ConfigError
    from scidiff.cli.train import precheck

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    with pytest.raises(ConfigError) as err:
        precheck(["experiment=quickstart", "register_model=grf", override])
    assert str(err.value).startswith(expected)


# ----------------------------------------------------------------------------- models:/ checkpoints
def run_main(module: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """A command's ``main`` in process: (exit status, stdout, stderr)."""
    import importlib

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    torch.set_num_threads(1)
    code = 0
    try:
        importlib.import_module(f"scidiff.cli.{module}").main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def registered(trained_run) -> str:
    """The session's tiny run registered as ``tiny-model`` v1 (what ``register_model=tiny-model``
    does at the end of a training, on the finished run), and aliased ``best``."""
    from mlflow.tracking import MlflowClient

    from scidiff.inference.tracking import register_checkpoint

    uri = f"sqlite:///{trained_run / 'mlflow.db'}"
    run_id = json.loads((trained_run / "outputs/quickstart/tiny/summary.json").read_text())["mlflow_run_id"]
    assert register_checkpoint(uri, run_id, "checkpoints/last.ckpt", "tiny-model") == 1
    MlflowClient(tracking_uri=uri).set_registered_model_alias("tiny-model", "best", "1")
    return uri


@pytest.mark.parametrize("ref", ["models:/tiny-model/1", "models:/tiny-model/latest", "models:/tiny-model@best"])
def test_a_registered_model_samples_as_its_checkpoint(ref, registered, trained_run, tmp_path, capsys, monkeypatch):
    """scidiff-sample checkpoint=models:/... writes the same store (same members, same identity)
    as the checkpoint file the version was registered from."""
    monkeypatch.chdir(tmp_path)
    base = [SETS, "members=2", "sampler.steps=3", "progress=false", "mlflow.run=none"]
    ckpt = trained_run / "outputs" / "quickstart" / "tiny" / "checkpoints" / "last.ckpt"
    code, _, err = run_main("sample", [f"checkpoint={ckpt}", *base, "out=by_path.zarr"], capsys, monkeypatch)
    assert code in (0, None), err
    code, out, err = run_main("sample", [f"checkpoint={ref}", f"tracking_uri={registered}", *base,
                                         "out=by_model.zarr"], capsys, monkeypatch)
    assert code in (0, None), err
    assert "written 4, skipped 0" in out
    by_path, by_model = xr.open_zarr(tmp_path / "by_path.zarr"), xr.open_zarr(tmp_path / "by_model.zarr")
    assert by_model.attrs["identity_sha256"] == by_path.attrs["identity_sha256"]
    assert by_model.attrs["checkpoint_sha256"] == by_path.attrs["checkpoint_sha256"]
    np.testing.assert_array_equal(by_model["field"].values, by_path["field"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["by_model.zarr", "by_path.zarr"]


@pytest.mark.parametrize(("ref", "expected"), [
    ("models:/no-such-model/1", "checkpoint: models:/no-such-model/1: no registered model 'no-such-model' in "),
    ("models:/tiny-model/7", "checkpoint: models:/tiny-model/7: registered model 'tiny-model' has no version 7 in "),
    ("models:/tiny-model@nope", "checkpoint: models:/tiny-model@nope: registered model 'tiny-model' has no alias "),
    ("models:/tiny-model", "checkpoint: models:/tiny-model: expected models:/<name>/<version>"),
])
@pytest.mark.parametrize("command", ["sample", "evaluate", "invert"])
def test_a_missing_registered_model_is_one_line_exit_2(command, ref, expected, registered, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = {"sample": [SETS, "out=x.zarr"], "evaluate": ["out=ev"], "invert": [f"input={tmp_path}", "out=x.zarr"]}
    code, _, err = run_main(command, [f"checkpoint={ref}", f"tracking_uri={registered}", *args[command]]
                            if command != "evaluate" else [f"checkpoint={ref}", f"logger.tracking_uri={registered}",
                                                            *args[command]], capsys, monkeypatch)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: " + expected), err
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- sampling and evaluation runs
def test_sampling_from_elsewhere_logs_to_the_checkpoints_store(trained_run, tmp_path, capsys, monkeypatch):
    """Run from another directory with the checkpoint's absolute path: the sampling is recorded
    on the training run in the training's mlflow.db (found from the checkpoint's place in its
    run directory), and no store appears where the command ran."""
    monkeypatch.chdir(tmp_path)
    run_dir = trained_run / "outputs" / "quickstart" / "tiny"
    code, out, err = run_main("sample", [f"checkpoint={run_dir}", SETS, "members=1", "sampler.steps=2",
                                         "progress=false", "out=elsewhere.zarr"], capsys, monkeypatch)
    assert code in (0, None), err
    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    assert f"logged to MLflow run {run_id}" in out
    run = runs(trained_run)["quickstart/tiny"]
    identity = xr.open_zarr(tmp_path / "elsewhere.zarr").attrs["identity_sha256"]
    assert run.data.tags[f"sample.{identity[:8]}.store"] == str(tmp_path / "elsewhere.zarr")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.zarr"]  # no mlflow.db, no mlruns


def test_a_new_sampling_run_that_fails_to_log_ends_failed(trained_run, tmp_path, capsys, monkeypatch):
    """mlflow.run=new: a store failing while the run is written ends it FAILED (not RUNNING);
    the ensemble itself is kept, and the line says the logging failed."""
    from mlflow.tracking import MlflowClient

    def broken(self, run_id, key, value, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(MlflowClient, "log_metric", broken)
    run_dir = trained_run / "outputs" / "quickstart" / "tiny"
    code, out, err = run_main("sample", [f"checkpoint={run_dir}", SETS, "members=1", "sampler.steps=2",
                                         "progress=false", "out=new.zarr", "mlflow.run=new",
                                         "mlflow.experiment_name=sample-fails"], capsys, monkeypatch)
    assert code in (0, None), err
    assert "MLflow logging failed (OSError: disk full)" in out
    (run,) = runs(trained_run, "sample-fails").values()
    assert run.info.status == "FAILED"


def test_an_evaluation_failing_after_its_new_run_started_ends_it_failed(trained_run, data_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """logger.new_run=true: the evaluation's own run is created, then writing the evaluation
    file fails: the command exits 1 and its run is FAILED, not RUNNING or FINISHED."""
    import scidiff.evaluation.report as report

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    monkeypatch.setattr(report, "write_evaluation_file", broken)
    run_dir = trained_run / "outputs" / "quickstart" / "tiny"
    code, _, err = run_main("evaluate", [f"checkpoint={run_dir}", "split=val", "max_samples=2", "batch_size=2",
                                         "bound.estimator=importance", "bound.num_terms=2", "sampling.enabled=false",
                                         "progress=false", f"out={tmp_path / 'ev'}", "logger.new_run=true",
                                         "logger.experiment_name=evaluation-fails"], capsys, monkeypatch)
    assert code == 1 and "disk full" in err
    (run,) = runs(trained_run, "evaluation-fails").values()
    assert run.info.status == "FAILED"
