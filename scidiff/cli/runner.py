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
  command names a log directory, or on the terminal with ``SCIDIFF_TRACEBACK=1``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scidiff.cli.compose import CONFIG_DIR, compose_config
from scidiff.cli.errors import ConfigError, one_line_warnings, report_and_exit


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
