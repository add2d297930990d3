"""The latent space of a latent diffusion model: a frozen autoencoder and the per-channel
normalisation of its latent.

The diffusion model of a latent run works on ``z = (E(x) - mu) / sigma``: ``E(x)`` is the
autoencoder's posterior mean (``posterior="mean"``, deterministic: the same field always
has the same latent) or a draw from it (``posterior="sample"``), and ``mu``, ``sigma`` are
the latent's mean and standard deviation per channel over the training split, computed
once when the run starts (:meth:`LatentCodec.fit`) and stored in its checkpoints as
buffers. This replaces the single magic scale factor of Stable Diffusion (0.18215) with
statistics of the data at hand, so the diffusion's prior ``N(0, I)`` matches the latent
channel by channel. ``decode`` inverts it: ``x = D(sigma * z + mu)``.

Torch only. The fields given and returned are in the data's normalised units (the
autoencoder was trained on them); :class:`scidiff.inference.checkpoint.Pretrained` adds
the physical units.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from scidiff.nets.autoencoder import FieldAutoencoder

Posterior = Literal["mean", "sample"]


class LatentCodec(nn.Module):
    """A frozen :class:`FieldAutoencoder` with the per-channel statistics of its latent.

    Args:
        autoencoder: the trained first stage; frozen here (``requires_grad_(False)``, eval mode).
        posterior: ``mean`` (the posterior mean, the default) or ``sample`` (a draw from it at
            every encoding, which trains the diffusion on the latent distribution the decoder
            saw in training).
    """

    def __init__(self, autoencoder: FieldAutoencoder, posterior: Posterior = "mean") -> None:
        super().__init__()
        if posterior not in ("mean", "sample"):
            raise ValueError(f"latent.posterior: expected mean or sample, got {posterior!r}")
        self.autoencoder = autoencoder.eval().requires_grad_(False)
        self.posterior = posterior
        c = autoencoder.latent_channels
        self.register_buffer("mean", torch.zeros(c, dtype=torch.float64))
        self.register_buffer("std", torch.ones(c, dtype=torch.float64))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def train(self, mode: bool = True) -> LatentCodec:  # the autoencoder stays in eval mode
        super().train(mode)
        self.autoencoder.eval()
        return self

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.latent_channels

    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        return self.autoencoder.latent_shape(spatial_shape)

    def _view(self, v: Tensor, ndim: int, dtype: torch.dtype) -> Tensor:
        return v.to(dtype).reshape(1, -1, *([1] * (ndim - 2)))

    @torch.no_grad()
    def raw(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The autoencoder's latent of ``x`` (unnormalised), as ``posterior`` says."""
        post = self.autoencoder.encode(x)
        return post.sample(generator) if self.posterior == "sample" else post.mode()

    @torch.no_grad()
    def fit(self, batches: Iterable[Tensor], generator: torch.Generator | None = None) -> None:
        """Per-channel mean and standard deviation of the latent over ``batches`` of fields
        (float64 sums); the codec is then ``fitted``."""
        self.fit_latents(self.raw(x, generator) for x in batches)

    @torch.no_grad()
    def fit_latents(self, latents: Iterable[Tensor]) -> None:
        """:meth:`fit` from the autoencoder's latents (:meth:`raw`) already computed."""
        n, s1, s2 = 0, 0.0, 0.0
        for z in latents:
            z = z.to(torch.float64)
            z = z.transpose(0, 1).reshape(z.shape[1], -1)
            n += z.shape[1]
            s1 = s1 + z.sum(1)
            s2 = s2 + z.square().sum(1)
        if n == 0:
            raise ValueError("latent: no training fields to compute the latent statistics from")
        mean = s1 / n
        var = (s2 / n - mean.square()).clamp_min(0.0)
        std = var.sqrt()
        if (std <= 1e-8).any():
            dead = [int(i) for i in torch.nonzero(std <= 1e-8).flatten()]
            raise ValueError(f"latent: latent channels {dead} of the autoencoder are constant over the training data "
                             "(a collapsed channel); retrain the autoencoder with fewer latent_channels")
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.fitted.fill_(True)

    @torch.no_grad()
    def encode(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Normalised field ``[B, C, *S]`` -> normalised latent ``[B, L, *S']``."""
        return self.normalise(self.raw(x, generator))

    def normalise(self, z: Tensor) -> Tensor:
        """The autoencoder's latent (:meth:`raw`) -> the normalised latent the denoiser sees."""
        return (z - self._view(self.mean, z.ndim, z.dtype)) / self._view(self.std, z.ndim, z.dtype)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latent ``[B, L, *S']`` -> normalised field ``[B, C, *S]`` (differentiable,
        for guidance through the decoder)."""
        dtype = z.dtype
        z = z * self._view(self.std, z.ndim, dtype) + self._view(self.mean, z.ndim, dtype)
        return self.autoencoder.decode(z.to(next(self.autoencoder.parameters()).dtype)).to(dtype)


__all__ = ["LatentCodec", "Posterior"]
