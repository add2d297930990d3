"""The Lightning side of MLflow: the run behind a trainer's logger, and logging files to it.

Store-level helpers (default store, flattened params, git commit, the SQLite lock, how
runs end, the model registry) live in :mod:`scidiff.inference.tracking`, shared with
sampling and evaluation.

How the training run ends: Lightning's ``MLFlowLogger`` ends it ``FINISHED`` after ``fit``
and ``FAILED`` when ``fit`` raises; :func:`open_run` also makes it owned by the command
(:func:`scidiff.inference.tracking.own_run`), so that a failure outside ``fit`` or a
signal (``SIGTERM``, Ctrl-C: ``KILLED``) ends it too (:func:`scidiff.cli.runner.ending_runs`),
and reopens a resumed run (``RUNNING`` again, also after ``kill -9``).
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import Logger, MLFlowLogger

from scidiff.inference.tracking import own_run, register_checkpoint, reopen_run


def mlflow_logger(logger: Logger | None) -> MLFlowLogger | None:
    return logger if isinstance(logger, MLFlowLogger) else None


def log_artifact(logger: Logger | None, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
    """Log a file to the MLflow run behind ``logger``; ``False`` when there is none."""
    ml = mlflow_logger(logger)
    if ml is None:
        return False
    ml.experiment.log_artifact(ml.run_id, str(Path(path)), artifact_path)
    return True


def open_run(logger: Logger | None, resumed: bool = False) -> str | None:
    """Start (or, resumed, reopen) the MLflow run behind ``logger`` now, owned by this command;
    returns its id (``None``: no MLflow logger, or not rank 0, whose logger has no run)."""
    ml = mlflow_logger(logger)
    if ml is None:
        return None
    run_id = ml.run_id  # creates the run on rank 0 (Lightning would in fit's setup); None elsewhere
    if run_id is None:
        return None
    if resumed:
        reopen_run(ml._tracking_uri, run_id)
    own_run(ml._tracking_uri, run_id)
    return run_id


def register_model(logger: Logger | None, name: str, artifact_path: str = "checkpoints/last.ckpt",
                   tags: dict | None = None) -> int:
    """Register the run's checkpoint artifact ``artifact_path`` as a new version of the model
    ``name`` in the store's model registry (rank 0); returns the version number.

    Raises ``ValueError`` when there is no MLflow run or the run has no such artifact.
    """
    ml = mlflow_logger(logger)
    if ml is None or ml.run_id is None:
        raise ValueError(f"register_model: {name}: no MLflow run to register from (logger=mlflow)")
    folder, _, file = artifact_path.rpartition("/")
    logged = {Path(a.path).name for a in ml.experiment.list_artifacts(ml.run_id, folder or None)}
    if file not in logged:
        raise ValueError(f"register_model: {name}: the run {ml.run_id} logged no {artifact_path} "
                         f"(a checkpoint callback with save_last: true writes it)")
    return register_checkpoint(ml._tracking_uri, ml.run_id, artifact_path, name, tags=tags)
