"""The CLI tests share the training tests' fixtures: one tiny GRF store per session and
subprocess runs of scidiff-train (defined once, in tests/training/conftest.py)."""

from tests.training.conftest import QUIET, data_dir, run_train, trained_run  # noqa: F401
