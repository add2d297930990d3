"""The sampling tests share the training tests' fixtures: the tiny GRF store and the
tiny conditional checkpoint ``trained_run`` (defined once, in tests/training/conftest.py)."""

import pytest
import torch

from tests.training.conftest import QUIET, data_dir, run_train, trained_run  # noqa: F401


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: the tests share two CPU cores with other suites."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
