"""Suite-wide settings and the session fixtures shared across test directories.

One OpenMP/torch thread per test process, inherited by the CLI subprocesses the tests
start: CI runs ``pytest -n 2`` on two cores, and two threads per process there
oversubscribe the cores; OpenMP's spin-waiting then makes a step 5-10x slower (measured:
a tiny UNet's forward + backward took 0.8 s with one thread and 7 s with two on a loaded
two-core machine). Set ``OMP_NUM_THREADS`` yourself to override.

Fixtures are defined here once (not re-exported per directory, which would make pytest
build them once per directory): ``data_dir`` (the quickstart's and the tiny GRF stores) and ``trained_run``
(a tiny conditional checkpoint for the sampling, evaluation and inversion tests).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """SCIDIFF_DATA_DIR with the quickstart's GRF store (``grf_quickstart.zarr``, generated from
    the quickstart config's own ``generate_data``) and the tiny GRF store (``grf_tiny.zarr``)."""
    d = tmp_path_factory.mktemp("data")
    from scidiff.cli.train import compose_config, ensure_data
    from scidiff_datasets.cli import main as make_dataset

    assert make_dataset(["grf", "--out", str(d / "grf_tiny.zarr"), "--size", "tiny", "--seed", "0", "-q"]) in (0, None)
    previous = os.environ.get("SCIDIFF_DATA_DIR")
    os.environ["SCIDIFF_DATA_DIR"] = str(d)
    try:
        ensure_data(compose_config(["experiment=quickstart"]))
    finally:
        if previous is None:
            del os.environ["SCIDIFF_DATA_DIR"]
        else:
            os.environ["SCIDIFF_DATA_DIR"] = previous
    assert (d / "grf_quickstart.zarr").exists()
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """A tiny conditional (spectral_index, amplitude) quickstart run, trained 30 steps once
    per session: the working directory (holding ``mlflow.db``) with the run under
    ``outputs/quickstart/tiny``."""
    from tests.training.conftest import TINY_CONDITIONAL, run_train

    cwd = tmp_path_factory.mktemp("trained")
    run_train([*TINY_CONDITIONAL, "run_name=tiny"], cwd, data_dir)
    return cwd


@pytest.fixture
def fresh_dynamo():
    """torch.compile's caches emptied before and after the test (compilations counted by a test start
    from none; no compiled graph outlives it)."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
