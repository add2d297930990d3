"""Tiny stores made once per test session: through the command's entry point in a process of its
own (what a user runs), plus a second copy of each made in-process for the determinism test."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.forked import run_forked

GENERATOR_ARGS = {
    "grf": ["--dims", "2"],
    "climate": [],
    "voxels": [],
}


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``scidiff-make-dataset *args`` as a process (forked from the tests' zygote, ``tests/forked.py``)."""
    proc = run_forked("scidiff_datasets.cli", list(args), Path.cwd(), {**os.environ, "PYTHONWARNINGS": "ignore"},
                      timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"scidiff-make-dataset {' '.join(args)} failed:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """generator name -> path of a tiny store made by the CLI with --seed 3."""
    root = tmp_path_factory.mktemp("tiny")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            out = root / f"{name}.zarr"
            run_cli(name, "--out", str(out), "--size", "tiny", "--seed", "3", "-q", *GENERATOR_ARGS[name])
            made[name] = out
        return made[name]

    return get
