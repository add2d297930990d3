"""Access to MLflow tracking stores, shared by training, sampling and evaluation.

What every command needs to know about a store before it logs to one: its default
location (``sqlite:///mlflow.db`` in the working directory), whether it can be used
without creating an empty one by accident (:func:`reachable`), how a user opens it
(:func:`store_description`), how parameters are flattened for it (:func:`flatten`),
which commit produced a run (:func:`git_commit`), a lock that serialises the
first opening of an embedded SQLite store (:func:`store_lock`), which store holds a
checkpoint's training run (:func:`checkpoint_tracking_uri`), the registered models of a
store (:func:`register_checkpoint`, :func:`model_version`), and how a run ends.
MLflow itself is imported only inside the functions that talk to a store.

How a run ends. A run a command opens is *owned* by it (:func:`own_run`,
:func:`terminating`): it ends ``FINISHED`` when the command succeeds, and when the command
fails -- an exception, ``KeyboardInterrupt``, ``SIGTERM`` (as SLURM sends before killing a
job) -- every run it owns is ended ``FAILED``, or ``KILLED`` after an interrupt
(:func:`end_owned_runs`, called by the commands' error handling in
:mod:`scidiff.cli.runner`). Nothing can catch ``kill -9`` (``SIGKILL``): such a run stays
``RUNNING`` until a resume of it reopens it (:func:`reopen_run`) and ends it again.
Runs a command only adds to (the training run a sampling or an evaluation is recorded
on) are not owned: their status is their owner's.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

RUNNING, FINISHED, FAILED, KILLED = "RUNNING", "FINISHED", "FAILED", "KILLED"
MODELS = "models:/"
RUNS = "runs:/"

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
SQLITE = "sqlite:///"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def is_run_id(text: str) -> bool:
    """Whether ``text`` is a bare MLflow run id (32 lowercase hex digits)."""
    return bool(_RUN_ID.match(str(text)))


def is_mlflow_reference(text: str) -> bool:
    """Whether a checkpoint reference names something in an MLflow store rather than a file:
    ``runs:/<run_id>[/artifact]``, ``models:/<name>/<version|latest>``, ``models:/<name>@<alias>``
    or a bare run id."""
    text = str(text)
    return text.startswith((RUNS, MODELS)) or is_run_id(text)


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the embedded store ``sqlite:///mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_path(uri: str | None) -> Path | None:
    """The database file of an embedded ``sqlite:///`` store, else ``None``."""
    if uri and uri.startswith(SQLITE):
        return Path(uri[len(SQLITE):])
    return None


def absolute_tracking_uri(uri: str) -> str:
    """``uri`` with the path of an embedded SQLite store made absolute (it is relative to the
    working directory); any other store as it is.

    >>> absolute_tracking_uri("http://host:5000")
    'http://host:5000'
    """
    db = sqlite_path(uri)
    return uri if db is None or db.is_absolute() else SQLITE + str(db.resolve())


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


# ------------------------------------------------------------------ the store of a checkpoint
def checkpoint_tracking_uri(pretrained: Any, explicit: str | None = None) -> str:
    """The MLflow store that holds the training run of a loaded checkpoint (``Pretrained``).

    In order: ``explicit`` (a command's ``tracking_uri`` key) as given; the store the
    checkpoint was downloaded from (``runs:/``, ``models:/``, a run id); the store recorded
    in the checkpoint -- a server or an absolute path as recorded, and the default
    relative ``sqlite:///mlflow.db`` against the directory the training ran in, found from
    the checkpoint's place in its run directory
    (``<training dir>/<output_root>/<task_name>/<run_name>/checkpoints/``), so a command run
    from anywhere logs to the training's store; else (a checkpoint moved out of its run
    directory) relative to the working directory; without a recorded store,
    :func:`default_tracking_uri`. Every command that logs about a checkpoint uses this.
    """
    if explicit:
        return explicit
    source = getattr(pretrained, "source_tracking_uri", None)
    if source:
        return source
    uri = getattr(pretrained, "mlflow_tracking_uri", None)
    if not uri:
        return default_tracking_uri()
    db = sqlite_path(uri)
    if db is None or db.is_absolute():
        return uri
    cfg = getattr(pretrained, "config", None) or {}
    names = [cfg.get(k) for k in ("output_root", "task_name", "run_name")]
    checkpoint = getattr(pretrained, "checkpoint", None)
    if checkpoint is not None and all(isinstance(n, str) and n for n in names) and not Path(names[0]).is_absolute():
        parts = Path(*names).parts  # the run directory, relative to the training's working directory
        run_dir = Path(checkpoint).resolve().parent.parent
        if len(run_dir.parts) > len(parts) and run_dir.parts[-len(parts):] == parts:
            return SQLITE + str(Path(*run_dir.parts[:-len(parts)]) / db)
    return uri


# ------------------------------------------------------------------ how runs end
_OWNED: dict[tuple[str, str], None] = {}  # (tracking uri, run id) of the runs this process opened


def failure_status(exc: BaseException | None) -> str:
    """The status of a run its command ended with ``exc``: ``KILLED`` for an interrupt
    (``KeyboardInterrupt``; a ``SystemExit`` with a signal's exit status 128 + n), else ``FAILED``."""
    if isinstance(exc, KeyboardInterrupt):
        return KILLED
    if isinstance(exc, SystemExit) and isinstance(exc.code, int) and exc.code > 128:
        return KILLED
    return FAILED


def own_run(tracking_uri: str, run_id: str) -> None:
    """Mark a run as opened by this process: if the command fails it is ended ``FAILED``
    (``KILLED`` after an interrupt) by :func:`end_owned_runs`, whatever its status then."""
    _OWNED[(str(tracking_uri), str(run_id))] = None


def owned_runs() -> list[tuple[str, str]]:
    """The ``(tracking uri, run id)`` of the runs this process owns now."""
    return list(_OWNED)


def release_owned_runs() -> None:
    """Forget the owned runs (the command succeeded: their owners have ended them)."""
    _OWNED.clear()


def end_owned_runs(status: str) -> list[str]:
    """End every owned run with ``status`` (``FAILED`` or ``KILLED``); returns their ids.

    Best effort: a store that cannot be reached leaves its run as it was (the command is
    failing already; its own error is the one to report)."""
    ended = []
    for uri, run_id in list(_OWNED):
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri=uri).set_terminated(run_id, status)
            ended.append(run_id)
        except Exception:  # noqa: BLE001 - never hide the command's own failure
            pass
    _OWNED.clear()
    return ended


def reopen_run(tracking_uri: str, run_id: str) -> None:
    """Set a run ``RUNNING`` again: a resumed training continues a run that a failure ended
    ``FAILED``/``KILLED``, or that ``kill -9`` left ``RUNNING`` with its end never recorded."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).update_run(run_id, status=RUNNING)


@contextlib.contextmanager
def terminating(client: Any, run_id: str, tracking_uri: str) -> Iterator[None]:
    """Around the logging into a run a command created with ``client``: the run is owned
    (:func:`own_run`), ends ``FINISHED`` when the block completes and ``FAILED`` (``KILLED``
    on an interrupt) when it raises, the exception going on."""
    own_run(tracking_uri, run_id)
    try:
        yield
    except BaseException as exc:
        try:
            client.set_terminated(run_id, failure_status(exc))
        except Exception:  # noqa: BLE001 - the original exception is the one to see
            pass
        raise
    client.set_terminated(run_id, FINISHED)


# ------------------------------------------------------------------ the model registry
def register_checkpoint(tracking_uri: str, run_id: str, artifact_path: str, name: str,
                        tags: Mapping[str, Any] | None = None) -> int:
    """Register the checkpoint artifact ``artifact_path`` of run ``run_id`` as a new version
    of the registered model ``name`` (created when absent); returns the version number.

    The version's source is ``runs:/<run_id>/<artifact_path>``: the checkpoint file itself,
    read back with ``torch.load(weights_only=True)`` (no MLflow model flavour, nothing
    pickled); :func:`scidiff.inference.resolve_checkpoint` accepts ``models:/<name>/<version>``.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.create_registered_model(name, description="scidiff checkpoints (weights-only torch files)")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"{RUNS}{run_id}/{artifact_path}", run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        description=f"{artifact_path} of run {run_id}: a weights-only torch checkpoint "
                    f"(scidiff.inference.load_pretrained('{MODELS}{name}/<version>'))")
    return int(version.version)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/<name>/<version|latest>`` or ``models:/<name>@<alias>`` -> (name, version, alias).

    >>> parse_model_uri("models:/grf/3"), parse_model_uri("models:/grf@best"), parse_model_uri("models:/grf/latest")
    (('grf', '3', None), ('grf', None, 'best'), ('grf', 'latest', None))
    """
    rest = str(uri)[len(MODELS):].strip("/")
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if name and alias and "/" not in alias:
            return name, None, alias
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if name and (version.isdigit() or version == "latest"):
            return name, version, None
    raise ValueError("expected models:/<name>/<version>, models:/<name>/latest or models:/<name>@<alias>")


def model_version(tracking_uri: str, uri: str) -> tuple[str, str, str | None]:
    """The registered model version ``uri`` names -> (its version, its source URI, its run id).

    Raises ``LookupError`` naming the model and the version (or alias) when the store has
    no such model or version, ``ValueError`` for a malformed URI.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    name, version, alias = parse_model_uri(uri)
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise LookupError(f"no registered model {name!r}") from None
    try:
        if alias is not None:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise LookupError(f"registered model {name!r} has no versions")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException:
        what = f"alias {alias!r}" if alias is not None else f"version {version}"
        raise LookupError(f"registered model {name!r} has no {what}") from None
    return str(mv.version), str(mv.source), mv.run_id


__all__ = [
    "DEFAULT_TRACKING_URI",
    "FAILED",
    "FINISHED",
    "KILLED",
    "RUNNING",
    "absolute_tracking_uri",
    "artifact_location",
    "checkpoint_tracking_uri",
    "default_tracking_uri",
    "end_owned_runs",
    "failure_status",
    "flatten",
    "git_commit",
    "is_mlflow_reference",
    "is_run_id",
    "model_version",
    "own_run",
    "owned_runs",
    "parse_model_uri",
    "reachable",
    "register_checkpoint",
    "release_owned_runs",
    "reopen_run",
    "sqlite_path",
    "store_description",
    "store_lock",
    "terminating",
]
