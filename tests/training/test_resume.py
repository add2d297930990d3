"""Exact resume: kill -9 mid-run, resume=auto, final weights bitwise equal to an
uninterrupted run with the same seed, and the same MLflow run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import torch

from tests.training.conftest import QUIET, Command, run_commands

ARGS = ["experiment=quickstart", "trainer.max_steps=24", "trainer.val_check_interval=10",
        "callbacks.periodic_checkpoint.every_n_train_steps=3", *QUIET]


def test_kill_and_resume_is_bitwise_exact(tmp_path, data_dir):
    env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, "-m", "scidiff.cli.train", *ARGS, "run_name=cut"], cwd=tmp_path,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "outputs" / "quickstart" / "cut" / "checkpoints"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any(ckpts.glob("step00000[01]*.ckpt")):       # a checkpoint of step 6..19 exists
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    from scidiff.training import newest_checkpoint

    killed_at = torch.load(newest_checkpoint(ckpts), weights_only=True)["global_step"]
    assert 3 <= killed_at < 24

    # the resumed session in a new process, then (in the same process) the uninterrupted reference run
    out, _ = run_commands([Command("train", [*ARGS, "run_name=cut", "resume=auto"], tmp_path),
                           Command("train", [*ARGS, "run_name=full"], tmp_path)], data_dir)
    assert f"scidiff-train: steps {killed_at} -> 24 ({24 - killed_at} in this session)" in out.stdout
    log = (tmp_path / "outputs/quickstart/cut/train.log").read_text()   # both sessions' output
    assert log.count("scidiff-train: run ") == 2 and log.endswith(out.stdout)

    full = torch.load(tmp_path / "outputs/quickstart/full/checkpoints/last.ckpt", weights_only=True)
    cut = torch.load(ckpts / "last.ckpt", weights_only=True)
    assert full["global_step"] == cut["global_step"] == 24
    assert full["state_dict"].keys() == cut["state_dict"].keys()
    for k, v in full["state_dict"].items():             # model and EMA weights, bitwise
        assert torch.equal(v, cut["state_dict"][k]), k
    for a, b in zip(full["optimizer_states"][0]["state"].values(), cut["optimizer_states"][0]["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert full["lr_schedulers"][0]["last_epoch"] == cut["lr_schedulers"][0]["last_epoch"] == 24

    # the resumed run logged into the MLflow run it started in
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 2                                  # "full" and "cut", nothing else
    run_id = cut["scidiff"]["mlflow_run_id"]
    assert run_id in {r.info.run_id for r in runs} and run_id != full["scidiff"]["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "FINISHED"   # the killed session left it RUNNING
    steps = [m.step for m in client.get_metric_history(run_id, "val/loss")]
    assert max(steps) >= 19                                # validation after the resume went there
