"""scidiff-sample end to end, in subprocesses, with the tiny conditional checkpoint: the store a
user opens, 1 vs 2 ranks (gloo), kill -9 and restart, and one-line errors for bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

import scidiff
from tests.training.conftest import run_cli

SETS = "params.grid={spectral_index: [1.5, 3.0], amplitude: [1.0]}"
MEMBERS = 6
ARGS = ["checkpoint=outputs/quickstart/tiny", SETS, f"members={MEMBERS}", "sampler.steps=6", "sampler.eta=0.5",
        "guidance.scale=2.0", "seed=3", "progress=false", "micro_batch=4"]  # 3 micro-batches of 4
TOTAL = 2 * MEMBERS


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


def sample(args: list[str], cwd: Path, module: list[str] | None = None, timeout: float = 240,
           check: bool = True) -> subprocess.CompletedProcess:
    """scidiff-sample as a process (forked, ``run_cli``), or ``python <module> args`` (a launcher)."""
    if module is None:
        return run_cli("sample", args, cwd, timeout=timeout, check=check)
    cmd = [sys.executable, *module, *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def field(path: Path) -> np.ndarray:
    return xr.open_zarr(path)["field"].values


@pytest.fixture(scope="module")
def reference(trained_run, tmp_path_factory):
    """An uninterrupted single-process run (batch_size 4), logged to the checkpoint's MLflow run."""
    out = tmp_path_factory.mktemp("sample") / "reference.zarr"
    proc = sample([*ARGS, f"out={out}", "batch_size=4"], trained_run)
    return out, proc


def test_store_a_user_opens(reference, trained_run):
    out, proc = reference
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith(f"scidiff-sample: {out}") and f"written {TOTAL}, skipped 0" in line
    assert "members/s" in line
    ds = xr.open_zarr(out)
    assert ds["field"].dims == ("sample", "member", "y", "x") and ds["field"].shape == (2, MEMBERS, 16, 16)
    assert ds["field"].attrs["long_name"] == "Gaussian random field" and "units" in ds["field"].attrs
    assert ds["spectral_index"].dims == ("sample",) and ds["spectral_index"].values.tolist() == [1.5, 3.0]
    assert ds["amplitude"].values.tolist() == [1.0, 1.0]
    assert ds["seed"].dims == ("sample", "member") and len(np.unique(ds["seed"].values)) == TOTAL
    assert ds["x"].values.tolist() == list(range(16)) and ds.attrs["Conventions"] == "CF-1.10"
    assert set(ds.data_vars) == {"field"} and ds["field"].chunks[1] == (MEMBERS,)  # member: one chunk
    from scidiff.sampling.store import EnsembleStore

    assert EnsembleStore.open(out).done().all()
    ckpt = trained_run / "outputs" / "quickstart" / "tiny" / "checkpoints" / "last.ckpt"
    from scidiff.inference.checkpoint import file_sha256, load_pretrained

    assert ds.attrs["checkpoint_sha256"] == file_sha256(ckpt) and ds.attrs["scidiff_version"] == scidiff.__version__
    config = json.loads(ds.attrs["sample_config"])
    assert config["members"] == MEMBERS and config["guidance"] == {"scale": 2.0, "rescale": 0.0}
    assert config["sampler"]["name"] == "ddim" and config["params"]["grid"]["spectral_index"] == [1.5, 3.0]

    # physical units: the stored member is the checkpoint's denormalised sample of that seed
    from scidiff.inference import DDIM, GuidanceSpec, generate

    torch.set_num_threads(1)
    pre = load_pretrained(ckpt)
    x = generate(pre, torch.tensor([[3.0, 1.0]]), [int(ds["seed"][1, 4])],
                 sampler=DDIM(steps=6, eta=0.5), guidance=GuidanceSpec(scale=2.0))
    # generated alone here, in a micro-batch of the run there: equal to float32 rounding
    np.testing.assert_allclose(ds["field"].values[1, 4], x[0, 0].numpy(), rtol=1e-5, atol=1e-5)
    values = ds["field"].values
    assert np.isfinite(values).all() and 0.2 < values.std() < 5.0

    # recorded on the checkpoint's MLflow run
    from mlflow.tracking import MlflowClient

    run_id = json.loads((ckpt.parents[1] / "summary.json").read_text())["mlflow_run_id"]
    run = MlflowClient(tracking_uri=f"sqlite:///{trained_run / 'mlflow.db'}").get_run(run_id)
    assert run.data.tags[f"sample.{ds.attrs['identity_sha256'][:8]}.store"] == str(out)
    assert run.data.metrics["sample/members_written"] == TOTAL


def test_two_ranks_write_the_same_members(reference, trained_run, tmp_path):
    out = tmp_path / "two_ranks.zarr"
    proc = sample([*ARGS, f"out={out}", "batch_size=3", "mlflow.run=none"], trained_run,
                  module=["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          "-m", "scidiff.cli.sample"])
    assert f"written {TOTAL}, skipped 0" in proc.stdout and "(2 ranks, cpu)" in proc.stdout
    np.testing.assert_array_equal(field(out), field(reference[0]))


def test_kill_9_then_restart_finishes_without_recomputing(reference, trained_run, tmp_path):
    from scidiff.sampling.store import EnsembleStore

    out = tmp_path / "killed.zarr"
    args = [*ARGS, f"out={out}", "batch_size=1", "mlflow.run=none"]
    proc = subprocess.Popen([sys.executable, "-m", "scidiff.cli.sample", *args], cwd=trained_run, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "progress" / "done").exists() and EnsembleStore.open(out).done().sum() >= 2:
                break
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {proc.stderr.read()[-2000:]}"
    finished = int(EnsembleStore.open(out).done().sum())
    assert 2 <= finished < TOTAL
    again = sample(args, trained_run)
    assert f"written {TOTAL - finished}, skipped {finished}" in again.stdout
    np.testing.assert_array_equal(field(out), field(reference[0]))


def run_main(args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    from scidiff.cli.sample import main

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    torch.set_num_threads(1)
    code = 0
    try:
        main(args)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_inputs_are_one_line(reference, trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(trained_run)
    base = ["checkpoint=outputs/quickstart/tiny", "members=1", "sampler.steps=2", "progress=false",
            "mlflow.run=none"]
    cases = [
        (["params.grid={spectral_index: [2.0]}"], "parameter 'amplitude' is missing"),
        (["params.grid={spectral_index: [2.0], amplitude: [1.0], slope: [2.0]}"],
         "unknown parameter 'slope' (the checkpoint's parameters: spectral_index, amplitude)"),
        ([], "checkpoint is conditioned on spectral_index, amplitude"),
        # a grid outside the model's [0, T): known once the checkpoint is read
        ([SETS, "sampler.timesteps=[1000,10]"], "sampler.timesteps: timesteps must lie in [0, T) = [0, 1000)"),
    ]
    for extra, expected in cases:
        code, _, err = run_main([*base, *extra, f"out={tmp_path / 'x.zarr'}"], capsys, monkeypatch)
        assert code == 2 and err.count("\n") == 1 and expected in err, err
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    code, _, err = run_main([f"checkpoint={plain}", SETS, f"out={tmp_path / 'x.zarr'}"], capsys, monkeypatch)
    assert code == 2 and "plain.ckpt was not written by scidiff-train" in err and err.count("\n") == 1
    # the reference store holds 6 members: 1 member is another run; refused, untouched
    before = field(reference[0])
    code, _, err = run_main([*base, SETS, f"out={reference[0]}"], capsys, monkeypatch)
    assert code == 2 and "holds another run's ensemble (differs in: " in err and "members" in err
    assert "overwrite=true" in err and err.count("\n") == 1
    np.testing.assert_array_equal(field(reference[0]), before)
    assert not (tmp_path / "x.zarr").exists()


def test_unipc_members_are_written_with_their_sampler(trained_run, tmp_path, capsys, monkeypatch):
    """``sampler=unipc``: the store records UniPC and its order; a member is the Python API's."""
    from scidiff.inference import GuidanceSpec, UniPC, generate, load_pretrained

    monkeypatch.chdir(trained_run)
    out = tmp_path / "unipc.zarr"
    code, stdout, err = run_main(["checkpoint=outputs/quickstart/tiny", "members=2", "sampler=unipc",
                                  "sampler.steps=20", "progress=false", "mlflow.run=none", SETS, f"out={out}"],
                                 capsys, monkeypatch)
    assert code == 0 and "written 4, skipped 0" in stdout, err
    ds = xr.open_zarr(out)
    assert json.loads(ds.attrs["sample_config"])["sampler"] == {"name": "unipc", "order": 3, "steps": 20,
                                                                "spacing": "logsnr"}
    torch.set_num_threads(1)
    pre = load_pretrained(trained_run / "outputs" / "quickstart" / "tiny" / "checkpoints" / "last.ckpt")
    x = generate(pre, torch.tensor([[3.0, 1.0]]), [int(ds["seed"][1, 1])], sampler=UniPC(steps=20),
                 guidance=GuidanceSpec())
    np.testing.assert_allclose(ds["field"].values[1, 1], x[0, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_far_outside_the_range_warns_and_overwrite_replaces(trained_run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(trained_run)
    out = tmp_path / "far.zarr"
    args = ["checkpoint=outputs/quickstart/tiny", "members=1", "sampler.steps=2", "progress=false",
            "mlflow.run=none", "params.grid={spectral_index: [2.0], amplitude: [9.0]}", f"out={out}"]
    code, stdout, err = run_main(args, capsys, monkeypatch)
    assert code == 0 and "written 1, skipped 0" in stdout
    assert "warning: params: amplitude = 9 lies far outside the training range [0.5" in err
    code, stdout, _ = run_main([*args, "members=2", "overwrite=true"], capsys, monkeypatch)
    assert code == 0 and "written 2, skipped 0" in stdout and xr.open_zarr(out)["field"].shape[1] == 2


def test_bf16_members_stay_close_and_form_another_ensemble(reference, trained_run, tmp_path, capsys, monkeypatch):
    """``execution.precision=bf16``: the members are bf16 roundings of the float32 ones (same seeds), the
    store records the precision, and a float32 store is never resumed in bf16."""
    monkeypatch.chdir(trained_run)
    out = tmp_path / "bf16.zarr"
    code, stdout, err = run_main([*ARGS, f"out={out}", "batch_size=4", "mlflow.run=none",
                                  "execution.precision=bf16"], capsys, monkeypatch)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].endswith("(1 rank, cpu, bf16 autocast)")
    ref, fast = field(reference[0]), field(out)
    assert 0 < np.linalg.norm(fast - ref) / np.linalg.norm(ref) < 0.05
    assert '"precision": "bf16"' in json.dumps(xr.open_zarr(out).attrs)
    before = field(reference[0])
    code, _, err = run_main([*ARGS, f"out={reference[0]}", "mlflow.run=none", "execution.precision=bf16"],
                            capsys, monkeypatch)
    assert code == 2 and "holds another run's ensemble (differs in: " in err and "precision" in err, err
    np.testing.assert_array_equal(field(reference[0]), before)
    code, _, err = run_main([*ARGS, f"out={tmp_path / 'y.zarr'}", "execution.precision=fp8"], capsys, monkeypatch)
    assert code == 2 and "execution.precision: expected 32 or bf16, got 'fp8'" in err and err.count("\n") == 1
