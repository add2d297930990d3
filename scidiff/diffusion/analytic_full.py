"""The exact denoiser for Gaussian data with a full covariance, and its exact conditionals.

For data x_0 ~ N(mu, Sigma) over all N = C * prod(S) points of a field (flattened in
``[C, *S]`` order), x_t = sqrt(ab) x_0 + sqrt(1 - ab) eps is Gaussian too and, with
r = x_t - sqrt(ab) mu and K_t = ab Sigma + (1 - ab) I,

    E[x_0 | x_t] = mu + sqrt(ab) Sigma K_t^{-1} r
    E[eps | x_t] = sqrt(1 - ab) K_t^{-1} r

(ab = alpha-bar_t). With Sigma = V diag(lambda) V^T both are diagonal in the
eigenbasis: gains sqrt(ab) lambda / (ab lambda + 1 - ab) and
sqrt(1 - ab) / (ab lambda + 1 - ab). Unlike the elementwise
:class:`scidiff.diffusion.analytic.GaussianDataDenoiser`, the points are correlated,
so conditioning on some of them changes the others: :meth:`conditional` gives the
exact answer an inpainting sampler should reproduce,

    mu_{U|O}    = mu_U + Sigma_UO Sigma_OO^{-1} (y_O - mu_O)
    Sigma_{U|O} = Sigma_UU - Sigma_UO Sigma_OO^{-1} Sigma_OU

(U unobserved, O observed points; Rasmussen & Williams 2006, eq. A.6).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.analytic import exact_output
from scidiff.diffusion.process import GaussianDiffusion


def squared_exponential_covariance(coords: Tensor, length_scale: float, variance: float = 1.0,
                                   jitter: float = 1e-6) -> Tensor:
    """k(a, b) = variance exp(-|a - b|^2 / (2 length_scale^2)) + jitter delta_ab (float64).

    Args:
        coords: point positions ``[N, D]`` (or ``[N]`` for 1-D).
    Returns:
        ``[N, N]`` covariance (positive definite thanks to ``jitter``).
    """
    x = torch.as_tensor(coords, dtype=torch.float64)
    x = x[:, None] if x.ndim == 1 else x
    d2 = (x[:, None, :] - x[None, :, :]).pow(2).sum(-1)
    return variance * torch.exp(-0.5 * d2 / length_scale**2) + jitter * torch.eye(x.shape[0], dtype=torch.float64)


def grid_coords(shape: Sequence[int]) -> Tensor:
    """Integer positions ``[prod(shape), len(shape)]`` of a grid, in C (row-major) order."""
    axes = torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij")
    return torch.stack([a.reshape(-1) for a in axes], dim=-1)


class FullCovarianceGaussianDenoiser(nn.Module):
    """The Bayes-optimal denoiser for fields x_0 ~ N(mean, cov) (module docstring).

    Args:
        diffusion: supplies alpha-bar_t and the output parameterisation.
        cov: ``[N, N]`` symmetric positive definite, N = prod(``shape``).
        shape: one field's ``(C, *S)``.
        mean: broadcastable to ``shape``; 0 by default.
    """

    def __init__(self, diffusion: GaussianDiffusion, cov: Tensor, shape: Sequence[int],
                 mean: Tensor | float = 0.0) -> None:
        super().__init__()
        shape = tuple(int(s) for s in shape)
        n = math.prod(shape)
        cov = torch.as_tensor(cov, dtype=torch.float64)
        if cov.shape != (n, n):
            raise ValueError(f"cov must be [N, N] with N = prod(shape {shape}) = {n}, got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.T, rtol=1e-10, atol=1e-12):
            raise ValueError("cov must be symmetric")
        if diffusion.learns_variance:
            raise ValueError("FullCovarianceGaussianDenoiser gives no variance channels; use a fixed variance")
        eigvals, eigvecs = torch.linalg.eigh(cov)
        if not bool((eigvals > 0).all()):
            raise ValueError(f"cov must be positive definite; its smallest eigenvalue is {float(eigvals.min()):.3g}")
        self.diffusion = diffusion
        self.shape = shape
        self.register_buffer("cov", cov)
        self.register_buffer("eigvals", eigvals)
        self.register_buffer("eigvecs", eigvecs)
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float64).expand(shape).reshape(n).clone())

    def _in_eigenbasis(self, v: Tensor, gain: Tensor) -> Tensor:
        """V diag(gain) V^T v for v ``[B, N]``, gain ``[B, N]``."""
        return ((v @ self.eigvecs) * gain) @ self.eigvecs.T

    def forward(self, x_in: Tensor, t: Tensor, cond: Conditioning | None = None) -> Tensor:
        """The exact output (``GaussianDiffusion.target`` of the exact x_0 and eps) for the
        model input ``x_in`` (x_t, or c_in x_t for ``"edm"``)."""
        if tuple(x_in.shape[1:]) != self.shape:
            raise ValueError(f"x_t has shape {tuple(x_in.shape)}, this denoiser models fields of shape {self.shape}")
        return exact_output(self.diffusion, x_in, t, self._posterior_means)

    def _posterior_means(self, x_t: Tensor, ab: Tensor) -> tuple[Tensor, Tensor]:
        """E[x_0 | x_t] and E[eps | x_t] (module docstring), shaped like x_t."""
        x, ab = x_t.flatten(1), ab.flatten(1)  # [B, N], [B, 1]
        resid = x - ab.sqrt() * self.mean
        denom = ab * self.eigvals + 1.0 - ab
        eps = self._in_eigenbasis(resid, (1.0 - ab).sqrt() / denom)
        x0 = self.mean + self._in_eigenbasis(resid, ab.sqrt() * self.eigvals / denom)
        return x0.reshape(x_t.shape), eps.reshape(x_t.shape)

    def sample(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` draws ``[num, *shape]`` (float64): mu + V sqrt(lambda) w, w ~ N(0, I)."""
        w = torch.randn(num, self.mean.numel(), generator=generator, dtype=torch.float64)
        return (self.mean + (w * self.eigvals.sqrt()) @ self.eigvecs.T).reshape(num, *self.shape)

    def conditional(self, observed: Tensor, obs_mask: Tensor) -> tuple[Tensor, Tensor]:
        """The exact law of x_0 given its values at the observed points.

        Args:
            observed: ``shape`` (one field), any value where unobserved.
            obs_mask: broadcastable to ``shape``, 1 = observed.
        Returns:
            ``(mean, var)``, both of ``shape``: the conditional mean (equal to
            ``observed`` at observed points) and the conditional variance (0 there).
        """
        m = torch.as_tensor(obs_mask).expand(self.shape).reshape(-1) != 0
        y = torch.as_tensor(observed, dtype=torch.float64).expand(self.shape).reshape(-1)
        o, u = m.nonzero().squeeze(1), (~m).nonzero().squeeze(1)
        s_oo, s_uo, s_uu = self.cov[o][:, o], self.cov[u][:, o], self.cov[u][:, u]
        chol = torch.linalg.cholesky(s_oo)
        gain = torch.cholesky_solve(s_uo.T, chol).T  # Sigma_UO Sigma_OO^{-1}
        mean, var = y.clone(), torch.zeros_like(y)
        mean[u] = self.mean[u] + gain @ (y[o] - self.mean[o])
        var[u] = torch.diagonal(s_uu - gain @ s_uo.T)
        return mean.reshape(self.shape), var.reshape(self.shape)


__all__ = ["FullCovarianceGaussianDenoiser", "grid_coords", "squared_exponential_covariance"]
