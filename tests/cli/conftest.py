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
