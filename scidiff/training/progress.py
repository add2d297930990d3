"""Training progress over steps, one bar for the whole run, and status lines a log file can hold.

Lightning's bars count batches per epoch: a small dataset makes an "epoch" of a few
steps, so a run of thousands of steps printed thousands of bars (500 KB in a
redirected log). :class:`StepProgress` counts optimiser steps from the first to
``trainer.max_steps`` (from the checkpoint's step on a resume):

* on a terminal, one live bar (``tqdm``) over the run's steps, with the losses;
* always, a status line per validation and one at the end
  (``step 500/1500 | train/loss 0.12 | val/loss 0.10 | 6.1 steps/s | 2 min left``),
  printed above the bar, so a redirected log (and the run's ``train.log``) holds the
  run's progress without bar redraws;
* when the output is not a terminal, also a status line every ``every_s`` seconds.

The bar goes to the terminal itself: when the command copies its output to a log file
(``scidiff.cli.runlog``: ``sys.stderr`` then keeps the terminal as ``.terminal``) the
bar stays out of it.
The bar closes on an exception, so the error line that follows starts on its own line.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class StepProgress(ProgressBar):
    """One progress bar over the run's training steps, and status lines (module docstring).

    Args:
        every_s: seconds between status lines when the output is not a terminal
            (``0``: only at validations and the end).
        bar: show the live bar on a terminal (``False``: status lines only).
    """

    def __init__(self, every_s: float = 300.0, bar: bool = True) -> None:
        super().__init__()
        if every_s < 0:
            raise ValueError(f"StepProgress: every_s must be >= 0, got {every_s}")
        self.every_s, self.show_bar = float(every_s), bool(bar)
        self._enabled = True
        self._bar: tqdm | None = None
        self._start_step = 0
        self._t0 = self._last_line = 0.0
        self.lines: list[str] = []        # the status lines printed (for tests and the summary)

    # -- ProgressBar interface -------------------------------------------------------------
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._bar is not None:
            with tqdm.external_write_mode(file=self._bar.fp):
                print(*args, **kwargs)
        else:
            print(*args, **kwargs)

    # -- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_step = trainer.global_step
        self._t0 = self._last_line = time.monotonic()
        if not self._enabled:
            return
        stream = getattr(sys.stderr, "terminal", sys.stderr)  # past a log copy (scidiff.cli.runlog)
        if self.show_bar and _isatty(stream):
            total = self.total_steps(trainer)
            self._bar = tqdm(total=None if math.isinf(total) else int(total), initial=trainer.global_step,
                             desc="train", unit="step", file=stream, dynamic_ncols=True, leave=True,
                             bar_format="{desc} {n_fmt}/{total_fmt} |{bar}| {elapsed}<{remaining}, "
                                        "{rate_fmt}{postfix}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(self._metrics(trainer), refresh=False)
            self._bar.update(trainer.global_step - self._bar.n)  # redraws at most every 0.1 s
        elif self.every_s > 0 and time.monotonic() - self._last_line >= self.every_s:
            self._status(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._status(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and (not self.lines or not self.lines[-1].startswith(f"step {trainer.global_step}/")):
            self._status(trainer)
        self._close()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._close()

    # -- helpers ---------------------------------------------------------------------------
    @staticmethod
    def total_steps(trainer: L.Trainer) -> float:
        """The step the run ends at: ``max_steps``, or Lightning's estimate from the epochs."""
        if trainer.max_steps is not None and trainer.max_steps > 0:
            return float(trainer.max_steps)
        try:
            return float(trainer.estimated_stepping_batches)
        except Exception:  # noqa: BLE001 - no loader yet, or an unbounded run
            return math.inf

    @staticmethod
    def _metrics(trainer: L.Trainer) -> str:
        parts = []
        for name, value in trainer.progress_bar_metrics.items():
            if isinstance(value, (int, float)):
                parts.append(f"{name} {value:.4g}")
        return " | ".join(parts)

    def _status(self, trainer: L.Trainer) -> None:
        now = time.monotonic()
        self._last_line = now
        step, total = trainer.global_step, self.total_steps(trainer)
        done = step - self._start_step
        rate = done / max(now - self._t0, 1e-9)
        line = f"step {step}/{'?' if math.isinf(total) else int(total)}"
        metrics = self._metrics(trainer)
        if metrics:
            line += f" | {metrics}"
        if done > 0:
            line += f" | {rate:.3g} steps/s"
            if math.isfinite(total) and step < total:
                line += f" | {format_duration((total - step) / rate)} left"
        self.lines.append(line)
        self.print(line, flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


__all__ = ["StepProgress", "format_duration"]
