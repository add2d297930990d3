"""Noise schedules of the discrete forward process, in float64.

Conventions (docs/theory/conventions.md#time): timesteps ``t`` run over ``{0, ..., T-1}``; step
``t`` adds noise of variance ``betas[t]``, and

    alphas[t]          = 1 - betas[t]
    alphas_cumprod[t]  = prod_{s <= t} alphas[s]          (alpha-bar_t, DDPM eq. 4)

so ``t = 0`` is the least noisy step (the DDPM paper's t = 1), and
``x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps``.

Named schedules:

* ``linear``  -- DDPM (Ho et al. 2020): betas linear from 1e-4 to 0.02 at T = 1000;
  for other T both ends are multiplied by 1000 / T (Improved DDPM, Nichol & Dhariwal
  2021), which keeps alpha-bar_{T-1} about the same.
* ``cosine``  -- Improved DDPM eq. 17: alpha-bar(t) = f(t)/f(0),
  f(t) = cos^2((t/T + s)/(1 + s) * pi/2), s = 0.008, betas clipped at 0.999.
* ``sigmoid`` -- Chen (2023), "On the importance of noise scheduling": alpha-bar(t)
  follows a shifted, rescaled sigmoid of t/T (start=-3, end=3, tau=1 by default),
  betas clipped at 0.999.

``zero_terminal_snr=True`` rescales sqrt(alpha-bar) so that the last step has
alpha-bar = 0 exactly (Lin et al. 2024, Algorithm 1) while the first step is
unchanged. x_0 is then unrecoverable from an eps-prediction at the last step:
``GaussianDiffusion`` refuses ``prediction="eps"`` with such a schedule and asks for
``"v"``, ``"edm"`` or ``"x0"`` instead of dividing by zero.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

ScheduleName = Literal["linear", "cosine", "sigmoid"]
SCHEDULE_NAMES: tuple[str, ...] = get_args(ScheduleName)


class NoiseSchedule:
    """Betas of a discrete diffusion and the quantities derived from them.

    Args:
        betas: ``[T]`` noise variances per step, each in ``(0, 1]`` (1 is allowed for
            the last step only, as zero-terminal-SNR schedules produce). Any
            array-like; stored as float64.

    Attributes (all float64 ``[T]`` tensors on the CPU):
        betas, alphas, alphas_cumprod, alphas_cumprod_prev (alpha-bar_{t-1}, with
        alpha-bar_{-1} = 1), snr = alpha-bar / (1 - alpha-bar).
    """

    def __init__(self, betas) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).detach().cpu().clone()
        if betas.ndim != 1 or betas.numel() == 0:
            raise ValueError(f"betas must be a non-empty 1-D sequence, got shape {tuple(betas.shape)}")
        if not torch.isfinite(betas).all():
            bad = torch.nonzero(~torch.isfinite(betas)).flatten()[:5].tolist()
            raise ValueError(f"betas must be finite; non-finite values at indices {bad}")
        if (betas <= 0).any() or (betas > 1).any():
            raise ValueError(
                f"betas must lie in (0, 1]; got min {betas.min().item():.3g}, max {betas.max().item():.3g}"
            )
        if (betas[:-1] >= 1).any():
            raise ValueError("betas may equal 1 only at the last step (zero terminal SNR)")
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])

    # ------------------------------------------------------------------ derived
    @property
    def num_timesteps(self) -> int:
        """T, the number of discrete steps."""
        return self.betas.numel()

    @property
    def snr(self) -> Tensor:
        """Signal-to-noise ratio alpha-bar / (1 - alpha-bar), float64 ``[T]``."""
        ac = self.alphas_cumprod
        return ac / (1.0 - ac)

    @property
    def log_snr(self) -> Tensor:
        """log SNR, float64 ``[T]`` (``-inf`` at a zero-terminal-SNR last step)."""
        ac = self.alphas_cumprod
        return torch.log(ac) - torch.log1p(-ac)

    @property
    def has_zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def __repr__(self) -> str:
        ac = self.alphas_cumprod
        return (
            f"NoiseSchedule(T={self.num_timesteps}, beta=[{self.betas[0]:.3g}, {self.betas[-1]:.3g}], "
            f"alpha_bar=[{ac[0]:.5g}, {ac[-1]:.3g}])"
        )

    # ------------------------------------------------------------ constructors
    @classmethod
    def from_name(
        cls,
        name: ScheduleName,
        num_timesteps: int = 1000,
        *,
        beta_start: float | None = None,
        beta_end: float | None = None,
        cosine_s: float = 0.008,
        sigmoid_start: float = -3.0,
        sigmoid_end: float = 3.0,
        sigmoid_tau: float = 1.0,
        max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
    ) -> NoiseSchedule:
        """A named schedule (see the module docstring).

        Args:
            name: ``"linear"``, ``"cosine"`` or ``"sigmoid"``.
            num_timesteps: T >= 2.
            beta_start, beta_end: linear only. When given they are used as they are;
                when omitted, DDPM's 1e-4 and 0.02 scaled by 1000 / T.
            cosine_s: the offset s of the cosine schedule.
            sigmoid_start, sigmoid_end, sigmoid_tau: the sigmoid schedule's range and
                temperature.
            max_beta: upper clip of the cosine and sigmoid betas.
            zero_terminal_snr: rescale so that alpha-bar_{T-1} = 0 (Lin et al. 2024).
        """
        if name not in SCHEDULE_NAMES:
            raise ValueError(f"name: unknown schedule {name!r}; expected one of {SCHEDULE_NAMES}")
        if not isinstance(num_timesteps, int) or num_timesteps < 2:
            raise ValueError(f"num_timesteps must be an integer >= 2, got {num_timesteps!r}")
        T = num_timesteps
        if name == "linear":
            scale = 1000.0 / T
            b0 = scale * 1e-4 if beta_start is None else beta_start
            b1 = scale * 0.02 if beta_end is None else beta_end
            if not 0.0 < b0 <= b1 < 1.0:
                hint = "" if beta_end is not None else " (DDPM's 0.02 scaled by 1000/T reaches 1 for T <= 20: pass beta_end)"
                raise ValueError(
                    f"beta_start, beta_end must satisfy 0 < beta_start <= beta_end < 1, got {b0}, {b1}{hint}"
                )
            betas = torch.linspace(b0, b1, T, dtype=torch.float64)
        elif name == "cosine":
            betas = _betas_from_alpha_bar(lambda u: _cosine_alpha_bar(u, cosine_s), T, max_beta)
        else:
            if not sigmoid_start < sigmoid_end or sigmoid_tau <= 0:
                raise ValueError(
                    "sigmoid_start < sigmoid_end and sigmoid_tau > 0 are required, got "
                    f"{sigmoid_start}, {sigmoid_end}, {sigmoid_tau}"
                )
            betas = _betas_from_alpha_bar(
                lambda u: _sigmoid_alpha_bar(u, sigmoid_start, sigmoid_end, sigmoid_tau), T, max_beta
            )
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024), Algorithm 1: shift and scale sqrt(alpha-bar) so the last
    value is 0 and the first unchanged; return the implied betas (last one = 1)."""
    betas = torch.as_tensor(betas, dtype=torch.float64)
    sqrt_ab = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


def _betas_from_alpha_bar(alpha_bar, T: int, max_beta: float) -> Tensor:
    """beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta), i = 0..T-1
    (Improved DDPM's construction from a continuous alpha-bar(u), u in [0, 1])."""
    if not 0.0 < max_beta <= 1.0:
        raise ValueError(f"max_beta must lie in (0, 1], got {max_beta}")
    u = torch.arange(T + 1, dtype=torch.float64) / T
    ab = alpha_bar(u)
    return torch.clamp(1.0 - ab[1:] / ab[:-1], max=max_beta)


def _cosine_alpha_bar(u: Tensor, s: float) -> Tensor:
    return torch.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2


def _sigmoid_alpha_bar(u: Tensor, start: float, end: float, tau: float) -> Tensor:
    v_start = torch.sigmoid(torch.tensor(start / tau, dtype=torch.float64))
    v_end = torch.sigmoid(torch.tensor(end / tau, dtype=torch.float64))
    return (v_end - torch.sigmoid((u * (end - start) + start) / tau)) / (v_end - v_start)
