"""Callbacks: checkpoints that keep the final weights, sample (diffusion) and reconstruction
(autoencoder) figures during validation, and the run's MLflow artifacts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import matplotlib.pyplot as plt
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only

from scidiff.inference.figures import samples_figure
from scidiff.training.sharding import is_sharded
from scidiff.inference.tracking import flatten, git_commit
from scidiff.training.tracking import log_artifact, mlflow_logger


def _physical(dm: Any, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    inverse = getattr(dm, "inverse_transform", None)
    if inverse is None:
        return x
    return inverse(x, mask) if mask is not None else inverse(x)


class ValidationFigure(Callback):
    """A figure every ``every_n_validations`` validations (rank 0, not during the sanity
    check), saved to ``<run_dir>/figures/<prefix>_step<N>.png`` and logged to MLflow;
    subclasses draw it (:meth:`figure`)."""

    prefix = "figure"

    def __init__(self, every_n_validations: int = 1, num_samples: int = 4) -> None:
        if every_n_validations < 1 or num_samples < 1:
            raise ValueError(f"{type(self).__name__}: every_n_validations and num_samples must be >= 1")
        self.every, self.num_samples = int(every_n_validations), int(num_samples)
        self._count = 0
        self.last_path: Path | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._count += 1
        # a sharded model (trainer=fsdp) runs its forward on every rank together: all ranks draw, rank 0 saves
        if (self._count - 1) % self.every == 0 and (trainer.is_global_zero or is_sharded(trainer)):
            self.last_path = self.draw(trainer, pl_module)

    def first_validation_batch(self, trainer: L.Trainer, pl_module: Any) -> dict[str, torch.Tensor]:
        batch = next(iter(trainer.datamodule.val_dataloader()))
        n = min(self.num_samples, batch["x"].shape[0])
        return {k: v[:n].to(pl_module.device) for k, v in batch.items() if torch.is_tensor(v)}

    def figure(self, trainer: L.Trainer, pl_module: Any):
        raise NotImplementedError

    @torch.no_grad()
    def draw(self, trainer: L.Trainer, pl_module: Any) -> Path:
        fig = self.figure(trainer, pl_module)
        path = Path(trainer.default_root_dir) / "figures" / f"{self.prefix}_step{trainer.global_step:07d}.png"
        if trainer.is_global_zero:
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=80)
            log_artifact(trainer.logger, path, "figures")
        plt.close(fig)
        return path


def _data_panels(trainer: L.Trainer, batch: dict[str, torch.Tensor], generated: torch.Tensor, title: str,
                 rows: tuple[str, str]):
    """The batch's fields over ``generated`` (normalised units both), in physical units."""
    dm = trainer.datamodule
    mask = batch.get("mask")
    meta = getattr(dm, "metadata", None)
    return samples_figure(_physical(dm, batch["x"], mask).float().cpu().numpy(),
                          _physical(dm, generated, mask).float().cpu().numpy(),
                          getattr(meta, "channel_names", ()), getattr(meta, "units", ()), title=title, row_labels=rows)


class SampleFigure(ValidationFigure):
    """Every ``every_n_validations`` validations, ``num_samples`` DDIM samples (EMA weights,
    conditioned on the first validation samples' params/fields) next to those data, in
    physical units; saved to ``<run_dir>/figures/`` and logged to MLflow.

    Rank 0 only; the generator is seeded with ``seed``, so figures of successive
    validations differ only by the weights.
    """

    prefix = "samples"

    def __init__(self, every_n_validations: int = 1, num_samples: int = 4, num_steps: int = 50,
                 eta: float = 0.0, seed: int = 0) -> None:
        if num_steps < 1:
            raise ValueError("SampleFigure: every_n_validations, num_samples and num_steps must be >= 1")
        super().__init__(every_n_validations, num_samples)
        self.num_steps, self.eta, self.seed = int(num_steps), float(eta), int(seed)

    def figure(self, trainer: L.Trainer, pl_module: Any):
        batch = self.first_validation_batch(trainer, pl_module)
        g = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        samples = pl_module.sample(tuple(batch["x"].shape), pl_module.conditioning(batch), num_steps=self.num_steps,
                                   eta=self.eta, generator=g)
        return _data_panels(trainer, batch, samples, f"step {trainer.global_step}: data (top) and "
                            f"DDIM-{self.num_steps} samples", ("data", "sample"))


class ReconstructionFigure(ValidationFigure):
    """Every ``every_n_validations`` validations, the first ``num_samples`` validation fields
    next to their reconstructions through the autoencoder's posterior mean, in physical
    units; saved to ``<run_dir>/figures/`` and logged to MLflow (rank 0)."""

    prefix = "reconstructions"

    def figure(self, trainer: L.Trainer, pl_module: Any):
        batch = self.first_validation_batch(trainer, pl_module)
        return _data_panels(trainer, batch, pl_module.reconstruct(batch["x"]),
                            f"step {trainer.global_step}: data (top) and reconstructions", ("data", "reconstruction"))


class PeriodicCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` always holds the final weights.

    Lightning writes ``last.ckpt`` with the periodic checkpoints and, at the end of training,
    only if it never wrote one: with ``max_steps`` not a multiple of ``every_n_train_steps``
    (40 steps, every 25) ``last.ckpt`` kept step 25 and ``scidiff-sample`` used those older
    weights. Here training's end always writes it (every rank calls, rank 0 writes).
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None:
            return
        path = Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        self.last_model_path = str(path)


class RunArtifacts(Callback):
    """Logs what makes a run reproducible and usable to MLflow (rank 0):

    * at the start: the resolved config (flattened params, unless the run is being
      resumed, and ``config.yaml``), the git commit tag and the normalisation
      statistics (``statistics.json``);
    * at the end: the best and the last checkpoints (``checkpoints/``).
    """

    def __init__(self, config: dict[str, Any] | None = None, config_yaml: str | None = None,
                 resumed: bool = False, log_checkpoints: bool = True) -> None:
        self.config, self.config_yaml, self.resumed = config or {}, config_yaml, resumed
        self.log_checkpoints = log_checkpoints
        self.logged_checkpoints: list[Path] = []

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = Path(trainer.default_root_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        ml = mlflow_logger(trainer.logger)
        if ml is None:
            return
        client, run_id = ml.experiment, ml.run_id
        # kept in every checkpoint, so that a resumed run logs into this same MLflow run
        run_info = getattr(pl_module, "run_info", None)
        if isinstance(run_info, dict):
            run_info["mlflow_run_id"] = run_id
            run_info["mlflow_tracking_uri"] = ml._tracking_uri
        if not self.resumed and self.config:
            ml.log_hyperparams(flatten(self.config))
        commit = git_commit(Path(__file__).parent)
        if commit:
            client.set_tag(run_id, "git_commit", commit)
        client.set_tag(run_id, "run_dir", str(run_dir.resolve()))
        if self.config_yaml is not None:
            path = run_dir / "config.yaml"
            path.write_text(self.config_yaml)
            client.log_artifact(run_id, str(path))
        save = getattr(trainer.datamodule, "save_statistics", None)
        if save is not None:
            path = save(run_dir / "statistics.json")
            client.log_artifact(run_id, str(path))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_checkpoints or mlflow_logger(trainer.logger) is None:
            return
        paths: list[Path] = []
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint):
                for p in (cb.best_model_path, cb.last_model_path):
                    if p and Path(p).exists() and Path(p) not in paths:
                        paths.append(Path(p))
        for p in paths:
            log_artifact(trainer.logger, p, "checkpoints")
        self.logged_checkpoints = paths


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    path.write_text(json.dumps(summary, indent=2) + "\n")
