"""Helpers of the training-stack tests: subprocess runs of scidiff-train and the overrides
they share (the session fixtures ``data_dir`` and ``trained_run`` are in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# What every test run overrides: no figures, no progress bar, small validation.
QUIET = ["callbacks.samples=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


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
