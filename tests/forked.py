"""CLI commands run as processes forked from a warm interpreter: what the tests' subprocess runs cost
without paying the imports each time.

A ``scidiff-train`` process spends ~13 s of one CI core importing torch, Lightning (and through
torchmetrics, transformers and scipy), MLflow, Hydra, xarray and zarr before it does anything; the
suite starts dozens of them. :func:`run_forked` hands a command to a *zygote*: an interpreter
started once per test process that has imported every ``scidiff`` module and then only forks. The
child is a process of its own (its pid, its signals, its exit status, ``kill -9`` kills it alone)
that runs ``scidiff.cli.<cli>.main(args)`` (or a workflow script) in its working directory with its environment and its
stdout and stderr, and exits as a process does, but for the teardown of every module: the ``atexit``
handlers run (MLflow's, Lightning's), a ``str`` exit code is printed, the streams are flushed.

``sys.argv`` is the command's module file and its arguments, so Lightning's DDP launcher starts the
other ranks as ``python scidiff/cli/train.py <args>``, fresh interpreters. What a fork cannot
reproduce, the callers run in a fresh interpreter instead (``tests.training.conftest.run_cli``
does so by itself for a ``PYTHONWARNINGS`` other than ``ignore``): anything read at interpreter
start, such as the warnings raised while importing.

The zygote runs nothing before it forks (no thread pool, no zarr I/O loop exists yet), checks that it
holds no thread, and ends when its test process closes its stdin. ``gc.freeze()`` keeps the
collector off its objects in a child, where a walk would copy every page of the heap. A one-step
quickstart took 5.5 s forked with the collector on and a full shutdown, 2.4 s forked as here, and
3.4 s as the second run of one interpreter.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The zygote: imports everything once, then forks a child per request line
# {"command", "script", "args", "cwd", "env", "stdout", "stderr"} and answers "<pid>\n" then "<exit status>\n"
# (negative: killed by that signal, as subprocess reports it).
_ZYGOTE = r"""
import gc, importlib, json, os, pkgutil, runpy, sys, threading, traceback

import lightning.pytorch, mlflow, mlflow.tracking, hydra, xarray, zarr  # noqa: F401
import scidiff, scidiff_datasets
for package in (scidiff, scidiff_datasets):
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        try:
            importlib.import_module(info.name)
        except ImportError:  # needs an extra not installed here: a child imports it, and fails, where used
            pass

# No thread but the main one (a thread's locks would stay taken in a child), except jemalloc's
# background thread (pyarrow's, imported by MLflow), which jemalloc's own fork handlers take care of.
native = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")] \
    if os.path.isdir("/proc/self/task") else []
assert threading.active_count() == 1 and len([n for n in native if n != "jemalloc_bg_thd"]) <= 1, \
    f"threads in the zygote: {threading.enumerate()}, {native}"
gc.freeze()  # the collector never walks (and so never copies) the zygote's objects in a child
requests, answers = sys.stdin, sys.stdout
answers.write("ready\n"); answers.flush()

for line in requests:
    step = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setpgrp()  # the test kills the child's whole group on a timeout
        null = os.open(os.devnull, os.O_RDONLY)
        out = os.open(step["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(step["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target); os.close(fd)
        sys.stdin = open(os.devnull)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.environ.clear(); os.environ.update(step["env"]); os.chdir(step["cwd"])
        for entry in reversed([p for p in step["env"].get("PYTHONPATH", "").split(os.pathsep) if p]):
            if entry not in sys.path:
                sys.path.insert(0, entry)
        try:
            if step["script"]:  # python <script> args
                sys.argv = [step["command"], *step["args"]]
                runpy.run_path(step["command"], run_name="__main__")
                code = 0
            else:  # the module's main(args), as its console script calls it
                command = importlib.import_module(step["command"])
                sys.argv = [command.__file__, *step["args"]]  # what Lightning's DDP launcher re-runs for other ranks
                code = command.main(step["args"])
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc(); code = 1
        # a process's exit without the teardown of every module (seconds for this heap)
        if isinstance(code, str):
            print(code, file=sys.stderr); code = 1
        import atexit; atexit._run_exitfuncs()
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code or 0)
    answers.write(f"{pid}\n"); answers.flush()
    _, status = os.waitpid(pid, 0)
    answers.write(f"{os.waitstatus_to_exitcode(status)}\n"); answers.flush()
"""


class _Zygote:
    def __init__(self) -> None:
        self.log = tempfile.NamedTemporaryFile(prefix="scidiff-zygote-", suffix=".log", delete=False)
        env = {**os.environ, "PYTHONWARNINGS": "ignore",
               "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, env=env, cwd=ROOT, text=True, bufsize=1)
        self.buffer = b""  # the answers read and not yet taken (two can arrive in one read)
        if self._line(600) != "ready":
            raise RuntimeError(f"the zygote did not start:\n{Path(self.log.name).read_text()[-4000:]}")

    def _line(self, timeout: float) -> str | None:
        """The zygote's next answer, or None after ``timeout`` s (read from the pipe's descriptor: a
        buffered reader could hold a second answer where ``select`` does not see it)."""
        fd, deadline = self.proc.stdout.fileno(), time.monotonic() + timeout
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                return ""  # the zygote died
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return line.decode().strip()

    def run(self, command: str | Path, args: list[str], cwd: Path, env: dict[str, str], timeout: float,
            ) -> subprocess.CompletedProcess:
        shown = [str(command), *args]
        with tempfile.TemporaryDirectory(prefix="scidiff-forked-") as tmp:
            out, err = Path(tmp) / "stdout", Path(tmp) / "stderr"
            self.proc.stdin.write(json.dumps({"command": str(command), "script": isinstance(command, Path),
                                              "args": list(args), "cwd": str(cwd), "env": env,
                                              "stdout": str(out), "stderr": str(err)}) + "\n")
            self.proc.stdin.flush()
            pid = self._line(60)
            if not pid:
                raise RuntimeError(f"the zygote did not fork:\n{Path(self.log.name).read_text()[-4000:]}")
            status = self._line(timeout)
            if status is None:  # as subprocess.run: kill the command, then raise
                os.killpg(int(pid), signal.SIGKILL)
                self._line(60)
                raise subprocess.TimeoutExpired(shown, timeout, out.read_text(), err.read_text())
            if not status:
                raise RuntimeError(f"the zygote died while {' '.join(shown)} ran:\n"
                                   f"{Path(self.log.name).read_text()[-4000:]}")
            return subprocess.CompletedProcess(shown, int(status), out.read_text(), err.read_text())

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        Path(self.log.name).unlink(missing_ok=True)


_zygote: _Zygote | None = None


def run_forked(command: str | Path, args: list[str], cwd: Path, env: dict[str, str], timeout: float = 600,
               ) -> subprocess.CompletedProcess:
    """``command args`` in ``cwd`` with exactly the environment ``env``, as a process forked from this
    test process's zygote (started at the first call). ``command`` is a module whose ``main(args)`` is
    called, as its console script does (``"scidiff.cli.train"``), or a script run as ``python <script>
    args`` (a ``Path``). Its exit status (negative when a signal killed it), stdout and stderr; a
    command still running after ``timeout`` s is killed with its children and raises
    ``subprocess.TimeoutExpired``."""
    global _zygote
    if _zygote is None or _zygote.proc.poll() is not None:
        _zygote = _Zygote()
        atexit.register(_zygote.close)
    return _zygote.run(command, args, cwd, env, timeout)
