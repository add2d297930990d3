"""``AutoencoderModule``: the first stage of latent diffusion, trained by ``scidiff-train``.

A :class:`~scidiff.nets.autoencoder.FieldAutoencoder` learns to reconstruct the normalised
fields of the training split through its latent, with the loss

    l1 * |x - D(z)| + l2 * (x - D(z))^2 + spectral * log-spectrum mismatch + kl * KL(q(z|x) || N(0, I))

(:mod:`scidiff.nets.autoencoder`; masked points excluded), ``z`` a draw from the posterior.
Validation reconstructs through the posterior mean (what a latent diffusion run encodes
with) and logs, summed over every rank's samples:

* ``val/rmse_<variable>``: the reconstruction's root-mean-square error per variable, in
  the variable's physical units, over the observed points;
* ``val/log_spectrum_rmse``: the root-mean-square of the natural-log ratio of the radially
  averaged power spectra (0.1: the spectra differ by ~10 % on average over wavenumbers);
* ``val/loss`` (the training loss at the posterior mean, what the best checkpoint
  monitors) and ``val/kl`` (nats per latent dimension).

Step randomness (the posterior draw) is a pure function of ``(seed, rank, global_step)``,
and the data order comes from :mod:`scidiff.training.data`, so a resumed run takes
exactly the steps of an uninterrupted one, as for diffusion runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from scidiff.inference.seeds import key_seed
from scidiff.nets.autoencoder import DiagonalGaussian, FieldAutoencoder, pixel_loss, spectral_loss
from scidiff.training.data import ResumableSampler
from scidiff.training.lr import configure_optimization

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


def _weight(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"module.{key}: expected a number >= 0, got {value!r}")
    return float(value)


class AutoencoderModule(L.LightningModule):
    """Trains ``autoencoder`` on the reconstruction loss above (module docstring).

    Args:
        autoencoder: the :class:`FieldAutoencoder` (the CLI builds it from ``autoencoder``).
        optimizer, lr_scheduler: as for :class:`~scidiff.training.DiffusionModule`.
        l1_weight, l2_weight: weights of the pixel terms (mean over observed points).
        spectral_weight: weight of the log power-spectrum mismatch.
        kl_weight: weight of the KL term (per sample, summed over the latent, divided by the
            number of field values so that it is on the scale of the pixel terms); small
            (1e-6 - 1e-3): it keeps the latent near N(0, I) without blurring the fields.
        seed: seeds the posterior draws with the rank and the step.
    """

    def __init__(
        self,
        autoencoder: FieldAutoencoder,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        *,
        l1_weight: float = 0.0,
        l2_weight: float = 1.0,
        spectral_weight: float = 0.1,
        kl_weight: float = 1.0e-4,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.l1_weight = _weight("l1_weight", l1_weight)
        self.l2_weight = _weight("l2_weight", l2_weight)
        self.spectral_weight = _weight("spectral_weight", spectral_weight)
        self.kl_weight = _weight("kl_weight", kl_weight)
        if self.l1_weight == 0 and self.l2_weight == 0 and self.spectral_weight == 0:
            raise ValueError("module: l1_weight, l2_weight and spectral_weight are all 0: nothing to reconstruct")
        self.seed = int(seed)
        self.run_info: dict[str, Any] = {}
        self.loaded_run_info: dict[str, Any] = {}
        self._val: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction through the posterior mean."""
        return self.autoencoder(x, sample_posterior=False)[0]

    def loss_terms(self, x: Tensor, recon: Tensor, posterior: DiagonalGaussian, mask: Tensor | None
                   ) -> dict[str, Tensor]:
        """Per-sample ``[B]`` terms and their weighted ``total``."""
        terms = {"pixel": pixel_loss(recon, x, mask, l1=self.l1_weight, l2=self.l2_weight)}
        terms["spectral"] = spectral_loss(recon, x, mask) if self.spectral_weight else torch.zeros_like(terms["pixel"])
        terms["kl"] = posterior.kl() / x[0].numel()
        terms["total"] = terms["pixel"] + self.spectral_weight * terms["spectral"] + self.kl_weight * terms["kl"]
        return terms

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        x, mask = batch["x"], batch.get("mask")
        g = torch.Generator(device=self.device).manual_seed(key_seed(self.seed, 0, self.global_rank, self.global_step))
        recon, posterior = self.autoencoder(x, sample_posterior=True, generator=g)
        terms = {k: v.mean() for k, v in self.loss_terms(x, recon, posterior, mask).items()}
        b = x.shape[0]
        self.log("train/loss", terms["total"], prog_bar=True, on_step=True, on_epoch=False, batch_size=b)
        for k in ("pixel", "spectral", "kl"):
            self.log(f"train/{k}", terms[k], on_step=True, on_epoch=False, batch_size=b)
        sampler = getattr(self.trainer.datamodule, "sampler", None) if self._trainer is not None else None
        if isinstance(sampler, ResumableSampler):
            sampler.batches_done = batch_idx + 1
        return terms["total"]

    def configure_optimizers(self) -> Any:
        # total_steps: the trainer's estimate (max_steps when set)
        return configure_optimization(self.optimizer_factory, self.lr_scheduler_factory, self.autoencoder.parameters(),
                                      self.trainer.estimated_stepping_batches)

    # --------------------------------------------------------------- validation
    def _physical(self, x: Tensor) -> Tensor:
        dm = self.trainer.datamodule if self._trainer is not None else None
        inverse = getattr(dm, "inverse_transform", None)
        return inverse(x.double()) if inverse is not None else x.double()

    def on_validation_epoch_start(self) -> None:
        c = self.autoencoder.in_channels
        # per channel: squared error, point count; then loss, kl, log-spectrum sq. error, samples
        self._val = torch.zeros(2 * c + 4, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        x, mask = batch["x"], batch.get("mask")
        posterior = self.autoencoder.encode(x)
        recon = self.autoencoder.decode(posterior.mode())
        terms = self.loss_terms(x, recon, posterior, mask)
        c = x.shape[1]
        w = torch.ones_like(x, dtype=torch.float64) if mask is None else torch.broadcast_to(mask, x.shape).double()
        err = (self._physical(recon) - self._physical(x)).nan_to_num(0.0).square() * w
        dims = [0, *range(2, x.ndim)]
        self._val[:c] += err.sum(dims)
        self._val[c:2 * c] += w.sum(dims)
        self._val[2 * c] += terms["total"].double().sum()
        self._val[2 * c + 1] += (posterior.kl().double() / posterior.mean[0].numel()).sum()
        self._val[2 * c + 2] += spectral_loss(recon, x, mask).double().sum()
        self._val[2 * c + 3] += x.shape[0]

    def on_validation_epoch_end(self) -> None:
        total = self.trainer.strategy.reduce(self._val, reduce_op="sum")  # every rank's samples
        c = self.autoencoder.in_channels
        n = total[2 * c + 3].clamp_min(1)
        self.log("val/loss", (total[2 * c] / n).float(), prog_bar=True, sync_dist=True)
        self.log("val/kl", (total[2 * c + 1] / n).float(), sync_dist=True)
        self.log("val/log_spectrum_rmse", (total[2 * c + 2] / n).sqrt().float(), sync_dist=True)
        dm = self.trainer.datamodule
        names = list(getattr(getattr(dm, "metadata", None), "channel_names", ()) or [f"channel{i}" for i in range(c)])
        for i, name in enumerate(names):
            rmse = (total[i] / total[c + i].clamp_min(1)).sqrt()
            self.log(f"val/rmse_{name}", rmse.float(), prog_bar=len(names) == 1, sync_dist=True)

    # ----------------------------------------------------------------- figures
    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """Reconstructions through the posterior mean (eval mode), normalised units."""
        was = self.autoencoder.training
        self.autoencoder.eval()
        try:
            return self(x)
        finally:
            self.autoencoder.train(was)

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scidiff"] = dict(self.run_info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_run_info = dict(checkpoint.get("scidiff", {}))


class AsDenoiser(nn.Module):
    """The autoencoder behind the denoiser signature, for the step-cost estimate."""

    def __init__(self, autoencoder: FieldAutoencoder) -> None:
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        return self.autoencoder(x, sample_posterior=False)[0]


__all__ = ["AsDenoiser", "AutoencoderModule"]
