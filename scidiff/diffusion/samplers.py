"""Stateless DDPM / DDIM samplers and DDIM inversion for ``[B, C, *S]`` fields.

Every sampler has the same shape of signature,
``sampler(denoiser, diffusion, x, *, cond=None, generator=None, callback=None,
progress=False, ...)``: the denoiser is called through
:meth:`GaussianDiffusion.model_output`, i.e. as ``denoiser(c_in x_t, t, cond)`` for
``prediction="edm"`` and ``denoiser(x_t, t, cond)`` otherwise; all randomness comes
from ``generator`` (one ``torch.Generator``, or a list with one per sample so that a
sample does not depend on the batch it is drawn in), and ``callback(StepInfo)`` is
called after every step. Every sampler but DDPM takes a timestep grid
(:mod:`scidiff.diffusion.grids`: uniform in t, uniform in log-SNR, Karras, or a list).

The single-step functions (:func:`ddpm_step`, :func:`ddim_step`) are exposed for
users who write their own loops. They take the model output, not the model: such a
loop must obtain it with ``diffusion.model_output(denoiser, x_t, t_batch, cond)`` (or
call the denoiser on ``diffusion.scale_model_input(x_t, t_batch)``), never on x_t
itself, or an ``"edm"`` model sees unscaled inputs.

* :func:`ddpm_sample`  -- DDPM Algorithm 2 (Ho et al. 2020) over all T steps; no
  noise is added at the last step.
* :func:`ddim_sample`  -- DDIM (Song et al. 2021, eq. 12) on a sub-sequence of
  timesteps; ``eta = 0`` is deterministic, ``eta = 1`` has the DDPM posterior
  variance when all T steps are taken.
* :func:`dpm_solver_sample` -- DPM-Solver++ multistep, orders 1-3, and its SDE variant
  (Lu et al. 2022): one model call per grid point;
* :func:`unipc_sample` -- UniPC (Zhao et al. 2023): the DPM-Solver++ predictor with a
  corrector that reuses the next point's model call, one order higher at the same cost;
* :func:`heun_sample`  -- Heun's second-order method on the probability-flow ODE
  (Karras et al. 2022): two model calls per step;
* :func:`ddim_invert`  -- the deterministic DDIM map run backwards (data -> noise),
  each step refined by fixed-point iteration so that :func:`ddim_sample` with the
  same steps reconstructs the data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from scidiff.conditioning import Conditioning
from scidiff.diffusion.grids import (GRID_KINDS, KARRAS_SIGMA_MAX, SPACINGS, GridKind, Spacing, timestep_grid,
                                    timestep_sequence)
from scidiff.diffusion.process import GaussianDiffusion
from scidiff.shapes import check_field

FinalAlphaCumprod = Literal["one", "first"]
FINAL_ALPHA_CUMPRODS: tuple[str, ...] = get_args(FinalAlphaCumprod)
GeneratorLike = torch.Generator | Sequence[torch.Generator] | None


@dataclass(frozen=True)
class StepOutput:
    """Result of one reverse step: ``prev_sample`` (x at the next, less noisy level)
    and the model's ``pred_x0`` at this step, both ``[B, C, *S]``."""

    prev_sample: Tensor
    pred_x0: Tensor


@dataclass(frozen=True)
class StepInfo:
    """What a sampler's ``callback`` receives after each step.

    ``index`` counts steps from 0 to ``num_steps - 1``; ``t`` is the timestep just
    processed; ``x`` the current sample after the step; ``pred_x0`` the model's
    estimate of the data at that step (for :func:`ddim_invert`, the data being
    inverted).
    """

    index: int
    num_steps: int
    t: int
    x: Tensor
    pred_x0: Tensor


Callback = Callable[[StepInfo], None]


# ---------------------------------------------------------------- timesteps
def final_alpha_bar(diffusion: GaussianDiffusion, final_alpha_cumprod: FinalAlphaCumprod = "one") -> float:
    """alpha-bar of the level the last step lands on: 1 (the data) or alpha-bar_0."""
    if final_alpha_cumprod not in FINAL_ALPHA_CUMPRODS:
        raise ValueError(
            f"final_alpha_cumprod: unknown value {final_alpha_cumprod!r}; expected one of {FINAL_ALPHA_CUMPRODS}"
        )
    return 1.0 if final_alpha_cumprod == "one" else float(diffusion.schedule.alphas_cumprod[0])


def _alpha_bar(diffusion: GaussianDiffusion, t: int, final: float) -> float:
    return final if t < 0 else float(diffusion.schedule.alphas_cumprod[t])


# --------------------------------------------------------------- randomness
def randn_like(x: Tensor, generator: GeneratorLike = None) -> Tensor:
    """Standard normal noise shaped like ``x``.

    ``generator`` may be a list of ``B`` generators, one per sample: each sample's
    noise then depends on its own generator only, whatever the batch. Noise is drawn
    on the generator's device and moved to ``x``'s, so CPU generators give the same
    numbers whatever device the model runs on.
    """
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    gens = list(generator)
    if len(gens) != x.shape[0]:
        raise ValueError(f"generator: got a list of {len(gens)} generators for a batch of {x.shape[0]}")
    return torch.cat(
        [torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype).to(x.device) for g in gens]
    )


def timestep_batch(t: int, x: Tensor) -> Tensor:
    """The timestep ``t`` for every sample of ``x``: int64 ``[B]`` on ``x``'s device."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def check_call(diffusion: GaussianDiffusion, x: Tensor, cond: Conditioning | None, name: str) -> None:
    """Raise ``ValueError`` (naming ``name``) unless a sampler can run on ``(diffusion, x, cond)``."""
    if not isinstance(diffusion, GaussianDiffusion):
        raise ValueError(f"diffusion must be a GaussianDiffusion, got {type(diffusion).__name__}")
    check_field(x, name)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} holds NaN or inf at {int((~torch.isfinite(x)).sum())} points; a sampler starts "
                         f"from finite values (missing points: fill them, or pass a mask where one is taken)")
    if cond is not None:
        if not isinstance(cond, Conditioning):
            raise ValueError(f"cond must be a Conditioning or None, got {type(cond).__name__}")
        if cond.batch_size is not None and cond.batch_size != x.shape[0]:
            raise ValueError(f"cond has batch size {cond.batch_size} but {name} has {x.shape[0]}")


def progress_steps(seq, progress: bool, desc: str):
    """``seq``, with a tqdm bar labelled ``desc`` when ``progress``."""
    if not progress:
        return seq
    from tqdm.auto import tqdm

    return tqdm(seq, desc=desc, leave=False, disable=None)  # None: not on a log file


# -------------------------------------------------------------------- DDPM
def ddpm_step(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x_t: Tensor,
    t: int,
    *,
    generator: GeneratorLike = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Algorithm 2, line 4).

    x_{t-1} = mean + sigma_t z with the mean and variance of
    :meth:`GaussianDiffusion.p_mean_variance`; z = 0 at t = 0.
    """
    p = diffusion.p_mean_variance(model_output, x_t, timestep_batch(t, x_t))
    if t == 0:
        return StepOutput(prev_sample=p.mean, pred_x0=p.pred_x0)
    z = randn_like(x_t, generator) if noise is None else noise
    return StepOutput(prev_sample=p.mean + torch.exp(0.5 * p.log_variance) * z, pred_x0=p.pred_x0)


@torch.no_grad()
def ddpm_sample(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    cond: Conditioning | None = None,
    generator: GeneratorLike = None,
    *,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDPM ancestral sampling over all T steps, from ``x_T`` ``[B, C, *S]`` to x_0."""
    check_call(diffusion, x_T, cond, "x_T")
    x = x_T
    T = diffusion.num_timesteps
    for i, t in enumerate(progress_steps(range(T - 1, -1, -1), progress, "DDPM")):
        out = ddpm_step(diffusion, diffusion.model_output(denoiser, x, timestep_batch(t, x), cond), x, t,
                        generator=generator)
        x = out.prev_sample
        if callback is not None:
            callback(StepInfo(index=i, num_steps=T, t=t, x=x, pred_x0=out.pred_x0))
    return x


# -------------------------------------------------------------------- DDIM
def ddim_step(
    diffusion: GaussianDiffusion,
    model_output: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    *,
    eta: float = 0.0,
    final_alpha_cumprod: FinalAlphaCumprod = "one",
    generator: GeneratorLike = None,
    noise: Tensor | None = None,
) -> StepOutput:
    """One DDIM step from timestep ``t`` to ``t_prev`` < t (Song et al. 2021, eq. 12).

    ``t_prev = -1`` means the final level (alpha-bar 1, or alpha-bar_0 with
    ``final_alpha_cumprod="first"``). With ab = alpha-bar:

        x0^    = model's x_0 estimate at (x_t, t);  eps^ = the matching eps
        sigma  = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev)
        x_prev = sqrt(ab_prev) x0^ + sqrt(1 - ab_prev - sigma^2) eps^ + sigma z
    """
    if not 0 <= t < diffusion.num_timesteps or not -1 <= t_prev < t:
        raise ValueError(f"t and t_prev must satisfy -1 <= t_prev < t < T, got t={t}, t_prev={t_prev}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    pred, _ = diffusion.split_output(model_output, x_t)
    pred_x0, pred_eps = diffusion.predictions(pred, x_t, timestep_batch(t, x_t))
    ab_t = _alpha_bar(diffusion, t, 1.0)
    ab_prev = _alpha_bar(diffusion, t_prev, final_alpha_bar(diffusion, final_alpha_cumprod))
    # (1 - ab_t / ab_prev) is 1 - alpha of the skipped segment; at ab_t = ab_prev = 0 use 0.
    seg = 1.0 - ab_t / ab_prev if ab_prev > 0 else 0.0
    sigma = eta * math.sqrt((1.0 - ab_prev) / (1.0 - ab_t) * max(seg, 0.0))
    direction = math.sqrt(max(1.0 - ab_prev - sigma**2, 0.0))
    x_prev = math.sqrt(ab_prev) * pred_x0 + direction * pred_eps
    if sigma > 0:
        z = randn_like(x_t, generator) if noise is None else noise
        x_prev = x_prev + sigma * z
    return StepOutput(prev_sample=x_prev, pred_x0=pred_x0)


@torch.no_grad()
def ddim_sample(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    num_steps: int = 50,
    eta: float = 0.0,
    spacing: GridKind = "leading",
    cond: Conditioning | None = None,
    generator: GeneratorLike = None,
    *,
    final_alpha_cumprod: FinalAlphaCumprod = "one",
    timesteps: Sequence[int] | Tensor | None = None,
    rho: float = 7.0,
    sigma_max: float = KARRAS_SIGMA_MAX,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DDIM sampling with ``num_steps`` steps from ``x_T`` ``[B, C, *S]``.

    Args:
        num_steps: number of denoiser evaluations, 1 <= num_steps <= T.
        eta: 0 for deterministic DDIM, 1 for DDPM-like ancestral noise.
        spacing: the grid (:func:`scidiff.diffusion.grids.timestep_grid`: ``"leading"``,
            ``"trailing"``, ``"linspace"``, ``"logsnr"``, ``"karras"`` with ``rho`` and ``sigma_max``); each
            step goes to the next element of the grid, the last to the final level.
        timesteps: the grid given as a list (strictly decreasing, in ``[0, T)``); replaces
            ``num_steps`` and ``spacing``.
        final_alpha_cumprod: ``"one"`` (the last step lands on the data,
            alpha-bar = 1) or ``"first"`` (alpha-bar_0).
    """
    check_call(diffusion, x_T, cond, "x_T")
    final_alpha_bar(diffusion, final_alpha_cumprod)  # validates the name
    seq = timestep_grid(diffusion, num_steps, spacing, rho=rho, sigma_max=sigma_max, timesteps=timesteps).tolist()
    num_steps = len(seq)
    prevs = seq[1:] + [-1]
    x = x_T
    for i, (t, t_prev) in enumerate(progress_steps(list(zip(seq, prevs)), progress, "DDIM")):
        out = ddim_step(
            diffusion,
            diffusion.model_output(denoiser, x, timestep_batch(t, x), cond),
            x,
            t,
            t_prev,
            eta=eta,
            final_alpha_cumprod=final_alpha_cumprod,
            generator=generator,
        )
        x = out.prev_sample
        if callback is not None:
            callback(StepInfo(index=i, num_steps=num_steps, t=t, x=x, pred_x0=out.pred_x0))
    return x


# ------------------------------------------------------- high-order solvers
def _levels(diffusion: GaussianDiffusion, t: int) -> tuple[float, float, float]:
    """(alpha, sigma, lambda) of the VP marginal at timestep ``t``: x_t = alpha x_0 + sigma eps,
    lambda = log(alpha / sigma); ``t = -1`` is the data (1, 0, +inf)."""
    if t < 0:
        return 1.0, 0.0, math.inf
    ab = float(diffusion.schedule.alphas_cumprod[t])
    alpha, sigma = math.sqrt(ab), math.sqrt(1.0 - ab)
    lam = math.log(alpha) - math.log(sigma) if alpha > 0 and sigma > 0 else (-math.inf if alpha == 0 else math.inf)
    return alpha, sigma, lam


def _denoised(denoiser: nn.Module, diffusion: GaussianDiffusion, x: Tensor, t: int, cond) -> tuple[Tensor, Tensor]:
    """The model's (x0, eps) estimates at (x, t)."""
    tb = timestep_batch(t, x)
    pred, _ = diffusion.split_output(diffusion.model_output(denoiser, x, tb, cond), x)
    return diffusion.predictions(pred, x, tb)


def _check_grid_order(grid: list[int], order: int, key: str) -> None:
    if order not in (1, 2, 3):
        raise ValueError(f"order: expected 1, 2 or 3, got {order!r}")
    if len(grid) < order:
        raise ValueError(f"{key}: {len(grid)} model calls are fewer than the solver's order {order}; "
                         f"give at least {order} steps")


DPM_SOLVER_ORDERS: tuple[int, ...] = (1, 2, 3)


@torch.no_grad()
def dpm_solver_sample(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    num_steps: int = 20,
    spacing: GridKind = "logsnr",
    cond: Conditioning | None = None,
    generator: GeneratorLike = None,
    *,
    order: int = 2,
    stochastic: bool = False,
    timesteps: Sequence[int] | Tensor | None = None,
    rho: float = 7.0,
    sigma_max: float = KARRAS_SIGMA_MAX,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """DPM-Solver++ multistep (Lu et al. 2022, "DPM-Solver++", algorithm 2) in data prediction:
    one model call per grid point, ``num_steps`` calls in all.

    With lambda = log(alpha / sigma) and h = lambda_next - lambda, the step from x at the grid
    point t to the next one integrates the probability-flow ODE exactly for an x0 prediction
    that is a polynomial in lambda through the last ``order`` predictions:

        x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) D

    with D = x0^ (order 1: DDIM), the 2M correction D = x0^ + (x0^ - x0^_prev) / (2 r)
    (r = h_prev / h), or the 3M correction with two previous predictions. ``stochastic``
    gives the SDE variant (SDE-DPM-Solver++, orders 1-2):

        x_next = (sigma_next / sigma) e^-h x + alpha_next (1 - e^-2h) D + sigma_next sqrt(1 - e^-2h) z.

    Early steps use the orders their history allows; the last step lands on the data with
    the last x0 prediction (sigma = 0: the higher-order terms vanish with e^-h).

    Args:
        num_steps, spacing, rho, sigma_max, timesteps: the grid (:func:`scidiff.diffusion.grids.timestep_grid`).
        order: 1, 2 or 3 (``stochastic``: 1 or 2); at least ``order`` grid points.
        generator: the noise of the stochastic variant (one per sample, or one for the batch).
    """
    check_call(diffusion, x_T, cond, "x_T")
    grid = timestep_grid(diffusion, num_steps, spacing, rho=rho, sigma_max=sigma_max, timesteps=timesteps).tolist()
    if stochastic and order == 3:
        raise ValueError("order: the stochastic DPM-Solver++ takes order 1 or 2, got 3")
    _check_grid_order(grid, order, "sampler.steps" if timesteps is None else "timesteps")
    x = x_T
    history: list[tuple[Tensor, float]] = []  # (x0 prediction, lambda) at the last grid points
    name = f"DPM-Solver++ ({'SDE ' if stochastic else ''}{order}M)"
    for i, t in enumerate(progress_steps(grid, progress, name)):
        x0, _ = _denoised(denoiser, diffusion, x, t, cond)
        alpha, sigma, lam = _levels(diffusion, t)
        history = [(x0, lam), *history][:3]
        t_next = grid[i + 1] if i + 1 < len(grid) else -1
        a_n, s_n, lam_n = _levels(diffusion, t_next)
        if t_next < 0:
            x = x0  # sigma_next = 0, alpha_next = 1: every other term vanishes
        elif not math.isfinite(lam):  # from pure noise (zero terminal SNR): the first-order step
            x = a_n * x0 + s_n * (randn_like(x, generator) if stochastic else _eps_from(x, x0, alpha, sigma))
        else:
            h = lam_n - lam
            k = min(order, len(history))
            m0 = history[0][0]
            if k >= 2:
                h0 = lam - history[1][1]
                d1_0 = (m0 - history[1][0]) * (h / h0)
            if stochastic:
                e2 = -math.expm1(-2.0 * h)  # 1 - e^-2h
                x = (s_n / sigma) * math.exp(-h) * x + a_n * e2 * m0
                if k >= 2:
                    x = x + 0.5 * a_n * e2 * d1_0
                x = x + s_n * math.sqrt(e2) * randn_like(x, generator)
            else:
                e1 = math.expm1(-h)  # e^-h - 1
                x = (s_n / sigma) * x - a_n * e1 * m0
                if k == 2:
                    x = x - 0.5 * a_n * e1 * d1_0
                elif k == 3:
                    h1 = history[1][1] - history[2][1]
                    r0, r1 = h0 / h, h1 / h
                    d1_1 = (history[1][0] - history[2][0]) / r1
                    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    x = x + a_n * (e1 / h + 1.0) * d1 - a_n * ((e1 + h) / h**2 - 0.5) * d2
        if callback is not None:
            callback(StepInfo(index=i, num_steps=len(grid), t=t, x=x, pred_x0=x0))
    return x


def _eps_from(x: Tensor, x0: Tensor, alpha: float, sigma: float) -> Tensor:
    return (x - alpha * x0) / sigma


UNIPC_ORDERS: tuple[int, ...] = (1, 2, 3)


@torch.no_grad()
def unipc_sample(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    num_steps: int = 20,
    spacing: GridKind = "logsnr",
    cond: Conditioning | None = None,
    generator: GeneratorLike = None,
    *,
    order: int = 2,
    timesteps: Sequence[int] | Tensor | None = None,
    rho: float = 7.0,
    sigma_max: float = KARRAS_SIGMA_MAX,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """UniPC (Zhao et al. 2023), multistep in data prediction with B(h) = e^-h - 1 (the "bh2"
    variant): a predictor and a corrector that share one model call per grid point,
    ``num_steps`` calls in all, like :func:`dpm_solver_sample`.

    From x at lambda (x0 prediction m_0 there, m_k at the k-th earlier grid point) to
    lambda_next, h = lambda_next - lambda, r_k = (lambda_k - lambda) / h, D_k = (m_k - m_0) / r_k:

        x_next = (sigma_next / sigma) x - alpha_next (e^-h - 1) m_0 - alpha_next B(h) sum_k rho_k D_k

    The predictor (UniP) uses the ``order`` - 1 earlier points (order 2: rho = 1/2, which is
    DPM-Solver++ 2M); the model is called at its x_next, and the corrector (UniC) redoes the
    step with that prediction as one more point (r = 1, D = m_next - m_0). The weights solve
    sum_k rho_k r_k^(i-1) = i! (-h) phi_{i+1}(-h) / B(h), i = 1..p, with phi the exponential
    integrator's phi functions (phi_2(z) = (e^z - 1 - z) / z^2, ...). The corrected x carries
    on; the prediction, made at the uncorrected x, joins the history, so the corrector costs no
    call and raises the order of accuracy by one. The last grid point lands on the data with
    its x0 prediction (no corrector). Earlier points whose lambda is not finite (a zero
    terminal SNR) are left out of the differences. ``generator`` is unused (deterministic).

    Args:
        num_steps, spacing, rho, sigma_max, timesteps: the grid (:func:`scidiff.diffusion.grids.timestep_grid`).
        order: 1, 2 or 3, the predictor's; at least ``order`` grid points.
    """
    check_call(diffusion, x_T, cond, "x_T")
    grid = timestep_grid(diffusion, num_steps, spacing, rho=rho, sigma_max=sigma_max, timesteps=timesteps).tolist()
    _check_grid_order(grid, order, "sampler.steps" if timesteps is None else "timesteps")
    x = x_T
    history: list[tuple[Tensor, float]] = []  # (x0 prediction, lambda) at the last grid points, newest first
    x_from, levels_from = x, None  # the state at the last grid point and its levels: where the corrector starts
    for i, t in enumerate(progress_steps(grid, progress, f"UniPC ({order})")):
        x0, _ = _denoised(denoiser, diffusion, x, t, cond)
        levels = _levels(diffusion, t)
        last = i + 1 == len(grid)
        if history and not last:  # UniC: the step that reached t, again with x0 as one more point
            x = _unipc_step(x_from, history[:order], levels_from, levels, order, new=x0)
        history = [(x0, levels[2]), *history][:order]
        x_from, levels_from = x, levels
        x = x0 if last else _unipc_step(x, history, levels, _levels(diffusion, grid[i + 1]), order)
        if callback is not None:
            callback(StepInfo(index=i, num_steps=len(grid), t=t, x=x, pred_x0=x0))
    return x


def _unipc_step(x: Tensor, history: list[tuple[Tensor, float]], levels: tuple[float, float, float],
                levels_next: tuple[float, float, float], order: int, new: Tensor | None = None) -> Tensor:
    """One UniPC update from ``x`` at ``levels`` (``history[0]`` its x0 prediction) to ``levels_next``:
    the predictor, or with ``new`` (the x0 prediction at ``levels_next``) the corrector."""
    _, sigma, lam = levels
    a_n, s_n, lam_n = levels_next
    m0 = history[0][0]
    h = lam_n - lam
    x_base = (s_n / sigma) * x - a_n * math.expm1(-h) * m0  # the first-order (DDIM) step
    if not math.isfinite(h):  # from pure noise (zero terminal SNR): the first-order step
        return x_base
    # (x0 prediction, r) of the order - 1 earlier points, and of the new one for the corrector
    points = [(m, (lam_k - lam) / h) for m, lam_k in history[1:order] if math.isfinite(lam_k)]
    if new is not None:
        points.append((new, 1.0))
    if not points:
        return x_base
    rhos = [0.5] if len(points) == 1 else _unipc_weights([r for _, r in points], h)
    residual = sum(rho_k * (m - m0) / r for rho_k, (m, r) in zip(rhos, points))
    return x_base - a_n * math.expm1(-h) * residual  # B(h) = e^-h - 1


def _unipc_weights(ratios: list[float], h: float) -> list[float]:
    """UniPC's rho for the points at r_k = ``ratios``: R rho = b with R_ik = r_k^(i-1),
    b_i = i! (-h) phi_{i+1}(-h) / B(h), B(h) = e^-h - 1, i = 1..len(ratios)."""
    hh = -h
    b_h = math.expm1(hh)
    phi = math.expm1(hh) / hh - 1.0  # (-h) phi_2(-h)
    b, factorial = [], 1.0
    for i in range(1, len(ratios) + 1):
        b.append(phi * factorial / b_h)
        factorial *= i + 1
        phi = phi / hh - 1.0 / factorial  # (-h) phi_{i+2}(-h)
    R = torch.tensor([[r ** (i - 1) for r in ratios] for i in range(1, len(ratios) + 1)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


@torch.no_grad()
def heun_sample(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_T: Tensor,
    num_steps: int = 18,
    spacing: GridKind = "trailing",
    cond: Conditioning | None = None,
    generator: GeneratorLike = None,
    *,
    timesteps: Sequence[int] | Tensor | None = None,
    rho: float = 7.0,
    sigma_max: float = KARRAS_SIGMA_MAX,
    max_sigma: float = 80.0,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Heun's second-order method on the probability-flow ODE (Karras et al. 2022, algorithm 1,
    deterministic): up to 2 ``num_steps`` - 1 model calls.

    In the variance-exploding coordinates x / alpha with sigma = sigma_t / alpha_t the ODE is
    dx/dsigma = eps^(x, sigma). A step from sigma to sigma_next takes the Euler (DDIM) step,
    evaluates eps^ there and averages the two slopes; the last step, onto the data
    (sigma = 0), is Euler's. The trapezoid needs slopes that vary slowly over a step: a
    step that starts above ``max_sigma`` (EDM's sigma_max, 80; a VP schedule's last
    timesteps reach sigma ~ 1e4) is an Euler step, exact there to first order, and costs
    one call. ``generator`` is unused (the method is deterministic).
    """
    check_call(diffusion, x_T, cond, "x_T")
    grid = timestep_grid(diffusion, num_steps, spacing, rho=rho, sigma_max=sigma_max, timesteps=timesteps).tolist()
    x = x_T
    for i, t in enumerate(progress_steps(grid, progress, "Heun")):
        x0, eps = _denoised(denoiser, diffusion, x, t, cond)
        alpha, sigma, _ = _levels(diffusion, t)
        t_next = grid[i + 1] if i + 1 < len(grid) else -1
        a_n, s_n, _ = _levels(diffusion, t_next)
        x_euler = a_n * x0 + s_n * eps  # the DDIM step: x0 + sigma_ve_next eps, back in VP units
        if t_next < 0 or alpha == 0.0 or sigma > max_sigma * alpha:
            x = x_euler
        else:
            _, eps_next = _denoised(denoiser, diffusion, x_euler, t_next, cond)
            sigma_ve, sigma_ve_next = sigma / alpha, s_n / a_n
            x_ve = x / alpha + (sigma_ve_next - sigma_ve) * 0.5 * (eps + eps_next)
            x = a_n * x_ve
        if callback is not None:
            callback(StepInfo(index=i, num_steps=len(grid), t=t, x=x, pred_x0=x0))
    return x


# --------------------------------------------------------------- inversion
def _eps(denoiser: nn.Module, diffusion: GaussianDiffusion, x: Tensor, t: int, cond) -> Tensor:
    tb = timestep_batch(t, x)
    pred, _ = diffusion.split_output(diffusion.model_output(denoiser, x, tb, cond), x)
    return diffusion.predictions(pred, x, tb)[1]


def ddim_invert_step(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x_prev: Tensor,
    t_prev: int,
    t: int,
    cond: Conditioning | None = None,
    *,
    refine_steps: int = 3,
    final_alpha_cumprod: FinalAlphaCumprod = "one",
) -> Tensor:
    """Invert one deterministic DDIM step: find x_t with ddim_step(x_t, t -> t_prev) = x_prev.

    The DDIM step (eta = 0) solved for x_t reads

        x_t = sqrt(ab_t / ab_prev) (x_prev - sqrt(1 - ab_prev) e) + sqrt(1 - ab_t) e,
        e   = eps^(x_t, t),

    an implicit equation in x_t. Plain inversion evaluates e at x_prev once;
    ``refine_steps`` fixed-point iterations then re-evaluate e at the current x_t.
    """
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    ab_prev = _alpha_bar(diffusion, t_prev, final_alpha_bar(diffusion, final_alpha_cumprod))
    ab_t = _alpha_bar(diffusion, t, 1.0)
    a, b = math.sqrt(ab_t / ab_prev), math.sqrt(1.0 - ab_prev)
    c = math.sqrt(1.0 - ab_t)
    x_t = x_prev
    for _ in range(refine_steps + 1):
        e = _eps(denoiser, diffusion, x_t, t, cond)
        x_t = a * (x_prev - b * e) + c * e
    return x_t


@torch.no_grad()
def ddim_invert(
    denoiser: nn.Module,
    diffusion: GaussianDiffusion,
    x0: Tensor,
    num_steps: int = 50,
    spacing: GridKind = "leading",
    cond: Conditioning | None = None,
    *,
    refine_steps: int = 3,
    final_alpha_cumprod: FinalAlphaCumprod = "one",
    timesteps: Sequence[int] | Tensor | None = None,
    rho: float = 7.0,
    sigma_max: float = KARRAS_SIGMA_MAX,
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Map data ``x0`` ``[B, C, *S]`` to the noise x_T that :func:`ddim_sample` (eta = 0,
    the same grid and ``final_alpha_cumprod``) turns back into x0.

    Args:
        refine_steps: fixed-point iterations per step (0 = plain DDIM inversion,
            which loses about 10 % relative L2 at 50 steps even with an exact
            denoiser; each iteration costs one denoiser evaluation per step).
    """
    check_call(diffusion, x0, cond, "x0")
    seq = timestep_grid(diffusion, num_steps, spacing, rho=rho, sigma_max=sigma_max, timesteps=timesteps)
    seq = seq.flip(0).tolist()
    num_steps = len(seq)
    prevs = [-1] + seq[:-1]
    x = x0
    for i, (t_prev, t) in enumerate(progress_steps(list(zip(prevs, seq)), progress, "DDIM inversion")):
        x = ddim_invert_step(
            denoiser,
            diffusion,
            x,
            t_prev,
            t,
            cond,
            refine_steps=refine_steps,
            final_alpha_cumprod=final_alpha_cumprod,
        )
        if callback is not None:
            callback(StepInfo(index=i, num_steps=num_steps, t=t, x=x, pred_x0=x0))
    return x
