"""``scidiff-train -m``: Hydra sweeps, run here one job after another and on SLURM through the
``hydra/launcher=slurm`` preset (hydra-submitit-launcher), against a stand-in ``sbatch`` that runs
the job array's tasks on this machine with a one-task SLURM environment."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.training.conftest import QUIET, run_cli, run_train

# Without the cluster extra, the preset is refused with the extra's name: tests/packaging/test_core_install.py.

TWO_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2",
             "trainer.limit_val_batches=1", "callbacks.periodic_checkpoint.every_n_train_steps=2", *QUIET]


def files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_a_sweep_trains_a_run_per_job_resumes_them_and_evaluates_them_side_by_side(tmp_path, data_dir):
    """seed=0,1: runs outputs/multirun/<run_name>/0 and /1, each with its seed, its checkpoint and its
    own MLflow run (named with the job's number, tagged with the sweep); the same sweep again is
    refused before anything starts (job 0 named), and with resume=auto both runs continue.
    scidiff-evaluate on the sweep's directory evaluates both runs into their own directories and
    MLflow runs, prints them side by side and writes every scalar of both to one CSV; again, it is
    refused before evaluating anything; scidiff-sample, given the sweep, names one of its runs."""
    import csv

    import xarray as xr
    from mlflow.tracking import MlflowClient

    args = ["-m", "experiment=quickstart", *TWO_STEPS, "seed=0,1", "run_name=seeds"]
    proc = run_train(args, tmp_path, data_dir)
    sweep = tmp_path / "outputs/multirun/seeds"
    assert "sweep of 2 runs, every config checked: run i in outputs/multirun/seeds/i" in proc.stdout
    for job in (0, 1):
        run = sweep / str(job)
        assert (run / "checkpoints/last.ckpt").is_file()
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == job
        assert json.loads((run / "summary.json").read_text())["global_step"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert sorted((r.info.run_name, r.info.status, r.data.tags["scidiff.sweep_job"], r.data.tags["scidiff.sweep"])
                  for r in runs) == [(f"quickstart/seeds/{job}", "FINISHED", str(job), str(sweep.resolve()))
                                     for job in (0, 1)]

    before = files(tmp_path)
    again = run_train(args, tmp_path, data_dir, check=False)
    lines = again.stderr.strip().splitlines()
    assert again.returncode == 2 and len(lines) == 1, again.stderr
    assert lines[0].startswith("error: run_name:") and lines[0].endswith("(sweep job 0: seed=0)"), lines
    assert "resume=auto continues it" in lines[0]
    assert files(tmp_path) == before

    run_train([*args, "resume=auto", "trainer.max_steps=4"], tmp_path, data_dir)
    assert [json.loads((sweep / f"{job}/summary.json").read_text())["global_step"] for job in (0, 1)] == [4, 4]
    assert len(client.search_runs([runs[0].info.experiment_id])) == 2   # the same two MLflow runs, continued

    evaluate = [f"checkpoint={sweep}", "split=val", "max_samples=3", "sampling.members=2", "sampler=ddim",
                "sampler.steps=3", "progress=false", "bound.estimator=importance", "bound.num_terms=4"]
    proc = run_cli("evaluate", evaluate, tmp_path, data_dir)
    table = proc.stdout[proc.stdout.index("\nrun "):].splitlines()
    assert table[1].split()[:2] == ["run", "verdict"] and "spectral_error/field (floor)" in table[1]
    assert [line.split()[:2] for line in table[2:4]] == [["0", "seed=0"], ["1", "seed=1"]]
    with open(sweep / "evaluation_val.csv") as f:
        rows = list(csv.DictReader(f))
    for job, row in enumerate(rows):
        assert (row["run"], row["seed"]) == (str(job), str(job))
        ev = xr.open_dataset(sweep / f"{job}/eval/val/evaluation.nc")
        scalars = dict(zip(ev["metric"].values.tolist(), ev["metric_value"].values.tolist()))
        assert float(row["bpd"]) == scalars["bpd"] and float(row["crps/field"]) == scalars["crps/field"]
        logged = client.get_run(json.loads((sweep / f"{job}/summary.json").read_text())["mlflow_run_id"])
        assert logged.data.metrics["eval/val/bpd"] == scalars["bpd"]
    assert len(rows) == 2

    before = files(tmp_path)
    for extra in ([], ["out=elsewhere"]):
        again = run_cli("evaluate", [*evaluate, *extra], tmp_path, data_dir, check=False)
        assert again.returncode == 2 and again.stderr.startswith("error: out: "), again.stderr
    # a command that takes one run names one of the sweep's
    sample = run_cli("sample", [f"checkpoint={sweep}", "members=2", "out=ens.zarr",
                                "params.list=[{spectral_index: 2.25, amplitude: 1.0}]"], tmp_path, data_dir,
                     check=False)
    assert sample.returncode == 2 and sample.stderr.strip() == (
        f"error: checkpoint: {sweep} is a sweep (scidiff-train -m), not a run: give one of its runs, e.g. "
        f"{sweep / '0'} (scidiff-evaluate takes the sweep itself and compares its runs)")
    assert files(tmp_path) == before


@pytest.mark.parametrize("args, expected", [
    # the second job's value is wrong: refused before the first job starts
    (["experiment=quickstart", "seed=0,1", "denoiser.model_channels=16,abc"],
     "error: denoiser.model_channels: expected int, got str 'abc' "
     "(sweep job 1: seed=0 denoiser.model_channels=abc)"),
    # an override that the sweep's own config (composed without the swept experiment) does not have
    (["experiment=quickstart,quickstart_1d", "generate_data.size=tiny"],
     "error: generate_data.size: unknown config key"),
    (["experiment=quickstart", "seed=interval(0,1)"],
     "error: seed: seed=interval(0,1) is not a sweep Hydra's basic sweeper runs"),
], ids=["bad-value", "unswept-key", "interval"])
def test_a_bad_job_refuses_the_sweep_before_anything_starts(args, expected, tmp_path, data_dir):
    proc = run_train(["-m", *TWO_STEPS, *args], tmp_path, data_dir, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(expected), proc.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "mlflow.db").exists()


def test_a_failing_job_leaves_the_others_running_and_the_sweep_fails(tmp_path, data_dir):
    """Job 0 fails as it starts (a negative max_steps, which Lightning refuses); job 1 trains; the sweep
    ends with status 1 and names the failed run."""
    proc = run_train(["-m", "experiment=quickstart", *TWO_STEPS, "trainer.max_steps=-7,2", "run_name=mixed",
                      "logger=none"], tmp_path, data_dir, check=False)
    sweep = tmp_path / "outputs/multirun/mixed"
    assert proc.returncode == 1, proc.stderr
    assert "max_steps" in proc.stderr and f"{sweep / '0'}: exit status 1" in proc.stderr
    assert (sweep / "0/error.log").is_file() and not (sweep / "0/checkpoints").exists()
    assert (sweep / "1/checkpoints/last.ckpt").is_file()


STAND_IN_SBATCH = r'''#!PYTHON
"""sbatch on one machine: records the script, answers with a job id, and (once it has answered, as
a scheduler would) runs the array's tasks side by side, each as a one-task SLURM job."""
import os, re, subprocess, sys, time

script = sys.argv[-1]
text = open(script).read()
with open(os.environ["STAND_IN_SCRIPTS"], "a") as log:
    log.write(text + "\n")
array = re.search(r"^#SBATCH --array=0-(\d+)", text, re.M)
job = "4242"
if os.fork() == 0:
    os.setsid()
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    time.sleep(1)
    tasks = []
    for task in range(int(array.group(1)) + 1):
        env = dict(os.environ, SLURM_JOB_ID=f"{job}{task}", SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=str(task),
                   SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_NTASKS="1",
                   SLURM_NTASKS_PER_NODE="1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost",
                   SLURM_JOB_NAME="scidiff-train")
        tasks.append(subprocess.Popen(["bash", script], env=env))
    for t in tasks:
        t.wait()
    os._exit(0)
print(f"Submitted batch job {job}")
'''
STAND_IN_SRUN = r'''#!PYTHON
"""srun inside the stand-in's job: runs the command once (one task), in the foreground."""
import os, sys

args = sys.argv[1:]
while args[0].startswith("-"):
    if args.pop(0) in ("--output", "--error"):
        args.pop(0)
os.execvp(args[0], args)
'''


@pytest.fixture
def stand_in_slurm(tmp_path) -> dict[str, str]:
    """The environment of a machine whose ``sbatch``, ``srun`` (and ``sacct``, ``scancel``, answering
    nothing) are the stand-ins; the submitted scripts are appended to ``STAND_IN_SCRIPTS``."""
    import os

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("sbatch", STAND_IN_SBATCH), ("srun", STAND_IN_SRUN), ("sacct", ""), ("scancel", "")):
        path = bin_dir / name
        path.write_text(text.replace("PYTHON", sys.executable) if text else "#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "STAND_IN_SCRIPTS": str(tmp_path / "scripts.txt")}


def test_the_slurm_preset_submits_a_job_array_whose_tasks_train_the_runs(tmp_path, data_dir, stand_in_slurm):
    """hydra/launcher=slurm: one sbatch of a two-task array (one task per device and node of the trainer,
    the job's name, submitit's signal before the time limit), whose tasks train runs 0 and 1 in the sweep's
    directory; the sweep waits for them and ends with status 0."""
    work = tmp_path / "work"
    work.mkdir()
    proc = run_train(["-m", "hydra/launcher=slurm", "hydra.launcher.gpus_per_node=null", "experiment=quickstart",
                      *TWO_STEPS, "seed=0,1",
                      "run_name=slurm", "logger=none"], work, data_dir, timeout=300, extra_env=stand_in_slurm)
    assert "sweep of 2 runs" in proc.stdout
    script = Path(stand_in_slurm["STAND_IN_SCRIPTS"]).read_text()
    assert script.count("#!/bin/bash") == 1   # one submission: the array
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --job-name=scidiff-train", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --cpus-per-task=8", "#SBATCH --time=1440",
                 "#SBATCH --signal=USR2@90"):
        assert line in script.splitlines(), (line, script)
    assert "--gpus-per-node" not in script and "srun " in script
    sweep = work / "outputs/multirun/slurm"
    for job in (0, 1):
        assert json.loads((sweep / f"{job}/summary.json").read_text())["global_step"] == 2
        assert yaml.safe_load((sweep / f"{job}/.hydra/config.yaml").read_text())["seed"] == job
    assert sorted(p.name for p in (sweep / ".submitit").iterdir() if p.is_dir()) == ["4242", "4242_0", "4242_1"]


def test_a_run_started_without_the_commands_check_still_refuses_to_overwrite_another(tmp_path):
    """What a launcher starts on another node (a SLURM task, one requeued after its time limit) runs
    the training without scidiff-train's check of the command line: the training itself refuses a
    run directory that holds checkpoints unless resume is set, before it writes anything."""
    from omegaconf import open_dict

    from scidiff.cli.errors import ConfigError
    from scidiff.cli.train import compose_config, train

    run = tmp_path / "outputs/multirun/requeued/0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints/step0000002.ckpt").write_bytes(b"a checkpoint")
    cfg = compose_config(["experiment=quickstart", f"generate_data.path={tmp_path / 'absent.zarr'}"])
    with open_dict(cfg):
        cfg.run_dir = str(run)
    before = files(tmp_path)
    with pytest.raises(ConfigError, match=r"^run_name: .* already holds a run's checkpoints; resume=auto continues it"):
        train(cfg)
    assert files(tmp_path) == before   # no data generated, nothing written


@pytest.mark.parametrize("trainer, expected", [
    (["trainer=gpu"], {"nodes": 1, "tasks_per_node": 1, "gpus_per_node": 1}),
    (["trainer=ddp_multinode", "trainer.devices=4", "trainer.num_nodes=3"],
     {"nodes": 3, "tasks_per_node": 4, "gpus_per_node": 4}),
])
def test_the_slurm_preset_asks_for_the_trainers_nodes_and_devices(trainer, expected):
    from scidiff.cli.train import compose_config

    launcher = compose_config(["hydra/launcher=slurm", *trainer]).hydra.launcher
    assert {k: launcher[k] for k in expected} == expected
    assert launcher.submitit_folder.endswith("/.submitit/%j") and launcher.name == "scidiff-train"
