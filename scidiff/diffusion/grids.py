"""Timestep grids: which noise levels a sampler visits, as data.

A grid is a strictly decreasing int64 tensor of timesteps in ``[0, T)``; every sampler
of :mod:`scidiff.diffusion.samplers` takes one (its step after the last element goes
to the data, alpha-bar 1). The model is always evaluated at the integer timesteps it
was trained on, and the solver uses exactly their alpha-bar, so a grid placed "in
log-SNR" or "by Karras' rho" is the nearest set of trained timesteps to that placement.

Kinds (``spacing``), for ``n`` steps on a schedule of ``T`` steps:

* ``"leading"``  -- {0, k, ..., (n-1)k}, k = T // n (DDIM's original choice);
* ``"trailing"`` -- round(T - i T/n) - 1, always starting at T - 1 (Lin et al. 2024);
* ``"linspace"`` -- round(linspace(0, T - 1, n));
* ``"logsnr"``   -- uniform in log-SNR lambda = log(ab / (1 - ab)) from t = T - 1 to 0
  (DPM-Solver's "time-uniform" grid, Lu et al. 2022). A terminal level that lies more than one
  grid step below the next trained level is visited alone, and the other n - 1 points are uniform
  from that next level: the cosine schedule's beta, clipped at 0.999, drops lambda from -12.9 at
  t = T - 2 to -19.8 at T - 1, and a grid uniform from -19.8 rounds 8 of 20 points onto
  t = 991-999, calls spent for modes of std in the hundreds;
* ``"karras"``   -- sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) -
  sigma_max^(1/rho)))^rho with sigma = sqrt((1 - ab) / ab) (Karras et al. 2022, eq. 5), from
  ``sigma_max`` = 80 (EDM's) to sigma_min = sigma_0; a schedule whose noisiest level lies above
  ``sigma_max`` starts at that level and takes the other n - 1 steps from ``sigma_max``;
* a user's list -- any strictly decreasing timesteps in ``[0, T)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

from scidiff.diffusion.process import GaussianDiffusion

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = get_args(Spacing)
GridKind = Literal["leading", "trailing", "linspace", "logsnr", "karras"]
GRID_KINDS: tuple[str, ...] = get_args(GridKind)
KARRAS_SIGMA_MAX = 80.0  # EDM's sigma_max (Karras et al. 2022, table 1)


def _check_num_steps(num_steps: int, num_timesteps: int) -> None:
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    if num_steps > num_timesteps:
        raise ValueError(f"num_steps ({num_steps}) must not exceed the number of timesteps T = {num_timesteps}")


def timestep_sequence(num_timesteps: int, num_steps: int, spacing: Spacing = "leading") -> Tensor:
    """The uniform-in-t grids (``leading``, ``trailing``, ``linspace``), descending.

    >>> timestep_sequence(1000, 4, "trailing").tolist()
    [999, 749, 499, 249]
    """
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: unknown value {spacing!r}; expected one of {SPACINGS}")
    _check_num_steps(num_steps, num_timesteps)
    if spacing == "leading":
        ts = torch.arange(num_steps, dtype=torch.float64) * (num_timesteps // num_steps)
    elif spacing == "trailing":
        ts = torch.round(num_timesteps - torch.arange(num_steps, dtype=torch.float64) * (num_timesteps / num_steps)) - 1
    else:
        ts = torch.round(torch.linspace(0, num_timesteps - 1, num_steps, dtype=torch.float64))
    ts = torch.sort(ts.long(), descending=True).values
    if torch.unique(ts).numel() != num_steps:  # cannot happen for num_steps <= T; guards edits
        raise ValueError(f"spacing {spacing!r} gave repeated timesteps for num_steps={num_steps}")
    return ts


def log_snr(diffusion: GaussianDiffusion) -> Tensor:
    """lambda_t = log(ab_t / (1 - ab_t)) for t = 0..T-1, float64 (``-inf`` at zero terminal SNR)."""
    ab = diffusion.schedule.alphas_cumprod.to(torch.float64)
    return torch.log(ab) - torch.log1p(-ab)


def _nearest(levels: Tensor, targets: Tensor) -> Tensor:
    """For each target (descending in t), the timestep whose level is nearest, made strictly
    decreasing and kept within ``[0, T)`` so that ``n`` targets give ``n`` distinct steps."""
    t = (levels[None, :] - targets[:, None]).abs().argmin(dim=1)
    n, T = t.numel(), levels.numel()
    out = t.tolist()
    for i in range(1, n):  # strictly decreasing, leaving room for the steps still to come
        out[i] = min(out[i], out[i - 1] - 1)
    for i in range(n - 1, -1, -1):
        out[i] = max(out[i], n - 1 - i)
    out = [min(v, T - 1 - i) for i, v in enumerate(out)]
    return torch.tensor(out, dtype=torch.long)


def check_grid(timesteps: Sequence[int] | Tensor, num_timesteps: int, key: str = "timesteps") -> Tensor:
    """A user's grid as an int64 tensor; ``ValueError`` naming ``key`` unless it is a non-empty,
    strictly decreasing sequence of integers in ``[0, T)``."""
    values = timesteps.tolist() if isinstance(timesteps, Tensor) else list(timesteps)
    if not values:
        raise ValueError(f"{key}: empty; give at least one timestep")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{key}: expected integer timesteps, got {values!r}")
    if any(v < 0 or v >= num_timesteps for v in values):
        raise ValueError(f"{key}: timesteps must lie in [0, T) = [0, {num_timesteps}), got {values!r}")
    if any(b >= a for a, b in zip(values, values[1:])):
        raise ValueError(f"{key}: timesteps must be strictly decreasing in t (from noise to data), got {values!r}")
    return torch.tensor(values, dtype=torch.long)


def timestep_grid(diffusion: GaussianDiffusion, num_steps: int, spacing: GridKind = "trailing", *,
                  rho: float = 7.0, sigma_max: float = KARRAS_SIGMA_MAX,
                  timesteps: Sequence[int] | Tensor | None = None) -> Tensor:
    """The grid of ``num_steps`` timesteps of kind ``spacing`` (module docstring), or the
    user's ``timesteps`` (checked; ``num_steps`` and ``spacing`` are then ignored)."""
    T = diffusion.num_timesteps
    if timesteps is not None:
        return check_grid(timesteps, T)
    if spacing in SPACINGS:
        return timestep_sequence(T, num_steps, spacing)
    if spacing not in GRID_KINDS:
        raise ValueError(f"spacing: unknown value {spacing!r}; expected one of {GRID_KINDS} (or a list of timesteps)")
    _check_num_steps(num_steps, T)
    if num_steps == 1:
        return torch.tensor([T - 1], dtype=torch.long)
    lam = log_snr(diffusion)
    finite = torch.isfinite(lam)
    last = int(finite.nonzero().max())  # the noisiest timestep with a finite level
    if spacing == "logsnr":
        step = (float(lam[0]) - float(lam[last])) / (num_steps - 1)
        if num_steps > 2 and last > 0 and float(lam[last - 1] - lam[last]) > step:
            # an outlying terminal level (the clipped cosine schedule's): one step from it, then
            # uniform from the next level. On that schedule at 20 calls, against the exact Gaussian
            # denoiser, the largest variance error on modes of std 0.1-60 falls from 0.118 to 0.046
            # (DPM-Solver++ 2M) and from 0.024 to 0.013 (UniPC 3); docs/benchmarks/sampler-quality.md
            targets = torch.linspace(float(lam[last - 1]), float(lam[0]), num_steps - 1, dtype=torch.float64)
            grid = torch.cat([torch.tensor([last]), _nearest(lam[:last], targets)])
        else:
            targets = torch.linspace(float(lam[last]), float(lam[0]), num_steps, dtype=torch.float64)
            grid = _nearest(lam, targets)
    else:
        if not rho > 0:
            raise ValueError(f"rho: expected a number > 0, got {rho!r}")
        if not sigma_max > 0:
            raise ValueError(f"sigma_max: expected a number > 0, got {sigma_max!r}")
        log_sigma = -0.5 * lam  # sigma = sqrt((1 - ab) / ab)
        s_top, s_min = float(torch.exp(log_sigma[last])), float(torch.exp(log_sigma[0]))
        # above sigma_max the ODE is linear (x / sigma): one step from the noisiest level reaches it,
        # and the other n - 1 are spaced by eq. 5 from there (a clipped cosine schedule reaches
        # sigma ~ 2e4, where eq. 5 would put 6 of 10 steps above 100)
        start, s_max = [], s_top
        if s_top > sigma_max:  # from the trained level nearest sigma_max from below, so that a step
            below = (log_sigma <= math.log(sigma_max)).nonzero()   # from it is not one above sigma_max
            if below.numel() == 0:
                raise ValueError(f"sigma_max: {sigma_max!r} lies below the schedule's smallest noise level "
                                 f"sigma_0 = {s_min:.3g}")
            start, s_max = [s_top], float(torch.exp(log_sigma[int(below.max())]))
        n = num_steps - len(start)
        ramp = torch.linspace(0, 1, n, dtype=torch.float64) if n > 1 else torch.ones(1, dtype=torch.float64)
        sigmas = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        grid = _nearest(log_sigma, torch.log(torch.cat([torch.tensor(start, dtype=torch.float64), sigmas])))
    if last < T - 1:  # zero terminal SNR: start from pure noise, as the data's prior says
        grid[0] = T - 1
    return grid


__all__ = ["GRID_KINDS", "KARRAS_SIGMA_MAX", "SPACINGS", "GridKind", "Spacing", "check_grid", "log_snr",
           "timestep_grid", "timestep_sequence"]
