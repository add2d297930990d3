"""What a command prints, on the terminal and in its run's log file.

:func:`run_log` copies everything written to ``sys.stdout`` and ``sys.stderr`` (our
lines, warnings, the error line) to a log file, e.g. ``<run dir>/train.log``, while it
is active. The streams it installs keep the terminal as ``.terminal``: a live progress
bar writes there, so redraws stay out of the file
(:class:`scidiff.training.progress.StepProgress`). :func:`console_print` prints a line
above any live bar instead of inside it. :func:`quiet_libraries` keeps the libraries'
informational chatter out of the output.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


def terminal(stream: Any) -> Any:
    """The terminal behind ``stream`` (itself when it is not a :func:`run_log` copy)."""
    return getattr(stream, "terminal", stream)


def console_print(text: str, file: Any = None) -> None:
    """``print(text)`` to ``file`` (default ``sys.stderr``) above any live progress bar."""
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    with tqdm.external_write_mode(file=terminal(sys.stderr)):
        print(text, file=file, flush=True)


def quiet_libraries() -> None:
    """Keep the libraries' chatter out of the run's output: Lightning's informational lines
    (accelerator availability, tips, "fit stopped"), MLflow's database set-up lines, and
    warnings about the libraries' own code that a user cannot act on. Warnings about the
    run still show, one line each."""
    import logging
    import os
    import warnings

    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is first imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per downloaded checkpoint
    for name in ("lightning.pytorch", "lightning.fabric", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # "Experiment with name <x> not found. Creating it.": creating it is what a first run does
    logging.getLogger("lightning.pytorch.loggers.mlflow").setLevel(logging.ERROR)
    # the EMA copy is frozen in eval mode on purpose (no dropout in the average)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # a resumed run writes into its own checkpoint directory; a new run never does (scidiff-train refuses it)
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    # deprecations inside the libraries (e.g. MLflow's use of SQLAlchemy): not the user's to fix
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"(mlflow|lightning|alembic)\.")
    # Lightning's use of a torch pytree API that torch deprecated: not the user's to fix
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


class _Tee:
    """A text stream writing to a terminal stream and to a log file."""

    def __init__(self, terminal_stream: Any, log: IO[str]) -> None:
        self.terminal, self._log = terminal_stream, log

    def write(self, text: str) -> int:
        n = self.terminal.write(text)
        try:
            self._log.write(text)
        except (OSError, ValueError):  # a full disk or a closed log must not stop the run
            pass
        return n

    def flush(self) -> None:
        self.terminal.flush()
        try:
            self._log.flush()
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.terminal, name)


@contextmanager
def run_log(path: str | Path | None) -> Iterator[Path | None]:
    """Copy ``sys.stdout`` and ``sys.stderr`` to ``path`` (appended; the parent is created)
    while the block runs; ``None`` copies nothing. A log that cannot be opened is not an
    error: the output still reaches the terminal."""
    if path is None:
        yield None
        return
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1, encoding="utf-8")
    except OSError:
        yield None
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)
    try:
        yield path
    finally:
        sys.stdout, sys.stderr = saved
        log.close()


__all__ = ["console_print", "quiet_libraries", "run_log", "terminal"]
