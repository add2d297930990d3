"""The zygote that forks the tests' CLI processes (``tests/forked.py``): a command cut by its
timeout is killed and raises as ``subprocess.run`` does, and the next command runs in step."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.forked import run_forked


def test_a_command_past_its_timeout_is_killed_and_the_next_one_runs(tmp_path, data_dir):
    env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
    with pytest.raises(subprocess.TimeoutExpired):
        run_forked("scidiff.cli.train", ["experiment=quickstart", "trainer.max_steps=1000000", "logger=none",
                             "trainer.enable_progress_bar=false"], tmp_path, env, timeout=3)
    done = run_forked("scidiff.cli.train", ["experiment=quickstart", "trainer.max_stepz=1"], tmp_path, env, timeout=60)
    assert done.returncode == 2 and "trainer.max_stepz: unknown config key" in done.stderr
