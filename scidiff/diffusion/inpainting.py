"""Inpainting and data assimilation with an unconditionally trained model: no retraining.

Given sparse observations ``observed`` (values) and ``obs_mask`` (1 = observed) of a
field, both samplers draw fields that agree with the observations where there are
some and follow the model's prior elsewhere. Both work on ``[B, C, *S]`` fields of
any spatial rank, in model units (normalise the observations with the checkpoint's
statistics first), and take the denoiser, diffusion, conditioning and randomness
exactly as :mod:`scidiff.diffusion.samplers` does (``generator``: one
``torch.Generator`` or one per sample, so a member does not depend on its batch; the
denoiser is called through ``GaussianDiffusion.model_output``, on c_in x_t for
``prediction="edm"``).
``observed`` may hold anything (e.g. NaN) where ``obs_mask`` is 0.

**RePaint** -- :func:`repaint_sample` (Lugmayr et al. 2022, "RePaint: Inpainting
using Denoising Diffusion Probabilistic Models", CVPR). Each reverse step from
timestep t to t' < t draws the two regions separately and merges them by the mask
(their eq. 8-10, Algorithm 1)::

    x_{t'}^known   ~ q(x_{t'} | y)        = N( sqrt(ab_{t'}) y, (1 - ab_{t'}) I )   eq. 8
    x_{t'}^unknown ~ p_theta(x_{t'} | x_t)                                           eq. 9
    x_{t'}         = m * x_{t'}^known + (1 - m) * x_{t'}^unknown                     eq. 10

and at the final step (t' = the data, ab = 1) the known region is ``observed``
exactly. Because the unknown region only sees a noisy copy of the observations,
RePaint *resamples* (section 4.2): after descending ``jump_length`` steps it
diffuses the merged field back up with the forward process,
x_{t_hi} ~ N( sqrt(ab_{t_hi} / ab_{t_lo}) x_{t_lo}, (1 - ab_{t_hi} / ab_{t_lo}) I ),
and descends again, ``resample`` times per segment (the paper's jump length j = 10
and U = r = 10). The cost is about ``resample`` times the number of steps in
denoiser evaluations. With ``num_steps=None`` all T steps are taken with the
diffusion's own reverse variance (DDPM ancestral steps); with an integer, a
skipped-step schedule (:func:`samplers.timestep_sequence`) whose steps are the
DDPM posterior over each skipped segment (DDIM with eta = 1, Song et al. 2021).

**DPS** -- :func:`dps_sample` (Chung et al. 2023, "Diffusion Posterior Sampling for
General Noisy Inverse Problems", ICLR). Every ancestral step is followed by a
gradient step on the observation misfit of the model's clean estimate
(Algorithm 1, lines 4-7, for the masking operator A(x) = m * x)::

    x0^       = E_theta[x_0 | x_t]                        (Tweedie; the model's x_0)
    x'_{t'}   = ancestral step from x_t given x0^         (DDPM / DDIM eta)
    x_{t'}    = x'_{t'} - zeta_t grad_{x_t} || m * (y - x0^(x_t)) ||^2
    zeta_t    = step_size / || m * (y - x0^(x_t)) ||      (their appendix C, zeta' = step_size)

per sample. The gradient passes through the denoiser (one backward per step).
Observations are matched to roughly ``step_size`` (the step is a normalised
gradient step); for exact agreement use RePaint.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion import samplers
from scidiff.diffusion.process import GaussianDiffusion
from scidiff.diffusion.samplers import GeneratorLike, Spacing, randn_like, timestep_sequence
from scidiff.shapes import append_dims


# ------------------------------------------------------------------ inputs
def check_observations(x: Tensor, observed: Tensor, obs_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Validate observations against fields ``x`` ``[B, C, *S]``.

    ``observed`` and ``obs_mask`` must broadcast to ``x``'s shape (e.g. ``[C, *S]`` for
    the same observations in every sample, or ``[B, C, *S]``); the mask must be bool or
    hold only 0 and 1; observed values must be finite where the mask is 1.

    Returns:
        ``(y, m)`` expanded to ``x``'s shape, on its device and dtype: ``y`` the
        observations with 0 where unobserved, ``m`` the bool mask (True = observed).

    Raises:
        ValueError: naming the shapes, or the number of bad observed values.
    """
    for name, v in (("observed", observed), ("obs_mask", obs_mask)):
        if not isinstance(v, Tensor):
            raise ValueError(f"{name} must be a tensor broadcastable to {tuple(x.shape)}, got {type(v).__name__}")
        try:
            ok = torch.broadcast_shapes(v.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{name} has shape {tuple(v.shape)}, which does not broadcast to the fields' shape "
                f"{tuple(x.shape)} (observed {tuple(observed.shape)}, obs_mask {tuple(obs_mask.shape)})"
            )
    if obs_mask.dtype == torch.bool:
        m = obs_mask
    else:
        if not bool(((obs_mask == 0) | (obs_mask == 1)).all()):
            raise ValueError("obs_mask must be bool or hold only 0 (unobserved) and 1 (observed)")
        m = obs_mask != 0
    joint = torch.broadcast_shapes(observed.shape, m.shape)
    bad = m.expand(joint) & ~torch.isfinite(observed.expand(joint))
    if bool(bad.any()):
        raise ValueError(f"observed is not finite at {int(bad.sum())} points where obs_mask is 1")
    m = m.to(x.device).expand(x.shape)
    y = observed.to(device=x.device, dtype=x.dtype).expand(x.shape)
    y = torch.where(m, y, torch.zeros((), dtype=x.dtype, device=x.device))
    return y, m


def _levels(diffusion: GaussianDiffusion, num_steps: int | None, spacing: Spacing) -> list[int]:
    """Timesteps of the states a sampler passes, from x_T's to -1 (the data)."""
    T = diffusion.num_timesteps
    seq = list(range(T - 1, -1, -1)) if num_steps is None else timestep_sequence(T, num_steps, spacing).tolist()
    return seq + [-1]


def _alpha_bar(diffusion: GaussianDiffusion, t: int) -> float:
    return 1.0 if t < 0 else float(diffusion.schedule.alphas_cumprod[t])


def _reverse_step(diffusion: GaussianDiffusion, model_output: Tensor, x: Tensor, t: int, t_prev: int,
                  full: bool, eta: float, generator: GeneratorLike) -> Tensor:
    """p_theta(x_{t_prev} | x_t): the diffusion's own DDPM step over all T steps, else the
    DDIM(eta) step over the skipped segment (eta = 1: the segment's DDPM posterior)."""
    if full:
        return samplers.ddpm_step(diffusion, model_output, x, t, generator=generator).prev_sample
    return samplers.ddim_step(diffusion, model_output, x, t, t_prev, eta=eta, generator=generator).prev_sample


# ----------------------------------------------------------------- RePaint
def repaint_schedule(num_levels: int, jump_length: int, resample: int) -> list[int]:
    """The order in which RePaint visits the states 0 (x_T) .. ``num_levels`` (the data).

    Descending one state at a time; at every ``jump_length``-th state counted from the
    data (the data included, x_T's neighbourhood excluded) it jumps back up
    ``jump_length`` states, ``resample - 1`` times, before going on. ``resample = 1``
    gives the plain descent 0, 1, ..., num_levels.

    >>> repaint_schedule(4, 2, 2)
    [0, 1, 2, 0, 1, 2, 3, 4, 2, 3, 4]
    """
    if not isinstance(jump_length, int) or jump_length < 1:
        raise ValueError(f"jump_length must be a positive integer, got {jump_length!r}")
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be a positive integer, got {resample!r}")
    left = {num_levels - k: resample - 1 for k in range(0, num_levels - jump_length + 1, jump_length)}
    path, i = [0], 0
    while i < num_levels:
        i += 1
        path.append(i)
        if left.get(i, 0) > 0:
            left[i] -= 1
            i -= jump_length
            path.append(i)
    return path


@torch.no_grad()
def repaint_sample(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    observed: Tensor,
    obs_mask: Tensor,
    *,
    num_steps: int | None = None,
    jump_length: int = 10,
    resample: int = 10,
    cond: Conditioning | None = None,
    generator: GeneratorLike = None,
    progress: bool = False,
    spacing: Spacing = "leading",
) -> Tensor:
    """RePaint inpainting (Lugmayr et al. 2022; module docstring) from noise ``x_T``.

    Args:
        x_T: the starting noise ``[B, C, *S]``.
        observed, obs_mask: observations and mask (1 = observed), broadcastable to
            ``x_T``, in model units (see :func:`check_observations`).
        num_steps: ``None`` for all T steps (DDPM steps with the diffusion's reverse
            variance), or the number of skipped steps (``spacing`` as in
            :func:`samplers.ddim_sample`).
        jump_length: states descended between two jumps back (j).
        resample: descents per segment (r; 1 = plain replacement, no resampling).
        cond, generator, progress: as in :func:`samplers.ddpm_sample`.

    Returns:
        ``[B, C, *S]`` samples equal to ``observed`` where ``obs_mask`` is 1.
    """
    samplers.check_call(diffusion, x_T, cond, "x_T")
    y, m = check_observations(x_T, observed, obs_mask)
    levels = _levels(diffusion, num_steps, spacing)
    full = num_steps is None
    path = repaint_schedule(len(levels) - 1, jump_length, resample)
    x = x_T
    for i, j in samplers.progress_steps(list(zip(path[:-1], path[1:])), progress, "RePaint"):
        t, t_next = levels[i], levels[j]
        if j == i + 1:  # reverse step t -> t_next (eq. 8-10)
            out = diffusion.model_output(denoiser, x, samplers.timestep_batch(t, x), cond)
            unknown = _reverse_step(diffusion, out, x, t, t_next, full, 1.0, generator)
            ab = _alpha_bar(diffusion, t_next)
            known = y if t_next < 0 else math.sqrt(ab) * y + math.sqrt(1.0 - ab) * randn_like(x, generator)
            x = torch.where(m, known, unknown)
        else:  # jump back: x_{t_next} ~ q(x_{t_next} | x_t), t_next > t
            ratio = _alpha_bar(diffusion, t_next) / _alpha_bar(diffusion, t)
            x = math.sqrt(ratio) * x + math.sqrt(1.0 - ratio) * randn_like(x, generator)
    return x


# --------------------------------------------------------------------- DPS
def dps_sample(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    observed: Tensor,
    obs_mask: Tensor,
    *,
    num_steps: int | None = 50,
    step_size: float = 1.0,
    cond: Conditioning | None = None,
    generator: GeneratorLike = None,
    progress: bool = False,
    spacing: Spacing = "leading",
    eta: float = 1.0,
) -> Tensor:
    """Diffusion posterior sampling (Chung et al. 2023; module docstring) from ``x_T``.

    Args:
        x_T: the starting noise ``[B, C, *S]``.
        observed, obs_mask: observations and mask (1 = observed), broadcastable to
            ``x_T``, in model units.
        num_steps: skipped steps (``spacing`` as in :func:`samplers.ddim_sample`), or
            ``None`` for all T DDPM steps.
        step_size: zeta' of the normalised gradient step (> 0); the misfit moves by
            about this much (in model units, over all observed points) per step.
        eta: noise of the skipped ancestral steps (1 = the segment's DDPM posterior,
            as in the paper; 0 = deterministic DDIM).
        cond, generator, progress: as in :func:`samplers.ddim_sample`.

    Returns:
        ``[B, C, *S]`` samples.
    """
    samplers.check_call(diffusion, x_T, cond, "x_T")
    if not step_size > 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    y, m = check_observations(x_T, observed, obs_mask)
    mf = m.to(x_T.dtype)
    levels = _levels(diffusion, num_steps, spacing)
    full = num_steps is None
    x = x_T.detach()
    for t, t_next in samplers.progress_steps(list(zip(levels[:-1], levels[1:])), progress, "DPS"):
        tb = samplers.timestep_batch(t, x)
        with torch.enable_grad():
            x_in = x.detach().requires_grad_(True)
            out = diffusion.model_output(denoiser, x_in, tb, cond)  # the gradient includes c_in
            pred, _ = diffusion.split_output(out, x_in)
            x0_hat, _ = diffusion.predictions(pred, x_in, tb)
            misfit = (mf * (y - x0_hat)).flatten(1).pow(2).sum(dim=1)  # ||y - A(x0^)||^2 per sample
            (grad,) = torch.autograd.grad(misfit.sum(), x_in)
        with torch.no_grad():
            x_prime = _reverse_step(diffusion, out.detach(), x, t, t_next, full, eta, generator)
            zeta = step_size / misfit.detach().sqrt().clamp_min(torch.finfo(x.dtype).tiny)
            x = x_prime - append_dims(zeta, x.ndim) * grad
    return x


__all__ = ["check_observations", "dps_sample", "repaint_sample", "repaint_schedule"]
