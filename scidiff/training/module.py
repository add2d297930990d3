"""``DiffusionModule``: a denoiser, a ``GaussianDiffusion`` and their training loop.

Randomness of a training step (timesteps, noise, condition dropout and the
network's own dropout) is a pure function of ``(seed, rank, global_step)``; with
the data order of :mod:`scidiff.training.data` and the EMA in the state dict, a
run resumed from a checkpoint takes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion import GaussianDiffusion
from scidiff.diffusion.guidance import drop_conditions
from scidiff.inference.generation import DDIM, sample_model
from scidiff.inference.seeds import key_seed
from scidiff.nets.execution import Accelerated, Execution, check_compile
from scidiff.nets.latent import LatentCodec
from scidiff.training.data import ResumableSampler
from scidiff.training.sharding import is_sharded, shard_denoisers
from scidiff.training.lr import configure_optimization
from scidiff.training.ema import EMA

class LatentCache:
    """The normalised latents of the training split, computed once (posterior mean: a field
    always has the same latent), looked up by the batches' flat store ``index``. Encoding every
    batch again costs more than the denoiser's step on small latents (measured: the quickstart's
    encoder forward ~1.1 GFLOP a batch against ~0.7 for the denoiser's forward and backward)."""

    def __init__(self, indices: Any, latents: Tensor) -> None:
        self.rows = {int(k): i for i, k in enumerate(indices)}
        self.latents = latents

    def lookup(self, index: Tensor | None, device: torch.device) -> Tensor | None:
        """The latents of the batch's samples, or ``None`` when one is not cached."""
        if index is None:
            return None
        rows = [self.rows.get(int(k)) for k in index.tolist()]
        if any(r is None for r in rows):
            return None
        if self.latents.device != device:
            self.latents = self.latents.to(device)
        return self.latents[torch.as_tensor(rows, device=device)]


OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class DiffusionModule(L.LightningModule):
    """Trains ``denoiser`` on the loss of ``diffusion`` (per-sample, averaged over the batch).

    Args:
        denoiser: ``forward(x [B, C, *S], t [B], cond) -> [B, C_out, *S]``.
        diffusion: the :class:`~scidiff.diffusion.GaussianDiffusion` (schedule, prediction, loss).
        optimizer: ``params -> Optimizer`` (a Hydra ``_partial_``, e.g. AdamW).
        lr_scheduler: ``(optimizer, total_steps) -> LRScheduler`` stepped every optimizer
            step (e.g. :func:`scidiff.training.warmup_cosine`), or ``None``; ``total_steps``
            is the trainer's estimate (``max_steps`` when set).
        ema_decay, ema_warmup: the :class:`EMA` of the weights; ``ema_decay=None`` disables
            it. Validation and sampling use the EMA weights when there are any.
        cond_dropout: probability that a training sample uses the null condition
            (classifier-free guidance); only meaningful when batches carry params/fields.
        val_timestep_buckets: the validation loss is also logged per bucket of
            ``T / val_timestep_buckets`` consecutive timesteps (``val/loss_t{lo}-{hi}``).
        seed: seeds every step's randomness together with the rank and the step.
        latent: for latent diffusion, the frozen :class:`~scidiff.nets.latent.LatentCodec`
            (autoencoder and per-channel latent statistics, fitted before training): every
            batch's fields are encoded to the normalised latent the denoiser is trained on.
            It is part of the state dict, so checkpoints hold the autoencoder and its
            statistics; it is neither optimised nor averaged.
        latent_cache: the training split's latents (:class:`LatentCache`), used instead of
            encoding the training batches; ``None``: encode every batch.
        prior: prior preservation (DreamBooth) for a fine-tuning: fields the base model generated
            over its own parameter distribution, ``{"x": [N, C, *S], "params": [N, P], "fields"?}``
            (normalised); each step adds ``prior_weight`` times the loss on a batch of them.
        prior_weight: the prior loss's weight (lambda).
        compile: ``torch.compile`` the denoiser for the training steps (``True`` or a mode, see
            :mod:`scidiff.nets.execution`): compiled once, at the first step, with a dynamic
            batch dimension. Validation and sampling run the EMA copy uncompiled.
        channels_last: channels-last convolutions (2-D and 3-D fields), for the training
            steps' denoiser and the EMA copy.

    Precision is the trainer's (``trainer.precision=bf16-mixed``: autocast around the step,
    weights, optimizer state and EMA in float32); the denoiser's output is cast back to float32
    before the loss.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        diffusion: GaussianDiffusion,
        optimizer: OptimizerFactory,
        lr_scheduler: SchedulerFactory | None = None,
        *,
        ema_decay: float | None = 0.999,
        ema_warmup: int = 10,
        cond_dropout: float = 0.0,
        val_timestep_buckets: int = 10,
        seed: int = 0,
        latent: LatentCodec | None = None,
        latent_cache: LatentCache | None = None,
        prior: Mapping[str, Tensor] | None = None,
        prior_weight: float = 1.0,
        compile: bool | str = False,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_dropout <= 1.0:
            raise ValueError(f"cond_dropout must lie in [0, 1], got {cond_dropout}")
        if not 1 <= val_timestep_buckets <= diffusion.num_timesteps:
            raise ValueError(
                f"val_timestep_buckets must lie in [1, T={diffusion.num_timesteps}], got {val_timestep_buckets}"
            )
        self.denoiser = denoiser
        self.diffusion = diffusion
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.ema = EMA(denoiser, ema_decay, ema_warmup) if ema_decay is not None else None
        self.cond_dropout = float(cond_dropout)
        self.num_buckets = int(val_timestep_buckets)
        self.seed = int(seed)
        self.latent = latent
        self.latent_cache = latent_cache
        self.prior = dict(prior) if prior is not None else None
        self.prior_weight = float(prior_weight)
        check_compile(compile, "module.compile")
        if not isinstance(channels_last, bool):
            raise ValueError(f"module.channels_last: expected true or false, got {channels_last!r}")
        self.execution = Execution(compile=compile, channels_last=channels_last)
        self._runner: Accelerated | None = None
        # Plain python stored with every checkpoint (run id, resolved config); see on_save_checkpoint.
        self.run_info: dict[str, Any] = {}
        self.loaded_run_info: dict[str, Any] = {}
        self._val_sum: Tensor | None = None
        self._val_count: Tensor | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def sampling_net(self) -> nn.Module:
        """The network used for validation and sampling: the EMA copy when there is one."""
        return self.ema.model if self.ema is not None else self.denoiser

    @staticmethod
    def conditioning(batch: Mapping[str, Tensor]) -> Conditioning | None:
        parts = {k: batch.get(k) for k in ("params", "fields", "embedding")}
        if all(v is None for v in parts.values()):
            return None
        return Conditioning(**parts)

    def model_input(self, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
                    ) -> tuple[Tensor, Tensor | None]:
        """What the denoiser learns to generate, and its mask: the batch's fields, or for a latent
        run their normalised latents (no mask: the autoencoder filled the missing points)."""
        if self.latent is None:
            return batch["x"], batch.get("mask")
        if self.latent_cache is not None and self.training:
            cached = self.latent_cache.lookup(batch.get("index"), batch["x"].device)
            if cached is not None:
                return cached, None
        return self.latent.encode(batch["x"], generator), None

    def _generator(self, *keys: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(key_seed(self.seed, *keys))

    def forward(self, x: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        return self.denoiser(x, t, cond)

    def configure_model(self) -> None:
        """Under ``trainer=fsdp`` (Lightning's ``ModelParallelStrategy``, which sets the device mesh
        before calling this): shard the denoiser and its EMA copy alike
        (:func:`scidiff.training.sharding.shard_denoisers`); otherwise nothing."""
        mesh = self.device_mesh
        if mesh is None or getattr(self, "_sharded", False):
            return
        shard_denoisers([self.denoiser] + ([self.ema.model] if self.ema is not None else []), mesh["data_parallel"])
        self._sharded = True

    def training_net(self, dims: int) -> nn.Module:
        """The denoiser the training steps call: ``self.denoiser`` itself, or run with the module's
        :class:`~scidiff.nets.execution.Execution` (built at the first step, for fields of rank ``dims``).
        Not a registered submodule: the weights and the state dict stay ``self.denoiser``'s."""
        if self.execution.is_default:
            return self.denoiser
        if self._runner is None or self._runner.net is not self.denoiser:
            runner = Accelerated(self.denoiser, self.execution, dims)
            if self.execution.channels_last and self.ema is not None:
                self.ema.model.to(memory_format=runner.format)
            self.__dict__["_runner"] = runner  # plain attribute (see the docstring)
        return self._runner

    # ----------------------------------------------------------------- training
    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        key = (0, self.global_rank, self.global_step)
        g = self._generator(*key)
        x, mask = self.model_input(batch, g)
        torch.manual_seed(key_seed(self.seed, 1, *key[1:]))  # network dropout
        t = self.diffusion.sample_timesteps(x.shape[0], x.device, generator=g)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=g)
        cond = drop_conditions(self.conditioning(batch), self.cond_dropout, generator=g)
        net = self.training_net(x.ndim - 2)
        loss = self.diffusion.training_loss(net, x, cond, mask, t=t, noise=noise).mean()
        if self.prior is not None:  # after the instance draws: runs without a prior draw the same numbers
            prior_loss = self.prior_loss(x.shape[0], g)
            self.log("train/instance_loss", loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
            self.log("train/prior_loss", prior_loss, on_step=True, on_epoch=False, batch_size=x.shape[0])
            loss = loss + self.prior_weight * prior_loss
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=x.shape[0])
        sampler = getattr(self.trainer.datamodule, "sampler", None) if self._trainer is not None else None
        if isinstance(sampler, ResumableSampler):
            sampler.batches_done = batch_idx + 1
        return loss

    def prior_loss(self, batch_size: int, g: torch.Generator) -> Tensor:
        """The diffusion loss on ``batch_size`` prior fields drawn with ``g`` (prior preservation)."""
        if self.prior["x"].device != self.device:
            self.prior = {k: v.to(self.device) for k, v in self.prior.items()}
        n = self.prior["x"].shape[0]
        idx = torch.randint(0, n, (batch_size,), device=self.device, generator=g)
        x = self.prior["x"][idx]
        t = self.diffusion.sample_timesteps(batch_size, x.device, generator=g)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=g)
        cond = self.conditioning({k: v[idx] for k, v in self.prior.items() if k in ("params", "fields", "embedding")})
        cond = drop_conditions(cond, self.cond_dropout, generator=g)
        return self.diffusion.training_loss(self.training_net(x.ndim - 2), x, cond, None, t=t, noise=noise).mean()

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # inside the step, so that a checkpoint written at this batch's end holds the new average
        if self.ema is not None:
            self.ema.update(self.denoiser)

    def configure_optimizers(self) -> Any:
        # total_steps: the trainer's estimate (max_steps when set)
        # only what is trained (a LoRA fine-tuning freezes the base weights)
        return configure_optimization(self.optimizer_factory, self.lr_scheduler_factory,
                                      [p for p in self.denoiser.parameters() if p.requires_grad],
                                      self.trainer.estimated_stepping_batches)

    # --------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_sum = torch.zeros(self.num_buckets, dtype=torch.float64, device=self.device)
        self._val_count = torch.zeros(self.num_buckets, dtype=torch.float64, device=self.device)

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        # the same timesteps and noise at every validation: curves compare weights, not draws
        g = self._generator(2, self.global_rank, batch_idx)
        x, mask = self.model_input(batch, g)
        t = torch.randint(0, self.diffusion.num_timesteps, (x.shape[0],), device=x.device, generator=g)
        noise = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=g)
        loss = self.diffusion.training_loss(
            self.sampling_net, x, self.conditioning(batch), mask, t=t, noise=noise
        )
        bucket = t * self.num_buckets // self.diffusion.num_timesteps
        self._val_sum.index_add_(0, bucket, loss.detach().to(torch.float64))
        self._val_count.index_add_(0, bucket, torch.ones_like(loss, dtype=torch.float64))

    def on_validation_epoch_end(self) -> None:
        # sums over every rank's samples, so each rank logs the same numbers
        total = self.trainer.strategy.reduce(torch.stack([self._val_sum, self._val_count]), reduce_op="sum")
        sums, counts = total[0], total[1]
        self.log("val/loss", (sums.sum() / counts.sum().clamp_min(1)).float(), prog_bar=True, sync_dist=True)
        T, K = self.diffusion.num_timesteps, self.num_buckets
        for k in range(K):
            if counts[k] > 0:
                lo, hi = k * T // K, (k + 1) * T // K - 1
                # already summed over ranks: sync_dist averages identical values
                self.log(f"val/loss_t{lo:04d}-{hi:04d}", (sums[k] / counts[k]).float(), sync_dist=True)

    def on_train_end(self) -> None:
        # DDP keeps replicas equal; a checksum per rank (float64 sums of the weights and of
        # index-weighted weights) makes that visible in the run summary. Sharded ranks (FSDP)
        # hold different parts of the weights: nothing to compare.
        if self._trainer is not None and is_sharded(self.trainer):
            self.rank_checksums = None
            return
        flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in self.denoiser.parameters()])
        idx = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
        checksum = torch.stack([flat.sum(), (flat * idx).sum(), (flat * flat).sum()])
        gathered = self.all_gather(checksum)
        self.rank_checksums = gathered.reshape(-1, 3).cpu().tolist()

    # ----------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        shape: tuple[int, ...],
        cond: Conditioning | None = None,
        *,
        num_steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """DDIM samples of fields ``shape = [B, C, *S]`` (normalised units) from the EMA weights,
        through the generation path every command uses (:func:`scidiff.inference.generation.sample_model`);
        a latent run samples latents and decodes them."""
        if self.latent is not None:
            shape = (shape[0], *self.latent.latent_shape(shape[2:]))
        x_T = torch.randn(shape, device=self.device, generator=generator)
        net = self.sampling_net
        was_training = net.training
        net.eval()
        try:
            out = sample_model(net, self.diffusion, x_T, cond, sampler=DDIM(steps=num_steps, eta=eta),
                               generator=generator)
        finally:
            net.train(was_training)
        return out if self.latent is None else self.latent.decode(out)

    # -------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["scidiff"] = dict(self.run_info)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.loaded_run_info = dict(checkpoint.get("scidiff", {}))
