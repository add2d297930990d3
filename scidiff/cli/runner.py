"""The one ``main`` of the compose-API commands (``scidiff-sample``, ``-evaluate``, ``-invert``),
and the error conventions every command shares (:func:`guarded`, also used by ``scidiff-train``).

Every command does the same around its own work: ``--help`` prints the usage and the
config file; ``--cfg`` prints the composed config; the config is composed (Hydra's
compose API: no run directory, the working directory unchanged) and checked; the work
runs. Errors and exit statuses are the same for all:

* 0 -- done (a command may return another status, e.g. ``scidiff-evaluate``'s 3);
* 2 -- a bad config or input: one line ``error: <message>`` naming the key or the file
  (:class:`~scidiff.cli.errors.ConfigError`, or one of the command's input errors);
* 1 -- an unexpected failure: one line; the traceback in ``<log dir>/error.log`` when the
  command names a log directory, or on the terminal with ``SCIDIFF_TRACEBACK=1``;
* 128 + n -- stopped by signal n: ``SIGTERM`` (143, as SLURM or ``torchrun`` send before
  killing) and ``SIGINT`` (Ctrl-C) stop the work with an exception, so that it cleans up.

Whatever way a command fails, the MLflow runs it opened are ended ``FAILED``, or
``KILLED`` when it was interrupted (:func:`ending_runs`, around the work in
:func:`guarded`); only ``kill -9`` cannot be caught (a resumed training reopens its run).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scidiff.cli.compose import CONFIG_DIR, compose_config
from scidiff.cli.errors import ConfigError, one_line_warnings, report_and_exit
from scidiff.cli.runlog import quiet_libraries


@dataclass(frozen=True)
class Command:
    """What differs between commands.

    Attributes:
        config_name: ``configs/<config_name>.yaml``.
        usage: printed by ``--help``.
        check: composed config -> plain config (raises ``ConfigError`` naming the key).
        run: plain config -> exit status (``None`` or 0: success); prints its own result lines.
        input_errors: exception types (besides ``ConfigError``) that mean bad input: exit 2, one line.
        log_dir: plain config -> where ``error.log`` goes on an unexpected failure (``None``: nowhere).
    """

    config_name: str
    usage: str
    check: Callable[[Any], dict[str, Any]]
    run: Callable[[dict[str, Any]], int | None]
    input_errors: Sequence[type[BaseException]] = field(default_factory=tuple)
    log_dir: Callable[[dict[str, Any]], Path | None] = lambda plain: None


def run_command(command: Command, argv: Sequence[str] | None = None) -> None:
    """Parse ``argv`` (default ``sys.argv[1:]``), run ``command`` and exit with its status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("--help", "-h") for a in argv):
        print(command.usage.strip())
        print(f"\nconfig: {CONFIG_DIR / (command.config_name + '.yaml')}")
        return
    if any(a.startswith("--cfg") for a in argv):
        from omegaconf import OmegaConf

        try:
            print(OmegaConf.to_yaml(compose_config(command.config_name, argv)))
        except ConfigError as exc:
            report_and_exit(exc, status=2)
        return
    one_line_warnings()
    quiet_libraries()
    try:
        plain = command.check(compose_config(command.config_name, argv))
    except ConfigError as exc:
        report_and_exit(exc, status=2)
    status = guarded(lambda: command.run(plain), command.input_errors, lambda: command.log_dir(plain))
    if status:
        sys.exit(status)


def guarded(work: Callable[[], int | None], input_errors: Sequence[type[BaseException]] = (),
            log_dir: Callable[[], Path | None] = lambda: None) -> int | None:
    """Run ``work`` with the commands' error conventions (module docstring): a ``ConfigError`` or
    one of ``input_errors`` exits 2 with one line; any other exception exits 1 with one line
    (the traceback in ``log_dir()/error.log``, or raised with ``SCIDIFF_TRACEBACK=1``)."""
    try:
        with ending_runs():
            return work()
    except ConfigError as exc:
        report_and_exit(exc, status=2)
    except tuple(input_errors) as exc:
        report_and_exit(ConfigError(str(exc)), status=2)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # one line on the terminal; the traceback in a log file or on request
        if os.environ.get("SCIDIFF_TRACEBACK"):
            raise
        directory = log_dir()
        if directory is None:
            try:
                exc = type(exc)(f"{exc} (set SCIDIFF_TRACEBACK=1 for the traceback)")
            except Exception:  # noqa: BLE001 - an exception type that takes other arguments
                pass
        report_and_exit(exc, directory, status=1)
    return None


class Terminated(SystemExit):
    """Raised in the main thread by ``SIGTERM``: the exit status 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)


@contextlib.contextmanager
def ending_runs() -> Iterator[None]:
    """Around a command's work: the MLflow runs it opened (:func:`scidiff.inference.tracking.own_run`)
    are ended ``FAILED`` when the work raises, ``KILLED`` when it is interrupted.

    ``SIGTERM`` and ``SIGINT`` stop the work with an exception (the previous handlers come back
    after): ``SIGTERM`` raises :class:`Terminated` at once, unless another handler has wrapped
    this one since (Lightning does during ``fit``: it finishes the step and stops with its own
    ``SystemExit``); ``SIGINT`` raises ``KeyboardInterrupt``. An interrupted command prints one
    line (``error: stopped by SIGTERM; MLflow run <id> ended KILLED``) and exits with 128 + the
    signal's number (143, 130), whatever a library made of the interrupt.
    """
    from scidiff.cli.runlog import console_print
    from scidiff.inference.tracking import KILLED, end_owned_runs, failure_status, release_owned_runs

    received: list[int] = []

    def on_sigterm(signum, frame):
        received.append(signum)
        if signal.getsignal(signal.SIGTERM) is on_sigterm:  # not wrapped by another handler: stop now
            raise Terminated(signum)

    def on_sigint(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {}
    if threading.current_thread() is threading.main_thread():  # handlers can only be set there
        for signum, handler in ((signal.SIGTERM, on_sigterm), (signal.SIGINT, on_sigint)):
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    except BaseException as exc:
        interrupted = bool(received) or isinstance(exc, KeyboardInterrupt)
        ended = end_owned_runs(KILLED if interrupted else failure_status(exc))
        if not interrupted:
            raise
        signum = received[0] if received else int(signal.SIGINT)
        runs = f"; MLflow run {', '.join(ended)} ended {KILLED}" if ended else ""
        console_print(f"error: stopped by {signal.Signals(signum).name}{runs}")
        raise SystemExit(128 + signum) from exc
    else:
        release_owned_runs()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
