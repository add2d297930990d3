"""Helpers of the training-stack tests: subprocess runs of scidiff-train (one run per process, or
several commands in one process) and the overrides they share (the session fixtures ``data_dir``
and ``trained_run`` are in tests/conftest.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# What every test run overrides: no figures, no progress bar, small validation.
QUIET = ["callbacks.samples=null", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]


def run_train(args: list[str], cwd: Path, data_dir: Path, timeout: float = 240, check: bool = True,
              extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore", **(extra_env or {})}
    proc = subprocess.run([sys.executable, "-m", "scidiff.cli.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"scidiff-train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


@dataclass
class Command:
    """One command of :func:`run_commands`: ``scidiff.cli.<cli>.main(args)`` run in ``cwd`` with
    ``env`` added to the environment."""

    cli: str
    args: list[str]
    cwd: Path
    env: dict[str, str] = field(default_factory=dict)


# Runs the commands one after the other in one interpreter, each with its own working directory,
# environment, exit status and output files (file descriptors 1 and 2 redirected: everything a
# library writes is captured too).
_COMMANDS = r"""
import importlib, json, os, sys, traceback

for step in json.load(open(sys.argv[1])):
    sys.stdout.flush(); sys.stderr.flush()
    saved, environ, cwd = (os.dup(1), os.dup(2)), dict(os.environ), os.getcwd()
    with open(step["stdout"], "w") as out, open(step["stderr"], "w") as err:
        os.dup2(out.fileno(), 1); os.dup2(err.fileno(), 2)
        os.environ.update(step["env"]); os.chdir(step["cwd"])
        try:
            code = importlib.import_module("scidiff.cli." + step["cli"]).main(step["args"])
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc(); code = 1
        if isinstance(code, str):
            print(code, file=sys.stderr); code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2); os.close(saved[0]); os.close(saved[1])
        os.chdir(cwd); os.environ.clear(); os.environ.update(environ)
    with open(step["status"], "w") as f:
        f.write(str(code or 0))
"""


def run_commands(commands: list[Command], data_dir: Path, timeout: float = 600,
                 check: bool = True) -> list[subprocess.CompletedProcess]:
    """Several scidiff commands in *one* subprocess, in order: what :func:`run_train` and its peers
    check, at one interpreter start (~10 s of imports on CI's CPUs) for all of them. For tests whose
    subject is what a run writes, not the process itself (signals, ``kill -9``, startup warnings and
    DDP launches keep a process each). A ``CompletedProcess`` per command; with ``check``, a failed
    command raises with its stderr."""
    with tempfile.TemporaryDirectory(prefix="scidiff-commands-") as tmp:
        tmp = Path(tmp)
        steps = [{"cli": c.cli, "args": list(c.args), "cwd": str(c.cwd), "env": dict(c.env),
                  **{k: str(tmp / f"{i}.{k}") for k in ("stdout", "stderr", "status")}}
                 for i, c in enumerate(commands)]
        (tmp / "steps.json").write_text(json.dumps(steps))
        env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
        proc = subprocess.run([sys.executable, "-c", _COMMANDS, str(tmp / "steps.json")], check=False, env=env,
                              capture_output=True, text=True, timeout=timeout)
        results = []
        for command, step in zip(commands, steps):
            status = Path(step["status"])
            if not status.exists():
                raise AssertionError(f"the command process died ({proc.returncode}) before scidiff-{command.cli} "
                                     f"{' '.join(command.args)} ended:\n{proc.stderr[-4000:]}")
            done = subprocess.CompletedProcess(command.args, int(status.read_text()),
                                               Path(step["stdout"]).read_text(), Path(step["stderr"]).read_text())
            if check and done.returncode != 0:
                raise AssertionError(f"scidiff-{command.cli} {' '.join(command.args)} failed ({done.returncode}):\n"
                                     f"{done.stderr[-4000:]}")
            results.append(done)
    return results


TINY_CONDITIONAL = [
    "experiment=quickstart", "data.params=[{name: spectral_index, transform: zscore}, {name: amplitude, transform: log}]",
    "module.cond_dropout=0.2", "trainer.max_steps=30", "trainer.val_check_interval=15", "trainer.log_every_n_steps=5",
    "callbacks.periodic_checkpoint.every_n_train_steps=15", *QUIET,
]
