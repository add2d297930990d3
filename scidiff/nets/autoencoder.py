"""A KL-regularised convolutional autoencoder for fields of spatial rank 1, 2 or 3: the
first stage of latent diffusion (Rombach et al. 2022), and the losses it is trained with.

The encoder maps a normalised field ``[B, C, *S]`` to a diagonal Gaussian posterior over a
latent ``[B, L, *S/f]``, with a downsampling factor ``f`` per axis (a power of two; a lat/lon
grid may be compressed by 4 in longitude and 2 in latitude). The decoder maps a latent back.
Convolutions pad with the run's boundary per axis (``circular`` for periodic axes), so a
periodic field stays periodic through the bottleneck. There is no attention: fields of
1-3 spatial dimensions at the resolutions this is for are local enough for convolutions,
and the cost stays linear in the number of points (the point of the first stage).

The losses are for fields, not photographs: a pixel term (L1 and/or L2), a spectral term
(the mismatch of the log radially averaged power spectra, which keeps the small scales a
pixel loss blurs) and the KL term of the posterior. Masked points (missing data) are left
out of the pixel term and filled with the data's values in the spectral one.

Torch only: no Lightning, Hydra or IO here (:mod:`scidiff.training.autoencoder` trains it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scidiff.nets.layers import Conv, check_dims, check_norm, norm_layer, padding_modes, per_axis, zero_module


class DiagonalGaussian:
    """The encoder's posterior ``q(z | x) = N(mean, diag(exp(logvar)))``, ``[B, L, *S']``.

    ``logvar`` is clamped to ``[-30, 20]`` (as in the latent-diffusion autoencoders) so a
    collapsed channel cannot produce infinities.
    """

    def __init__(self, mean: Tensor, logvar: Tensor) -> None:
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """``KL(q || N(0, I))`` per sample ``[B]``, in nats (summed over the latent)."""
        kl = 0.5 * (self.mean.square() + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).sum(1)


class _Block(nn.Module):
    """Residual block ``x + conv(SiLU(N(conv(SiLU(N(x))))))``, N GroupNorm or none (1x1 skip when widths differ)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, padding, norm_group_channels: int,
                 norm: str = "group") -> None:
        super().__init__()
        self.norm1 = norm_layer(in_channels, norm, min_group_channels=norm_group_channels)
        self.conv1 = Conv(dims, in_channels, out_channels, 3, padding=padding)
        self.norm2 = norm_layer(out_channels, norm, min_group_channels=norm_group_channels)
        self.conv2 = zero_module(Conv(dims, out_channels, out_channels, 3, padding=padding))
        self.skip = nn.Identity() if in_channels == out_channels else Conv(dims, in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class _Resample(nn.Module):
    """A 3-wide convolution with stride ``factors`` (down) or after nearest upsampling by them (up)."""

    def __init__(self, dims: int, in_channels: int, out_channels: int, factors: tuple[int, ...], up: bool,
                 padding) -> None:
        super().__init__()
        self.factors, self.up = factors, up
        self.conv = Conv(dims, in_channels, out_channels, 3, padding=padding)
        if not up:
            self.conv.conv.stride = factors

    def forward(self, x: Tensor) -> Tensor:
        if self.up and any(f > 1 for f in self.factors):
            x = F.interpolate(x, scale_factor=tuple(float(f) for f in self.factors), mode="nearest")
        return self.conv(x)


def _factors(downsample, dims: int) -> tuple[int, ...]:
    factors = per_axis(downsample, dims, "downsample")
    for f in factors:
        if isinstance(f, bool) or not isinstance(f, int) or f < 1 or f & (f - 1):
            raise ValueError(f"downsample: expected a power of two per axis (1, 2, 4, 8...), got {downsample!r}")
    return tuple(int(f) for f in factors)


class FieldAutoencoder(nn.Module):
    """Convolutional encoder/decoder with a diagonal Gaussian latent, for fields of rank 1-3.

    Args:
        in_channels: channels ``C`` of the (normalised) field.
        dims: spatial rank (1, 2 or 3).
        latent_channels: channels ``L`` of the latent.
        downsample: the factor per axis (a power of two, or one per axis): the latent grid is
            ``S / downsample``; every grid size must be divisible by it.
        model_channels: width of the first level; level ``i`` has ``model_channels *
            channel_mult[i]`` (``len(channel_mult)`` = number of halvings + 1; default
            ``1, 2, 4, 4, ...``).
        num_res_blocks: residual blocks per level.
        padding: ``zeros``, ``circular`` or ``reflect``, or one per axis (the run's ``boundary``).
        norm_group_channels: the fewest channels in each GroupNorm group (default 4; 1 rebuilds
            autoencoders trained before this key existed): see :class:`~scidiff.nets.unet.UNet`.
        norm: ``group`` (GroupNorm) or ``none`` (no normalisation layers), as the UNet's:
            GroupNorm's whole-sample statistics couple a field's scales, in the reconstruction
            as in a denoiser's output (``docs/architecture.md``, "Normalisation groups").

    ``encode(x) -> DiagonalGaussian``; ``decode(z) -> x``; ``forward(x)`` reconstructs
    through a posterior sample (``sample_posterior=False``: through its mean).
    """

    def __init__(
        self,
        in_channels: int,
        dims: int = 2,
        latent_channels: int = 4,
        downsample: int | Sequence[int] = 4,
        model_channels: int = 64,
        channel_mult: Sequence[int] | None = None,
        num_res_blocks: int = 1,
        padding="zeros",
        norm_group_channels: int = 4,
        norm: str = "group",
    ) -> None:
        super().__init__()
        self.dims = check_dims(dims)
        self.norm = check_norm(norm)
        for key, value in (("in_channels", in_channels), ("latent_channels", latent_channels),
                           ("model_channels", model_channels), ("num_res_blocks", num_res_blocks),
                           ("norm_group_channels", norm_group_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key}: expected a positive integer, got {value!r}")
        self.in_channels, self.latent_channels = int(in_channels), int(latent_channels)
        self.downsample = _factors(downsample, self.dims)
        self.padding = padding_modes(padding, self.dims)
        levels = max(int(math.log2(f)) for f in self.downsample)
        mult = tuple(channel_mult) if channel_mult is not None else tuple(min(2**i, 4) for i in range(levels + 1))
        if len(mult) != levels + 1 or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in mult):
            raise ValueError(f"channel_mult: expected {levels + 1} positive integers (one per level: {levels} "
                             f"halvings for downsample {list(self.downsample)}, + 1), got {list(mult)}")
        widths = [model_channels * m for m in mult]
        # the stride of each halving, per axis: an axis stops halving once it reached its factor
        strides = [tuple(2 if f > 2**i else 1 for f in self.downsample) for i in range(levels)]
        pad, ng, nk = self.padding, int(norm_group_channels), self.norm

        enc: list[nn.Module] = [Conv(dims, in_channels, widths[0], 3, padding=pad)]
        for i in range(levels):
            enc += [_Block(dims, widths[i], widths[i], pad, ng, nk) for _ in range(num_res_blocks)]
            enc.append(_Resample(dims, widths[i], widths[i + 1], strides[i], up=False, padding=pad))
        enc += [_Block(dims, widths[-1], widths[-1], pad, ng, nk) for _ in range(num_res_blocks + 1)]
        enc += [norm_layer(widths[-1], nk, min_group_channels=ng), nn.SiLU(),
                Conv(dims, widths[-1], 2 * latent_channels, 3, padding=pad)]
        self.encoder = nn.Sequential(*enc)

        dec: list[nn.Module] = [Conv(dims, latent_channels, widths[-1], 3, padding=pad)]
        dec += [_Block(dims, widths[-1], widths[-1], pad, ng, nk) for _ in range(num_res_blocks + 1)]
        for i in reversed(range(levels)):
            dec.append(_Resample(dims, widths[i + 1], widths[i], strides[i], up=True, padding=pad))
            dec += [_Block(dims, widths[i], widths[i], pad, ng, nk) for _ in range(num_res_blocks)]
        dec += [norm_layer(widths[0], nk, min_group_channels=ng), nn.SiLU(),
                Conv(dims, widths[0], in_channels, 3, padding=pad)]
        self.decoder = nn.Sequential(*dec)

    # ------------------------------------------------------------------ shapes
    def latent_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """``(L, *S / downsample)`` of a field on ``spatial_shape``; ``ValueError`` naming
        ``downsample`` when a size is not divisible by its factor."""
        shape = tuple(int(s) for s in spatial_shape)
        if len(shape) != self.dims:
            raise ValueError(f"the autoencoder is {self.dims}-D, got a grid of shape {shape}")
        bad = [(i, s, f) for i, (s, f) in enumerate(zip(shape, self.downsample)) if s % f]
        if bad:
            i, s, f = bad[0]
            raise ValueError(f"downsample: grid axis {i} has {s} points, not divisible by the downsampling factor {f} "
                             f"(grid {shape}, downsample {list(self.downsample)})")
        return (self.latent_channels, *(s // f for s, f in zip(shape, self.downsample)))

    def _check(self, x: Tensor, channels: int, name: str) -> None:
        if x.ndim != self.dims + 2 or x.shape[1] != channels:
            raise ValueError(f"{name} must have shape [B, {channels}, {', '.join('S' + str(i) for i in range(self.dims))}]"
                             f", got {tuple(x.shape)}")

    # ------------------------------------------------------------------ maps
    def encode(self, x: Tensor) -> DiagonalGaussian:
        """The posterior over the latent of ``x [B, C, *S]`` (normalised units)."""
        self._check(x, self.in_channels, "x")
        self.latent_shape(x.shape[2:])
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: Tensor) -> Tensor:
        """The field ``[B, C, *S]`` of a latent ``z [B, L, *S']``."""
        self._check(z, self.latent_channels, "z")
        return self.decoder(z)

    def forward(self, x: Tensor, *, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


# --------------------------------------------------------------------------- losses
@lru_cache(maxsize=32)
def _radial_bins(shape: tuple[int, ...], device: str) -> tuple[Tensor, Tensor]:
    """Integer radial wavenumber of every ``rfftn`` mode of a ``shape`` grid (in units of the
    fundamental of the longest axis), and the mode count per bin."""
    n_max = max(shape)
    axes = [torch.fft.fftfreq(n, dtype=torch.float64) * n_max for n in shape[:-1]]
    axes.append(torch.fft.rfftfreq(shape[-1], dtype=torch.float64) * n_max)
    grids = torch.meshgrid(*axes, indexing="ij")
    k = torch.sqrt(sum(g.square() for g in grids)).round().long().reshape(-1)
    counts = torch.bincount(k).to(torch.float64)
    return k.to(device), counts.to(device)


def radial_power(x: Tensor) -> Tensor:
    """Radially averaged power spectrum ``[B, C, K]`` of ``x [B, C, *S]`` (orthonormal FFT,
    bins of unit width in the wavenumber of the longest axis; empty bins are 0)."""
    spatial = tuple(range(2, x.ndim))
    power = torch.fft.rfftn(x.float(), dim=spatial, norm="ortho").abs().square().flatten(2)
    k, counts = _radial_bins(tuple(x.shape[2:]), str(x.device))
    binned = torch.zeros(*power.shape[:2], counts.numel(), device=x.device, dtype=power.dtype)
    binned.index_add_(2, k, power)
    return binned / counts.clamp_min(1).to(power.dtype)


def spectral_loss(recon: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample ``[B]`` mean squared difference of the natural-log radial power spectra of
    ``recon`` and ``target`` over the channels and the non-empty wavenumber bins. Masked
    points (``mask`` 0) take the target's values in ``recon``, so they do not count."""
    if mask is not None:
        recon = torch.where(mask.bool(), recon, target)
    p_r, p_t = radial_power(recon), radial_power(target)
    floor = 1e-6 * p_t.mean(dim=2, keepdim=True).detach() + 1e-12
    d = torch.log(p_r + floor) - torch.log(p_t + floor)
    k, counts = _radial_bins(tuple(target.shape[2:]), str(target.device))
    keep = (counts > 0).to(d.dtype)
    return (d.square() * keep).sum(2).mean(1) / keep.sum()


def pixel_loss(recon: Tensor, target: Tensor, mask: Tensor | None = None, *, l1: float = 1.0,
               l2: float = 0.0) -> Tensor:
    """Per-sample ``[B]`` ``l1 * mean|r - x| + l2 * mean (r - x)^2`` over the observed points."""
    diff = recon - target
    if mask is None:
        mask = torch.ones_like(diff)
    w = mask.to(diff.dtype)
    n = w.flatten(1).sum(1).clamp_min(1.0)
    out = torch.zeros(diff.shape[0], device=diff.device, dtype=diff.dtype)
    if l1:
        out = out + l1 * (diff.abs() * w).flatten(1).sum(1) / n
    if l2:
        out = out + l2 * (diff.square() * w).flatten(1).sum(1) / n
    return out


__all__ = ["DiagonalGaussian", "FieldAutoencoder", "pixel_loss", "radial_power", "spectral_loss"]
