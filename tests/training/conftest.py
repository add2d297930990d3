"""Shared fixtures: one tiny GRF store per session, subprocess runs of scidiff-train."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# What every test run overrides: no figures, no progress bar, small validation.
QUIET = ["callbacks.samples=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """SCIDIFF_DATA_DIR with the tiny GRF store the quickstart uses."""
    d = tmp_path_factory.mktemp("data")
    from scidiff_datasets.cli import main as make_dataset

    assert make_dataset(["grf", "--out", str(d / "grf_tiny.zarr"), "--size", "tiny", "--seed", "0", "-q"]) in (0, None)
    return d


def run_train(args: list[str], cwd: Path, data_dir: Path, timeout: float = 240, check: bool = True,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "scidiff.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scidiff-train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


TINY_CONDITIONAL = [
    "experiment=quickstart", "data.params=[{name: spectral_index, transform: zscore}, {name: amplitude, transform: log}]",
    "module.cond_dropout=0.2", "trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.log_every_n_steps=5",
    "callbacks.periodic_checkpoint.every_n_train_steps=15", *QUIET,
]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A tiny conditional (spectral_index, amplitude) quickstart run, trained 30 steps once
    per session: the working directory (holding ``mlflow.db``) with the run under
    ``outputs/quickstart/tiny``. For the sampling and evaluation tests."""
    cwd = tmp_path_factory.mktemp("trained")
    run_train([*TINY_CONDITIONAL, "run_name=tiny"], cwd, data_dir)
    return cwd
