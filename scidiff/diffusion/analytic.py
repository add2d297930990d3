"""Exact denoisers for Gaussian data: the reference every sampler and bound is checked against.

For data x_0 ~ N(mu, s^2) independently per element (mu, s broadcastable to
``[C, *S]``) the noisy marginal is x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and

    E[x_0 | x_t] = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    Var[x_0 | x_t] = s^2 (1 - ab) / (ab s^2 + 1 - ab)

(ab = alpha-bar_t). :class:`GaussianDataDenoiser` returns the exact eps, x0, v or
EDM's F for the diffusion's ``prediction`` (``GaussianDiffusion.target`` of the exact
E[x_0 | x_t] and E[eps | x_t]): the minimiser of the training loss, so a sampler or a
bound run with it shows the error of the algorithm alone. Like any denoiser it is
called on the model input (c_in x_t for ``"edm"``) and recovers x_t from it with
``GaussianDiffusion.unscale_model_input``. :func:`exact_output` does that round trip
for every exact denoiser (also
:class:`~scidiff.diffusion.analytic_full.FullCovarianceGaussianDenoiser`): each gives
only its posterior means, and the diffusion alone converts them to its parameterisation.

:class:`GaussianFieldDenoiser` does the same for a stationary periodic Gaussian
random field (power spectrum P(k)): the Wiener filter, diagonal in Fourier space.
Both give the exact log-density of their data (``log_prob``), against which the
variational bound and the ODE likelihood are tested.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.process import GaussianDiffusion


# (x_t, ab) -> (E[x_0 | x_t], E[eps | x_t]), float64, shaped like x_t; ab = alpha-bar_t [B, 1, ...]
PosteriorMeans = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def exact_output(diffusion: GaussianDiffusion, x_in: Tensor, t: Tensor, posterior_means: PosteriorMeans) -> Tensor:
    """The output of a Bayes-optimal denoiser for the model input ``x_in``.

    x_t is recovered from ``x_in`` (x_t, or c_in x_t for ``"edm"``) in float64, the
    exact posterior means come from ``posterior_means(x_t, ab)``, and
    ``GaussianDiffusion.target`` turns them into the diffusion's ``prediction``
    (eps, x0, v or EDM's F), returned in ``x_in``'s dtype.
    """
    x_t = diffusion.unscale_model_input(x_in.to(torch.float64), t)
    ab = diffusion.coef("alphas_cumprod", t, x_t)
    x0, eps = posterior_means(x_t, ab)
    return diffusion.target(x0, eps, t).to(x_in.dtype)


class GaussianDataDenoiser(nn.Module):
    """The Bayes-optimal denoiser for x_0 ~ N(mean, std^2), elementwise.

    Args:
        diffusion: supplies alpha-bar_t and the output parameterisation.
        mean, std: broadcastable to one sample ``[C, *S]`` (scalars allowed).
    """

    def __init__(self, diffusion: GaussianDiffusion, mean: Tensor | float, std: Tensor | float) -> None:
        super().__init__()
        std = torch.as_tensor(std, dtype=torch.float64)
        if (std <= 0).any():
            raise ValueError("std must be > 0 everywhere")
        if diffusion.learns_variance:
            raise ValueError("GaussianDataDenoiser gives no variance channels; use a fixed variance")
        self.diffusion = diffusion
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))
        self.register_buffer("var", std**2)

    def _moments(self, x_t: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
        """(x_t - sqrt(ab) mu) / denom and denom = ab s^2 + 1 - ab, float64."""
        denom = ab * self.var + 1.0 - ab
        resid = x_t.to(torch.float64) - ab.sqrt() * self.mean
        return resid / denom, denom

    def forward(self, x_in: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The exact output for the model input ``x_in`` (x_t, or c_in x_t for ``"edm"``)."""
        return exact_output(self.diffusion, x_in, t, self._posterior_means)

    def _posterior_means(self, x_t: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
        scaled, _ = self._moments(x_t, ab)
        return self.mean + ab.sqrt() * self.var * scaled, (1.0 - ab).sqrt() * scaled

    def posterior_x0_variance(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Var[x_0 | x_t], broadcast to ``x_t``'s shape."""
        ab = self.diffusion.coef("alphas_cumprod", t, x_t.to(torch.float64))
        _, denom = self._moments(x_t, ab)
        return (self.var * (1.0 - ab) / denom).expand(x_t.shape).to(x_t.dtype)

    def log_prob(self, x0: Tensor, extra_variance: float = 0.0) -> Tensor:
        """Exact log N(x_0; mu, std^2 + extra_variance) per sample ``[B]``, nats summed over points."""
        x = x0.to(torch.float64)
        var = (self.var + extra_variance).expand(x.shape[1:])
        lp = -0.5 * (math.log(2 * math.pi) + torch.log(var) + (x - self.mean) ** 2 / var)
        return lp.flatten(1).sum(dim=1)


class GaussianFieldDenoiser(nn.Module):
    """The Bayes-optimal (Wiener-filter) denoiser for a stationary periodic Gaussian field.

    For x_0 ~ N(mu, C) with C circulant over the spatial axes, C = U^H diag(P) U
    (U the unitary DFT, P the power spectrum: the eigenvalues of C, one per mode),
    every Fourier mode of x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps is independent and

        E[eps | x_t] = U^H [ sqrt(1 - ab) / (ab P + 1 - ab) ] U (x_t - sqrt(ab) mu),

    the per-element formulas of :class:`GaussianDataDenoiser` with s^2 replaced by
    P(k) mode by mode (Wiener 1949). With ``numpy.fft.fftn`` conventions,
    ``E |fftn(x - mu)|^2 = N P`` (N points), as in ``datasets/grf.py``.

    Args:
        diffusion: supplies alpha-bar_t and the output parameterisation.
        power: P on every DFT mode, ``[C, *S]`` (C may be 1; ``torch.fft.fftn`` order
            over the spatial axes), > 0 everywhere (also at k = 0).
        mean: broadcastable to ``[C, *S]``; 0 by default.
    """

    def __init__(self, diffusion: GaussianDiffusion, power: Tensor, mean: Tensor | float = 0.0) -> None:
        super().__init__()
        power = torch.as_tensor(power, dtype=torch.float64)
        if not 2 <= power.ndim <= 4:
            raise ValueError(f"power must be [C, *S] with 1-3 spatial dims, got shape {tuple(power.shape)}")
        if not (power > 0).all():
            raise ValueError("power must be > 0 on every mode (give the k = 0 mode a finite positive value)")
        spatial = tuple(range(1, power.ndim))
        mirrored = torch.roll(torch.flip(power, spatial), shifts=(1,) * len(spatial), dims=spatial)
        if not torch.allclose(mirrored, power, rtol=1e-10, atol=0.0):
            # P(k) != P(-k) would make the filtered field complex: it is no real stationary field
            raise ValueError("power must be symmetric under k -> -k (P(m) = P(-m mod N)), as for any real field")
        if diffusion.learns_variance:
            raise ValueError("GaussianFieldDenoiser gives no variance channels; use a fixed variance")
        self.diffusion = diffusion
        self.register_buffer("power", power)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64))

    def _spatial_dims(self, x: Tensor) -> tuple[int, ...]:
        return tuple(range(2, x.ndim))

    def _filter(self, x: Tensor, gain: Tensor) -> Tensor:
        """U^H diag(gain) U x over the spatial axes (gain real, Hermitian-symmetric)."""
        dims = self._spatial_dims(x)
        if self.power.ndim != x.ndim - 1 or self.power.shape[1:] != x.shape[2:]:
            raise ValueError(f"power has shape {tuple(self.power.shape)}, fields have shape {tuple(x.shape)}")
        return torch.fft.ifftn(torch.fft.fftn(x, dim=dims) * gain, dim=dims).real

    def forward(self, x_in: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The exact output for the model input ``x_in`` (x_t, or c_in x_t for ``"edm"``)."""
        return exact_output(self.diffusion, x_in, t, self._posterior_means)

    def _posterior_means(self, x_t: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
        scaled = self._filter(x_t - ab.sqrt() * self.mean, 1.0 / (ab * self.power + 1.0 - ab))
        return self.mean + ab.sqrt() * self._filter(scaled, self.power), (1.0 - ab).sqrt() * scaled

    def log_prob(self, x0: Tensor, extra_variance: float = 0.0) -> Tensor:
        """Exact log N(x_0; mu, C + extra_variance I) per sample ``[B]``, nats (summed over
        all points and channels): -1/2 sum_m [ |F_m|^2 / (N P_m) + log(2 pi P_m) ]."""
        x = x0.to(torch.float64) - self.mean
        dims = self._spatial_dims(x)
        n = math.prod(x.shape[2:])
        p = (self.power + extra_variance).expand(x.shape[1:])
        f2 = torch.fft.fftn(x, dim=dims).abs() ** 2
        return -0.5 * (f2 / (n * p) + torch.log(2 * math.pi * p)).flatten(1).sum(dim=1)

    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` draws ``[num, C, *S]`` float64: mu + U^H sqrt(P) U w, w ~ N(0, I)."""
        w = torch.randn(num, *self.power.shape, generator=generator, dtype=torch.float64)
        return self.mean + self._filter(w, self.power.sqrt())
