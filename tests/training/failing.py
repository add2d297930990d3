"""A callback that makes a training fail on purpose, for the tests of how its MLflow run ends:
``+callbacks.fail={_target_: tests.training.failing.FailAt, step: 3, how: raise}`` (the
subprocess needs the repository root on ``PYTHONPATH``)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class FailAt(Callback):
    """Fail after training step ``step`` (``-1``: in ``setup``, after the MLflow run is created
    and before Lightning's own signal handling starts), by ``how``: ``raise`` (a RuntimeError)
    or a signal's name (``SIGTERM``, ``SIGINT``, ``SIGKILL``) sent to this process. With
    ``record``, first write there the status the MLflow store gives the run at that moment."""

    def __init__(self, step: int = 3, how: str = "raise", record: str | None = None) -> None:
        self.step, self.how, self.record = int(step), how, record

    def fail(self, trainer) -> None:
        if self.record is not None:
            from mlflow.tracking import MlflowClient

            ml = trainer.logger
            status = MlflowClient(tracking_uri=ml._tracking_uri).get_run(ml.run_id).info.status
            Path(self.record).write_text(status)
        if self.how == "raise":
            raise RuntimeError(f"injected failure at step {self.step}")
        os.kill(os.getpid(), getattr(signal, self.how))

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.step < 0:
            self.fail(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.fail(trainer)
