"""The variational bound on -log p(x_0) of a DDPM, decomposed into its terms.

Ho et al. (2020) eq. 5 / Luo (2022) eq. 58, with 0-based timesteps:

    -log p(x_0) <= L_prior + sum_{t=1}^{T-1} L_t + L_0
    L_prior = KL( q(x_{T-1} | x_0) || N(0, I) )                         prior term
    L_t     = E_q KL( q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t) )     denoising terms
    L_0     = E_q [ -log p(x_0 | x_1) ]                                reconstruction term

Each denoising term is estimated with one draw of x_t ~ q(x_t | x_0) per sample. The
decoder of L_0 is the diffusion's ``decoder`` (continuous Gaussian density for real
fields, discretised Gaussian for quantised data). Everything is per sample and per
dimension (mean over the valid points), in nats; ``bits_per_dim`` divides by ln 2.

For likelihoods in physical units, pass the data transform's log-determinant
(physical -> normalised, summed over the sample's valid points): since
p_phys(x) = p_model(T(x)) |det dT/dx|, the physical NLL is the model's minus it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.gaussian import normal_kl
from scidiff.diffusion.process import GaussianDiffusion
from scidiff.shapes import check_field, mean_flat

LN2 = math.log(2.0)


@dataclass(frozen=True)
class VariationalBound:
    """Terms of the bound for a batch, all in nats per dimension.

    Attributes:
        terms: ``[B, T]``; column 0 is the reconstruction term L_0, column t >= 1 the
            denoising term L_t.
        prior: ``[B]`` the prior term.
        nats_per_dim: ``[B]`` the total (prior + all terms), minus the transform's
            log-determinant per dimension when one was given.
        bits_per_dim: ``[B]`` the same in bits.
        dims: ``[B]`` the number of valid dimensions of each sample.
    """

    terms: Tensor
    prior: Tensor
    nats_per_dim: Tensor
    bits_per_dim: Tensor
    dims: Tensor


@dataclass(frozen=True)
class BoundEstimate:
    """An importance-sampled estimate of the bound with its standard error.

    ``nats_per_dim``, ``bits_per_dim`` and ``standard_error_bits`` are ``[B]``; the
    prior and reconstruction terms are exact, the denoising sum is estimated from
    ``num_terms`` sampled timesteps.
    """

    nats_per_dim: Tensor
    bits_per_dim: Tensor
    standard_error_bits: Tensor
    prior: Tensor
    reconstruction: Tensor


def prior_term(diffusion: GaussianDiffusion, x0: Tensor, mask: Tensor | None = None) -> Tensor:
    """KL( q(x_{T-1} | x_0) || N(0, I) ) per sample ``[B]``, nats per dimension."""
    check_field(x0, "x0")
    t = torch.full((x0.shape[0],), diffusion.num_timesteps - 1, dtype=torch.long, device=x0.device)
    mean, _, log_var = diffusion.q_mean_variance(x0, t)
    kl = normal_kl(mean, log_var, torch.zeros_like(mean), torch.zeros_like(log_var))
    return mean_flat(kl, mask)


def timestep_terms(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    timesteps: Tensor,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The bound's terms at ``timesteps`` ``[K]`` for every sample, ``[B, K]`` nats/dim.

    All B*K (sample, timestep) pairs go through the denoiser in one batch.
    """
    b, k = x0.shape[0], timesteps.numel()
    xs = x0.repeat_interleave(k, dim=0)
    ts = timesteps.to(x0.device).repeat(b)
    noise = torch.randn(xs.shape, generator=generator, dtype=xs.dtype,
                        device=generator.device if generator is not None else xs.device).to(xs.device)
    x_t = diffusion.q_sample(xs, ts, noise)
    rep_cond = None if cond is None else cond.map(lambda v: v.repeat_interleave(k, dim=0))
    rep_mask = None if mask is None else mask.expand_as(x0).repeat_interleave(k, dim=0)
    out = denoiser(x_t, ts, rep_cond)
    return (diffusion.vb_term(out, xs, x_t, ts, mask=rep_mask) * LN2).reshape(b, k)


@torch.no_grad()
def variational_bound(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    *,
    log_det: Tensor | None = None,
    timestep_batch: int = 50,
    generator: torch.Generator | None = None,
) -> VariationalBound:
    """The full bound (all T terms) for data ``x0`` ``[B, C, *S]`` (normalised).

    Args:
        cond, mask: as for the denoiser and the loss (mask: 1 = valid).
        log_det: optional ``[B]`` log |det dT/dx| of the data transform (nats,
            summed over each sample's valid points) to report physical units.
        timestep_batch: timesteps evaluated per denoiser call (times B samples).
        generator: for the noise draws.
    """
    check_field(x0, "x0")
    if timestep_batch < 1:
        raise ValueError(f"timestep_batch must be >= 1, got {timestep_batch}")
    T = diffusion.num_timesteps
    all_t = torch.arange(T, device=x0.device)
    terms = torch.cat(
        [
            timestep_terms(denoiser, diffusion, x0, chunk, cond, mask, generator)
            for chunk in all_t.split(timestep_batch)
        ],
        dim=1,
    )
    prior = prior_term(diffusion, x0, mask)
    return _finish(terms, prior, terms.sum(dim=1) + prior, x0, mask, log_det)


@torch.no_grad()
def estimate_bound(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    *,
    num_terms: int = 16,
    proposal: Tensor | None = None,
    log_det: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> BoundEstimate:
    """Unbiased importance-sampled estimate of the bound with K = ``num_terms`` << T
    denoising terms; the prior and reconstruction terms are exact.

    The denoising sum S = sum_{t>=1} L_t is estimated by mean_k L_{t_k} / pi(t_k) with
    t_k ~ pi (``proposal`` ``[T]`` weights over t = 1..T-1, index 0 ignored; uniform by
    default), and its standard error by the sample standard deviation / sqrt(K).
    """
    check_field(x0, "x0")
    T = diffusion.num_timesteps
    if num_terms < 2:
        raise ValueError(f"num_terms must be >= 2 for a standard error, got {num_terms}")
    pi = torch.ones(T, dtype=torch.float64) if proposal is None else torch.as_tensor(proposal, dtype=torch.float64).cpu()
    if pi.shape != (T,) or (pi[1:] < 0).any() or not torch.isfinite(pi[1:]).all():
        raise ValueError(
            f"proposal must hold T = {T} weights, finite and non-negative for t >= 1; got shape {tuple(pi.shape)}"
        )
    pi = pi.clone()
    pi[0] = 0.0
    if pi.sum() <= 0:
        raise ValueError("proposal puts no weight on t >= 1")
    pi = pi / pi.sum()
    ts = torch.multinomial(pi, num_terms, replacement=True, generator=generator)
    recon = timestep_terms(denoiser, diffusion, x0, torch.zeros(1, dtype=torch.long), cond, mask, generator)[:, 0]
    sampled = timestep_terms(denoiser, diffusion, x0, ts, cond, mask, generator)
    weighted = sampled / pi[ts].to(sampled)
    denoising = weighted.mean(dim=1)
    se = weighted.std(dim=1) / math.sqrt(num_terms)
    prior = prior_term(diffusion, x0, mask)
    total = prior + recon + denoising
    done = _finish(None, prior, total, x0, mask, log_det)
    return BoundEstimate(
        nats_per_dim=done.nats_per_dim,
        bits_per_dim=done.bits_per_dim,
        standard_error_bits=se / LN2,
        prior=prior,
        reconstruction=recon,
    )


def _finish(terms, prior, total, x0, mask, log_det) -> VariationalBound:
    if mask is None:
        dims = torch.full((x0.shape[0],), x0[0].numel(), dtype=x0.dtype, device=x0.device)
    else:
        dims = mask.expand_as(x0).flatten(1).sum(dim=1).to(x0.dtype)
    if log_det is not None:
        if log_det.shape != (x0.shape[0],):
            raise ValueError(f"log_det must have shape [B] = [{x0.shape[0]}], got {tuple(log_det.shape)}")
        total = total - log_det.to(total) / dims.clamp_min(1)
    return VariationalBound(terms=terms, prior=prior, nats_per_dim=total, bits_per_dim=total / LN2, dims=dims)


__all__ = [
    "BoundEstimate",
    "VariationalBound",
    "estimate_bound",
    "prior_term",
    "timestep_terms",
    "variational_bound",
]
