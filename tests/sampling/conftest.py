"""The sampling tests share the training tests' fixtures: the tiny GRF store, the
scidiff-train runner and the recipe of the tiny conditional checkpoint (defined once,
in tests/training/conftest.py).

``trained_run`` is the training conftest's recipe, memoised in this module: pytest
makes one fixture per directory that re-exports a fixture, so a plain re-export here
and in tests/cli/test_sample_cli.py would train the same checkpoint twice per session.
Both import it from here and share one training run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.conftest import QUIET, TINY_CONDITIONAL, data_dir, run_train  # noqa: F401

_TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:  # noqa: F811
    """The tiny conditional (spectral_index, amplitude) quickstart run of
    tests/training/conftest.py, trained 30 steps once per session: the working
    directory (holding ``mlflow.db``) with the run under ``outputs/quickstart/tiny``."""
    if "cwd" not in _TRAINED:
        cwd = tmp_path_factory.mktemp("trained_for_sampling")
        run_train([*TINY_CONDITIONAL, "run_name=tiny"], cwd, data_dir)
        _TRAINED["cwd"] = cwd
    return _TRAINED["cwd"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tests share two CPU cores with other suites."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
