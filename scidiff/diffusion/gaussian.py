"""Elementwise Gaussian densities and divergences used by the losses and the bounds.

All functions work elementwise on broadcastable tensors and return nats.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def gaussian_log_density(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, exp(logvar)), elementwise, in nats."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def log_normal_bin_probability(a: Tensor, b: Tensor) -> Tensor:
    """log( Phi(b) - Phi(a) ) for standard-normal bin edges a < b, stable in both tails.

    In the lower half the difference is taken of log Phi(b) and log Phi(a); in the upper
    half of log Phi(-a) and log Phi(-b) (by symmetry), so neither underflows.
    """
    upper_half = (a + b) > 0
    hi = torch.where(upper_half, -a, b)
    lo = torch.where(upper_half, -b, a)
    log_hi = torch.special.log_ndtr(hi)
    log_lo = torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi))


def discretized_gaussian_log_likelihood(
    x: Tensor,
    mean: Tensor,
    log_scale: Tensor,
    bin_width: float | Tensor,
    lower: float | Tensor | None = None,
    upper: float | Tensor | None = None,
) -> Tensor:
    """log P(bin containing x) under N(mean, exp(log_scale)^2), elementwise, in nats.

    The DDPM decoder (Ho et al. 2020, eq. 13): data quantised to bins of width
    ``bin_width`` centred on the data values; with ``lower`` / ``upper`` given, the
    first and last bins extend to -inf / +inf. For 8-bit images scaled to [-1, 1]:
    ``bin_width=2/255, lower=-1, upper=1`` (Improved DDPM).
    """
    half = 0.5 * torch.as_tensor(bin_width, dtype=x.dtype, device=x.device)
    inv_std = torch.exp(-log_scale)
    a = inv_std * (x - mean - half)
    b = inv_std * (x - mean + half)
    if lower is not None:
        a = torch.where(x - half <= lower, torch.full_like(a, -torch.inf), a)
    if upper is not None:
        b = torch.where(x + half >= upper, torch.full_like(b, torch.inf), b)
    return log_normal_bin_probability(a, b)
