"""MLflow helpers: the logger (resuming a run by id), git commit, flattened params."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, MLFlowLogger


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """The checked-out commit of the repository containing ``path`` (``-dirty`` if it has
    uncommitted changes), or ``None`` outside git."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=path, capture_output=True, text=True, timeout=10)  # noqa: E731
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become their string form."""
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, bool, str)) or v is None else str(v)
    return out


def mlflow_logger(logger: Logger | None) -> MLFlowLogger | None:
    return logger if isinstance(logger, MLFlowLogger) else None


def log_artifact(logger: Logger | None, path: str | os.PathLike, artifact_path: str | None = None) -> bool:
    """Log a file to the MLflow run behind ``logger``; ``False`` when there is none."""
    ml = mlflow_logger(logger)
    if ml is None:
        return False
    ml.experiment.log_artifact(ml.run_id, str(Path(path)), artifact_path)
    return True


def store_description(tracking_uri: str) -> tuple[str, str]:
    """(where the store is, the command that opens its UI)."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):]).resolve()
        uri = f"sqlite:///{db}"
        return str(db), f"mlflow ui --backend-store-uri {uri}"
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri, f"open {tracking_uri}"
    return tracking_uri, f"mlflow ui --backend-store-uri {tracking_uri}"


@contextlib.contextmanager
def store_lock(tracking_uri: str | None) -> Iterator[None]:
    """Hold an exclusive lock beside an embedded SQLite store while opening it.

    Opening a new SQLite store creates its tables (an Alembic migration); processes
    that open the same new store at once (every rank of a ``torchrun`` job builds
    its logger) race on it and one fails. Inside this context only one process at a
    time opens the store, so the first creates the tables and the others find them.
    Other stores (servers, file stores) need no lock.
    """
    if not tracking_uri or not tracking_uri.startswith("sqlite:///"):
        yield
        return
    db = Path(tracking_uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
