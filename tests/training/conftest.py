"""Helpers of the training-stack tests: scidiff commands run as processes (forked from a warm
interpreter, ``tests/forked.py``, or fresh where the test is about the interpreter itself) and the
overrides they share (the session fixtures ``data_dir`` and ``trained_run`` are in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.forked import run_forked

# What every test run overrides: no figures, no progress bar, small validation.
QUIET = ["callbacks.samples=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_cli(cli: str, args: list[str], cwd: Path, data_dir: Path | None = None, timeout: float = 240,
            check: bool = True, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """``scidiff-<cli> args`` in ``cwd`` as a process of its own, forked from the warm zygote
    (``tests/forked.py``); with a ``PYTHONWARNINGS`` other than ``ignore`` in ``extra_env`` (what an
    interpreter reads as it starts), a new interpreter, exactly as a user starts one. With ``check``,
    a failure raises with its stderr."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    if data_dir is not None:
        env["SCIDIFF_DATA_DIR"] = str(data_dir)
    if env["PYTHONWARNINGS"] != "ignore":
        proc = subprocess.run([sys.executable, "-m", f"scidiff.cli.{cli}", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=timeout)
    else:
        proc = run_forked(f"scidiff.cli.{cli}", args, cwd, env, timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scidiff-{cli} {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def run_train(args: list[str], cwd: Path, data_dir: Path, timeout: float = 240, check: bool = True,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """:func:`run_cli` of ``scidiff-train``."""
    return run_cli("train", args, cwd, data_dir, timeout, check, extra_env)


@dataclass
class Command:
    """One command of :func:`run_commands`: ``scidiff.cli.<cli>.main(args)`` run in ``cwd`` with
    ``env`` added to the environment."""

    cli: str
    args: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)


def run_commands(commands: list[Command], data_dir: Path, timeout: float = 600,
                 check: bool = True) -> list[subprocess.CompletedProcess]:
    """Several scidiff commands, in order, each a process forked from the warm zygote
    (``tests/forked.py``) with its own working directory, environment, exit status and output. A
    ``CompletedProcess`` per command; with ``check``, the first failed command raises with its
    stderr (and the later ones do not run)."""
    results = []
    for command in commands:
        env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore", **command.env}
        done = run_forked(f"scidiff.cli.{command.cli}", command.args, command.cwd, env, timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"scidiff-{command.cli} {' '.join(command.args)} failed ({done.returncode}):\n"
                                 f"{done.stderr[-4000:]}")
        results.append(done)
    return results


TINY_CONDITIONAL = [
    "experiment=quickstart",
    "data.params=[{name: spectral_index, transform: zscore}, {name: amplitude, transform: log}]",
    "module.cond_dropout=0.2", "trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.log_every_n_steps=5",
    "callbacks.periodic_checkpoint.every_n_train_steps=15", *QUIET,
]
