"""Access to MLflow tracking stores, shared by training, sampling and evaluation.

What every command needs to know about a store before it logs to one: its default
location (``sqlite:///mlflow.db`` in the working directory), whether it can be used
without creating an empty one by accident (:func:`reachable`), how a user opens it
(:func:`store_description`), how parameters are flattened for it (:func:`flatten`),
which commit produced a run (:func:`git_commit`), and a lock that serialises the
first opening of an embedded SQLite store (:func:`store_lock`). MLflow itself is
imported only inside the functions that talk to a store.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE = "sqlite:///"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def is_run_id(text: str) -> bool:
    """Whether ``text`` is a bare MLflow run id (32 lowercase hex digits)."""
    return bool(_RUN_ID.match(str(text)))


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded store ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of an embedded ``sqlite:///`` store, else ``None``."""
    if uri and uri.startswith(SQLITE):
        return Path(uri[len(SQLITE):])
    return None


def artifact_location(uri: str | None) -> str | None:
    """Where a new experiment of the store keeps its artifacts: beside an embedded SQLite
    database (``<db dir>/mlruns``, wherever the command runs), else the server's default
    (``None``). Without it MLflow puts them in ``./mlruns`` of the working directory."""
    db = sqlite_path(uri)
    return None if db is None else (db.resolve().parent / "mlruns").as_uri()


def reachable(uri: str | None) -> bool:
    """Whether an MLflow tracking store can be used without creating one by accident."""
    if not uri:
        return False
    db = sqlite_path(uri)
    if db is not None:
        return db.is_file()
    if uri.startswith("file:"):
        return Path(uri[len("file:"):].lstrip("/") if uri.startswith("file://") else uri[5:]).exists()
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=3) as resp:
                return resp.status == 200
        except OSError:
            return False
    return Path(uri).exists()


def store_description(tracking_uri: str) -> tuple[str, str]:
    """(where the store is, the command that opens its UI)."""
    db = sqlite_path(tracking_uri)
    if db is not None:
        db = db.resolve()
        return str(db), f"mlflow ui --backend-store-uri {SQLITE}{db}"
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri, f"open {tracking_uri}"
    return tracking_uri, f"mlflow ui --backend-store-uri {tracking_uri}"


def flatten(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``; lists become their string form.

    >>> flatten({"a": {"b": 1, "c": [1, 2]}, "d": None})
    {'a.b': 1, 'a.c': '[1, 2]', 'd': None}
    """
    out: dict[str, Any] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, bool, str)) or v is None else str(v)
    return out


def git_commit(path: str | os.PathLike = ".") -> str | None:
    """The checked-out commit of the repository containing ``path`` (``-dirty`` if it has
    uncommitted changes), or ``None`` outside git."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=path, capture_output=True, text=True, timeout=10)

    try:
        head = run("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


@contextlib.contextmanager
def store_lock(tracking_uri: str | None) -> Iterator[None]:
    """Hold an exclusive lock beside an embedded SQLite store while opening it.

    Opening a new SQLite store creates its tables (an Alembic migration); processes
    that open the same new store at once (every rank of a ``torchrun`` job builds
    its logger) race on it and one fails. Inside this context only one process at a
    time opens the store, so the first creates the tables and the others find them.
    Other stores (servers, file stores) need no lock. The lock is a ``filelock``
    lock file ``<db>.lock`` (portable, unlike ``fcntl``).
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db.with_name(db.name + ".lock"))):
        yield


__all__ = [
    "DEFAULT_TRACKING_URI",
    "artifact_location",
    "default_tracking_uri",
    "flatten",
    "git_commit",
    "is_run_id",
    "reachable",
    "sqlite_path",
    "store_description",
    "store_lock",
]
