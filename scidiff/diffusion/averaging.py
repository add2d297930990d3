"""Per-dimension averages of the likelihoods: valid-point counts and normalised point weights.

The variational bound (:mod:`scidiff.diffusion.likelihood`) and the ODE likelihood
(:mod:`scidiff.diffusion.ode_likelihood`) report nats (or bits) per dimension: a mean
over the valid points of each sample, weighted by area weights when given. Both use the
helpers here, so they average alike.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from scidiff.shapes import append_dims, check_broadcast

LN2 = math.log(2.0)  # nats per bit


def normalised_point_weights(
    x0: Tensor, mask: Tensor | None = None, weights: Tensor | None = None
) -> Tensor | None:
    """Weights of the per-dimension averages, ``[B|1, C|1, *S]`` in x0's dtype, or None.

    w = mask * weights, normalised per sample so that the mean weight over the valid
    points is 1 (sum_p w_p = number of valid points): a weighted mean is then
    sum_p w_p v_p / sum_p w_p and without weights it is the plain mean over valid points.
    ``None`` when neither is given (every point counts 1).

    Unlike :func:`scidiff.evaluation.weighting.point_weights` (the raw product
    mask * weights in float64, for metrics that keep weighted sums), these are
    normalised per sample, so that ``mean_flat(v * w)`` is the weighted mean of ``v``
    and a per-dimension likelihood keeps its meaning whatever the scale of ``weights``.

    Args:
        x0: ``[B, C, *S]``.
        mask: 1 = valid, broadcastable to x0 with x0's rank.
        weights: non-negative area weights, ``[*S]`` or broadcastable to x0 with its
            rank (e.g. ``[B, 1, *S]``); e.g. cos(latitude) on a lat/lon grid.

    Raises:
        ValueError: a part does not broadcast to x0 with its rank, is negative or not
            finite, or a sample has no valid point with positive weight.
    """
    if mask is None and weights is None:
        return None
    w = torch.ones((1,) * x0.ndim, dtype=x0.dtype, device=x0.device)
    for name, part in (("mask", mask), ("weights", weights)):
        if part is None:
            continue
        part = torch.as_tensor(part, device=x0.device).to(x0.dtype)
        if name == "weights" and part.ndim == x0.ndim - 2:
            part = part.reshape(1, 1, *part.shape)
        check_broadcast(part, x0, name)
        if not torch.isfinite(part).all() or (part < 0).any():
            raise ValueError(f"{name} must be finite and non-negative")
        w = w * part
    total = w.expand_as(x0).flatten(1).sum(dim=1)
    if (total <= 0).any():
        raise ValueError("every sample needs valid points with positive weight")
    return w * append_dims(valid_points(x0, mask) / total, x0.ndim)


def valid_points(x0: Tensor, mask: Tensor | None) -> Tensor:
    """The number of valid points (mask > 0) of each sample, ``[B]`` in x0's dtype; all
    points of a sample without ``mask``."""
    if mask is None:
        return torch.full((x0.shape[0],), x0[0].numel(), dtype=x0.dtype, device=x0.device)
    return (mask.to(x0.dtype).expand_as(x0) > 0).flatten(1).sum(dim=1).to(x0.dtype)


__all__ = ["LN2", "normalised_point_weights", "valid_points"]
