"""Exact log-likelihood of data through the probability-flow ODE of the diffusion.

The deterministic (DDIM, eta = 0) limit of our discrete process is the
probability-flow ODE (Song et al. 2021, "Score-based generative modeling through
SDEs", eq. 13 and appendix D.2; Song, Meng & Ermon 2021, "DDIM", eq. 14). In the
DDIM variables

    sigma = sqrt((1 - ab) / ab),     xbar = x / sqrt(ab)   (so xbar = x_0 + sigma eps under q)

it reads d xbar / d sigma = eps_theta(sqrt(ab) xbar, t(sigma)) (DDIM eq. 14), and the
log-density of xbar along a trajectory changes by the instantaneous change of
variables (Chen et al. 2018, "Neural ODEs", Theorem 1):

    d log p_sigma(xbar(sigma)) / d sigma = - div_xbar eps_theta.

Integrating from the data end sigma_0 = sigma(t = 0) to sigma_{T-1},

    -log p(x) = -log N(xbar_{T-1}; 0, (1 + sigma_{T-1}^2) I) - int_{sigma_0}^{sigma_{T-1}} div eps_theta dsigma,

where the Gaussian is the prior x_{T-1} ~ N(0, I) written for xbar = x / sqrt(ab).

**What this is the likelihood of.** The flow starts at xbar = x (data units) at noise
level sigma_0 > 0, the least noisy level the model knows (t = 0). The result is the
model's continuous density of the data smoothed by N(0, sigma_0^2 I),
sigma_0^2 = beta_0 / (1 - beta_0) (1e-4 for the linear schedule): for a perfect model,
-log (p_data * N(0, sigma_0^2))(x). No decoder term is added; for data whose scale is
far above sigma_0 the smoothing changes the NLL by O(sigma_0^2 / s^2) per dimension.

**Numerics.** The integral runs in sigma over a fixed grid of integer timesteps
(spaced uniformly in log sigma, rounded, duplicates removed: the grid depends only
on the schedule and ``num_steps``, so every DDP rank makes the same number of
denoiser calls) with Heun's method (explicit trapezoidal rule, 2 calls per step;
EDM, Karras et al. 2022, Algorithm 1). In sigma the drift eps is nearly constant at
large sigma and nearly linear in sigma at small sigma, where Heun is accurate; in
log sigma the drift grows exponentially and Heun needs ~4x the steps. The divergence is Hutchinson's trace
estimator (Hutchinson 1989; FFJORD, Grathwohl et al. 2019) with ``num_probes``
Rademacher or Gaussian probes drawn afresh at every call, each probe giving an
independent, unbiased estimate of the discretised integral; the standard error is
their standard deviation / sqrt(num_probes). ``exact_trace=True`` sums the full
Jacobian diagonal instead (d vector-Jacobian products per call: small fields only).
The Jacobian is that of the whole map xbar -> x_t = sqrt(ab) xbar -> model input
(c_in x_t for ``prediction="edm"``) -> output -> eps^, all inside the autograd graph.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.gaussian import gaussian_log_density
from scidiff.diffusion.averaging import LN2, normalised_point_weights, valid_points
from scidiff.diffusion.process import GaussianDiffusion
from scidiff.shapes import check_field, mean_flat

Probe = Literal["rademacher", "gaussian"]
PROBES: tuple[str, ...] = get_args(Probe)


@dataclass(frozen=True)
class ODELikelihood:
    """The probability-flow likelihood of a batch; all per-sample tensors are ``[B]``.

    Attributes:
        nats_per_dim: -log p(x) per valid dimension (mean over probes), minus the
            transform's log-determinant per dimension when one was given.
        bits_per_dim: the same in bits.
        standard_error_bits: standard error over the Hutchinson probes (0 with the
            exact trace); a 95% interval is ``bits_per_dim +- 1.96 * standard_error_bits``.
        prior: -log N(xbar_{T-1}; 0, 1/ab_{T-1}) per dimension, nats.
        divergence: the integral of div eps_theta over sigma per dimension (mean over
            probes), nats; ``nats_per_dim = prior - divergence (- log_det / dims)``.
        dims: number of valid dimensions of each sample.
        latent: ``[B, C, *S]`` x_{T-1} = sqrt(ab_{T-1}) xbar_{T-1}, the end of the flow.
        timesteps: the integer timesteps of the grid, ascending.
        num_evaluations: denoiser forward passes per sample and probe batch (2 per step).
    """

    nats_per_dim: Tensor
    bits_per_dim: Tensor
    standard_error_bits: Tensor
    prior: Tensor
    divergence: Tensor
    dims: Tensor
    latent: Tensor
    timesteps: Tensor
    num_evaluations: int

    @property
    def confidence_interval_bits(self) -> tuple[Tensor, Tensor]:
        """95% interval ``(lo, hi)`` of bits/dim, 1.96 standard errors either side."""
        half = 1.96 * self.standard_error_bits
        return self.bits_per_dim - half, self.bits_per_dim + half


def ode_timesteps(diffusion: GaussianDiffusion, num_steps: int) -> Tensor:
    """The ascending integer timesteps ``[n + 1]`` of the integration grid (n <= num_steps).

    num_steps + 1 points uniform in log sigma between sigma(0) and sigma(T-1), each
    rounded to the nearest timestep in log sigma; duplicates (where consecutive
    timesteps are already further apart than the spacing) are dropped.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    log_sigma = _log_sigma(diffusion)
    targets = torch.linspace(float(log_sigma[0]), float(log_sigma[-1]), num_steps + 1, dtype=torch.float64)
    idx = torch.searchsorted(log_sigma, targets).clamp(1, log_sigma.numel() - 1)
    nearer_lo = (targets - log_sigma[idx - 1]) < (log_sigma[idx] - targets)
    idx = torch.where(nearer_lo, idx - 1, idx)
    idx[0], idx[-1] = 0, log_sigma.numel() - 1
    return torch.unique(idx)


def _log_sigma(diffusion: GaussianDiffusion) -> Tensor:
    ab = diffusion.schedule.alphas_cumprod
    if not (ab > 0).all():
        raise ValueError("the ODE likelihood needs alpha_bar > 0 at every step (no zero-terminal-SNR schedule)")
    return 0.5 * (torch.log1p(-ab) - torch.log(ab))


def ode_nll(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    cond: Conditioning | None = None,
    mask: Tensor | None = None,
    *,
    num_steps: int = 100,
    num_probes: int = 4,
    probe: Probe = "rademacher",
    exact_trace: bool = False,
    weights: Tensor | None = None,
    log_det: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> ODELikelihood:
    """-log p(x_0) per dimension through the probability-flow ODE (see the module docstring).

    Args:
        denoiser: called through ``GaussianDiffusion.model_output`` with integer t
            (on c_in x_t for ``"edm"``); any prediction type (eps is recovered with
            ``GaussianDiffusion.predictions``); variance channels are ignored.
            Gradients flow to the input only.
        x0: data ``[B, C, *S]`` (normalised).
        cond: passed to the denoiser.
        mask: 1 = valid. Masked points start at 0 and are carried along by the flow;
            the divergence, the prior and the per-dimension mean count the valid points
            only (exact when the model's output at valid points does not depend on
            masked inputs).
        num_steps: Heun steps on the fixed grid of :func:`ode_timesteps`.
        num_probes: Hutchinson probes (>= 2, for the standard error).
        probe: ``"rademacher"`` or ``"gaussian"``.
        exact_trace: the full Jacobian diagonal instead of Hutchinson (small fields).
        weights: area weights as in :func:`~scidiff.diffusion.likelihood.variational_bound`:
            a weighted trace sum_p w_p d eps_p / d xbar_p and a weighted prior.
        log_det: optional ``[B]`` log |det dT/dx| of the data transform (physical ->
            normalised, summed over valid points) for physical units.
        generator: for the probes.
    """
    check_field(x0, "x0")
    if probe not in PROBES:
        raise ValueError(f"probe: unknown value {probe!r}; expected one of {PROBES}")
    if not exact_trace and num_probes < 2:
        raise ValueError(f"num_probes must be >= 2 for a standard error, got {num_probes}")
    k = 1 if exact_trace else num_probes
    grid = ode_timesteps(diffusion, num_steps)
    sigma = _log_sigma(diffusion).exp()
    w = normalised_point_weights(x0, mask, weights)
    w_full = torch.ones_like(x0) if w is None else w.expand_as(x0)
    xbar = x0.detach().clone() if mask is None else torch.where(mask.expand_as(x0) > 0, x0, torch.zeros_like(x0))
    integral = torch.zeros(k, x0.shape[0], dtype=torch.float64, device=x0.device)

    def drift(xb: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """d xbar / d sigma = eps and its weighted divergence ``[K, B]`` at grid point i."""
        t = int(grid[i])
        return _eps_and_divergence(denoiser, diffusion, xb, t, cond, w_full, k, probe, exact_trace, generator)

    f, div = drift(xbar, 0)
    for i in range(grid.numel() - 1):
        s0, s1 = float(sigma[grid[i]]), float(sigma[grid[i + 1]])
        x_euler = xbar + (s1 - s0) * f
        f_next, div_next = drift(x_euler, i + 1)
        xbar = xbar + 0.5 * (s1 - s0) * (f + f_next)
        # int div dsigma = int sigma div dlog(sigma): trapezoidal in log sigma
        integral += 0.5 * math.log(s1 / s0) * (s0 * div + s1 * div_next)
        if i + 1 < grid.numel() - 1:
            f, div = drift(xbar, i + 1)
    ab_end = float(diffusion.schedule.alphas_cumprod[-1])
    log_prior = gaussian_log_density(xbar, torch.zeros_like(xbar), torch.full_like(xbar, -math.log(ab_end)))
    prior = -mean_flat(log_prior, w).to(torch.float64)
    dims = valid_points(x0, mask)
    per_probe = prior - integral / dims.to(torch.float64)  # [K, B]
    nats = per_probe.mean(dim=0)
    se = torch.zeros_like(nats) if exact_trace else per_probe.std(dim=0) / math.sqrt(k)
    if log_det is not None:
        if log_det.shape != (x0.shape[0],):
            raise ValueError(f"log_det must have shape [B] = [{x0.shape[0]}], got {tuple(log_det.shape)}")
        nats = nats - log_det.to(nats) / dims.to(nats).clamp_min(1)
    nats = nats.to(x0.dtype)
    return ODELikelihood(
        nats_per_dim=nats,
        bits_per_dim=nats / LN2,
        standard_error_bits=(se / LN2).to(x0.dtype),
        prior=prior.to(x0.dtype),
        divergence=(integral.mean(dim=0) / dims.to(torch.float64)).to(x0.dtype),
        dims=dims,
        latent=(math.sqrt(ab_end) * xbar).detach(),
        timesteps=grid,
        num_evaluations=2 * (grid.numel() - 1),
    )


def _eps_and_divergence(denoiser, diffusion, xbar, t, cond, w, k, probe, exact, generator):
    """eps_theta at xbar (detached) and the weighted divergence sum_p w_p d eps_p / d xbar_p,
    ``[K, B]`` (K Hutchinson probes, or K = 1 exact)."""
    b = xbar.shape[0]
    if exact:
        return _exact(denoiser, diffusion, xbar, t, cond, w)
    with torch.enable_grad():
        xb = xbar.detach().requires_grad_(True)
        eps = _eps(denoiser, diffusion, xb, t, cond)
        divs = []
        for j in range(k):
            v = _probe(xb, probe, generator)
            (g,) = torch.autograd.grad(eps, xb, grad_outputs=w * v, retain_graph=j < k - 1)
            divs.append((g * v).flatten(1).sum(dim=1))
    return eps.detach(), torch.stack(divs).to(torch.float64).reshape(k, b)


def _exact(denoiser, diffusion, xbar, t, cond, w, chunk: int = 64):
    """The weighted Jacobian trace by d one-hot VJPs, ``chunk`` of them per batched call."""
    b, shape = xbar.shape[0], xbar.shape[1:]
    d = xbar[0].numel()
    trace = torch.zeros(b, dtype=torch.float64, device=xbar.device)
    eps_out = None
    for start in range(0, d, chunk):
        m = min(chunk, d - start)
        with torch.enable_grad():
            xr = xbar.detach().unsqueeze(0).expand(m, *xbar.shape).reshape(m * b, *shape).requires_grad_(True)
            rc = None if cond is None else cond.map(lambda v: v.repeat(m, *([1] * (v.ndim - 1))))
            eps = _eps(denoiser, diffusion, xr, t, rc)
            basis = torch.zeros(m, 1, d, dtype=xbar.dtype, device=xbar.device)
            basis[torch.arange(m), 0, torch.arange(start, start + m)] = 1.0
            basis = basis.expand(m, b, d).reshape(m * b, *shape)
            (g,) = torch.autograd.grad(eps, xr, grad_outputs=basis * w.repeat(m, *([1] * len(shape))))
        trace += (g * basis).reshape(m, b, d).sum(dim=(0, 2)).to(torch.float64)
        if eps_out is None:
            eps_out = eps.detach()[:b]
    return eps_out, trace.unsqueeze(0)


def _eps(denoiser, diffusion, xbar, t: int, cond):
    ts = torch.full((xbar.shape[0],), t, dtype=torch.long, device=xbar.device)
    x = diffusion.coef("sqrt_alphas_cumprod", ts, xbar) * xbar
    pred, _ = diffusion.split_output(diffusion.model_output(denoiser, x, ts, cond), x)
    _, eps = diffusion.predictions(pred, x, ts)
    return eps


def _probe(like: Tensor, probe: str, generator) -> Tensor:
    dev = generator.device if generator is not None else like.device
    if probe == "rademacher":
        v = torch.randint(0, 2, like.shape, generator=generator, device=dev).to(like.dtype) * 2.0 - 1.0
    else:
        v = torch.randn(like.shape, generator=generator, dtype=like.dtype, device=dev)
    return v.to(like.device)


__all__ = ["PROBES", "ODELikelihood", "ode_nll", "ode_timesteps"]
