"""``ContrastiveModule``: a contrastive field encoder (CLIP for fields), trained by ``scidiff-train``.

``scidiff-train stage=contrastive`` trains a :class:`~scidiff.nets.contrastive.ContrastiveEncoder`
on the pairs (field, condition) of the training split with the symmetric InfoNCE loss
(:mod:`scidiff.nets.contrastive`): the fields and the conditions (normalised parameters and/or
embedding) are those of the data config, normalised with the run's statistics. Validation
logs, over every rank's samples:

* ``val/loss``: the InfoNCE loss within each validation batch (what the best checkpoint monitors);
* ``val/top1``, ``val/top5``: how often a held-out field's own condition is the most similar
  (among the five most similar) of all the validation split's distinct conditions;
  ``val/candidates``: their number (chance is ``k / candidates``);
* ``val/similarity``: the mean cosine similarity of a field with its own condition.

The data order comes from :mod:`scidiff.training.data`, so a resumed run takes exactly the
steps of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor

from scidiff.conditioning import Conditioning
from scidiff.nets.contrastive import (
    ContrastiveEncoder,
    distinct_keys,
    info_nce,
    retrieval_accuracy,
)
from scidiff.training.data import ResumableSampler
from scidiff.training.lr import configure_optimization

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def batch_condition(batch: Mapping[str, Tensor]) -> Conditioning:
    """The batch's normalised parameters and embedding (what the condition encoder reads)."""
    return Conditioning(params=batch.get("params"), embedding=batch.get("embedding"))


class ContrastiveModule(L.LightningModule):
    """Trains ``encoder`` on the InfoNCE loss of the batch's (field, condition) pairs.

    Args:
        encoder: the :class:`ContrastiveEncoder` (the CLI builds it from ``contrastive``).
        optimizer, lr_scheduler: as for :class:`~scidiff.training.DiffusionModule`.
    """

    def __init__(self, encoder: ContrastiveEncoder, optimizer: OptimizerFactory,
                 lr_scheduler: SchedulerFactory | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.run_info: dict[str, Any] = {}
        self.loaded_run_info: dict[str, Any] = {}
        self._val: dict[str, list[Tensor]] = {}

    def forward(self, x: Tensor, cond: Conditioning) -> tuple[Tensor, Tensor]:
        return self.encoder(x, cond)

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        z_field, z_cond = self.encoder(batch["x"], batch_condition(batch))
        loss = info_nce(z_field, z_cond, self.encoder.scale())
        b = batch["x"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        self.log("train/logit_scale", self.encoder.scale(), on_step=True, on_epoch=False, batch_size=b)
        sampler = getattr(self.trainer.datamodule, "sampler", None) if self._trainer is not None else None
        if isinstance(sampler, ResumableSampler):
            sampler.batches_done = batch_idx + 1
        return loss

    def configure_optimizers(self) -> Any:
        return configure_optimization(self.optimizer_factory, self.lr_scheduler_factory, self.encoder.parameters(),
                                      self.trainer.estimated_stepping_batches)

    # --------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val = {"field": [], "cond": [], "raw": [], "loss": []}

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        cond = batch_condition(batch)
        z_field, z_cond = self.encoder(batch["x"], cond)
        raw = torch.cat([t for t in (cond.params, cond.embedding) if t is not None], dim=1)
        self._val["field"].append(z_field)
        self._val["cond"].append(z_cond)
        self._val["raw"].append(raw)
        self._val["loss"].append(info_nce(z_field, z_cond, self.encoder.scale()).reshape(1) * len(raw))

    def on_validation_epoch_end(self) -> None:
        flat = {k: torch.cat(v) for k, v in self._val.items()}
        if self.trainer.world_size > 1:  # every rank's samples: [world, N, ...] -> [world * N, ...]
            flat = {k: self.all_gather(v).flatten(0, 1) for k, v in flat.items()}
        n = flat["field"].shape[0]
        z_keys, index = distinct_keys(flat["raw"], flat["cond"])
        acc = retrieval_accuracy(flat["field"], z_keys, index, k=(1, 5))
        similarity = (flat["field"] * flat["cond"]).sum(-1).mean()
        self.log("val/loss", (flat["loss"].sum() / max(n, 1)).float(), prog_bar=True)
        self.log("val/top1", acc[1], prog_bar=True)
        self.log("val/top5", acc[5])
        self.log("val/candidates", float(len(z_keys)))
        self.log("val/similarity", similarity.float())

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scidiff"] = dict(self.run_info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_run_info = dict(checkpoint.get("scidiff", {}))


class AsStep(torch.nn.Module):
    """The encoder pair behind the denoiser signature, for the step-cost estimate."""

    def __init__(self, encoder: ContrastiveEncoder) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        z_field, z_cond = self.encoder(x, cond)
        return z_field @ z_cond.T


__all__ = ["AsStep", "ContrastiveModule", "batch_condition"]
