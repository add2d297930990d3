"""Exact denoisers for Gaussian data: the reference every sampler and bound is checked against.

For data x_0 ~ N(mu, s^2) independently per element (mu, s broadcastable to
``[C, *S]``) the noisy marginal is x_t ~ N(sqrt(ab) mu, ab s^2 + 1 - ab) and

    E[x_0 | x_t] = mu + sqrt(ab) s^2 (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    E[eps | x_t] = sqrt(1 - ab) (x_t - sqrt(ab) mu) / (ab s^2 + 1 - ab)
    Var[x_0 | x_t] = s^2 (1 - ab) / (ab s^2 + 1 - ab)

(ab = alpha-bar_t). :class:`GaussianDataDenoiser` returns the exact eps, x0 or v
for the diffusion's ``prediction``: the minimiser of the training loss, so a sampler
or a bound run with it shows the error of the algorithm alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.process import GaussianDiffusion


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

    def _moments(self, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ab = self.diffusion.coef("alphas_cumprod", t, x_t.to(torch.float64))
        mu, var0 = self.mean, self.var
        denom = ab * var0 + 1.0 - ab
        resid = x_t.to(torch.float64) - ab.sqrt() * mu
        return ab, resid / denom, denom

    def forward(self, x_t: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        ab, scaled, _ = self._moments(x_t, t)
        eps = (1.0 - ab).sqrt() * scaled
        x0 = self.mean + ab.sqrt() * self.var * scaled
        if self.diffusion.prediction == "eps":
            out = eps
        elif self.diffusion.prediction == "x0":
            out = x0
        else:
            out = ab.sqrt() * eps - (1.0 - ab).sqrt() * x0
        return out.to(x_t.dtype)

    def posterior_x0_variance(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Var[x_0 | x_t], broadcast to ``x_t``'s shape."""
        ab, _, denom = self._moments(x_t, t)
        return (self.var * (1.0 - ab) / denom).expand(x_t.shape).to(x_t.dtype)
