"""The Lightning side of MLflow: the run behind a trainer's logger, and logging files to it.

Store-level helpers (default store, flattened params, git commit, the SQLite lock)
live in :mod:`scidiff.inference.tracking`, shared with sampling and evaluation.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import Logger, MLFlowLogger


def mlflow_logger(logger: Logger | None) -> MLFlowLogger | None:
    return logger if isinstance(logger, MLFlowLogger) else None


def log_artifact(logger: Logger | None, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
    """Log a file to the MLflow run behind ``logger``; ``False`` when there is none."""
    ml = mlflow_logger(logger)
    if ml is None:
        return False
    ml.experiment.log_artifact(ml.run_id, str(Path(path)), artifact_path)
    return True
