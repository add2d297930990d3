"""Likelihood metrics: bits per dimension and the mean per-timestep bound terms.

These metrics only accumulate what :mod:`scidiff.diffusion.likelihood` computes
per sample; they hold no diffusion mathematics. Bits/dim of continuous data are
comparable only between models evaluated in the same physical units (the data
transform's log-determinant included), which the caller is responsible for.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class BitsPerDim(Metric):
    """Dataset bits per dimension from per-sample negative log-likelihoods.

    ``bits/dim = sum_b nats_b / (ln 2 * sum_b dims_b)``: every valid dimension
    counts the same, so samples with more valid points (masks) weigh more.
    :meth:`standard_error` gives the standard error of the mean of the per-sample
    bits/dim (the spread of the estimate over the data set).

    Example:
        >>> import torch
        >>> metric = BitsPerDim()
        >>> metric.update(torch.tensor([100.0, 120.0]), dims=64)
        >>> round(metric.compute().item(), 4)  # 220 / (128 ln 2)
        2.4796
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        for name in ("nats_sum", "dims_sum", "bpd_sum", "bpd_sq_sum", "count"):
            self.add_state(
                name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
            )

    def update(self, nats: Tensor, dims: Tensor | int) -> None:
        """Args:
        nats: ``[B]`` negative log-likelihood (or bound) of each sample, in nats,
            summed over its dimensions (for nats/dim ``v`` pass ``v * dims``).
        dims: number of valid dimensions of each sample, ``[B]`` or one int
            (``C * prod(S)`` without a mask).
        """
        nats = torch.as_tensor(nats).to(torch.float64)
        if nats.ndim != 1:
            raise ValueError(f"nats must be [B], got shape {tuple(nats.shape)}")
        dims = (
            torch.as_tensor(dims, device=nats.device).to(torch.float64).expand_as(nats)
        )
        if torch.any(dims <= 0):
            raise ValueError("dims must be positive")
        bpd = nats / (dims * math.log(2.0))
        self.nats_sum += nats.sum()
        self.dims_sum += dims.sum()
        self.bpd_sum += bpd.sum()
        self.bpd_sq_sum += (bpd**2).sum()
        self.count += nats.numel()

    def compute(self) -> Tensor:
        """Returns: scalar bits/dim."""
        return self.nats_sum / (self.dims_sum * math.log(2.0))

    def standard_error(self) -> Tensor:
        """Standard error of the mean per-sample bits/dim (scalar; NaN below 2 samples).

        Synced across ranks: under DDP, call it on every rank (it is a collective).
        """
        with self.sync_context():
            n = self.count
            mean = self.bpd_sum / n
            variance = (self.bpd_sq_sum - n * mean**2) / (n - 1)
            return torch.sqrt(variance.clamp_min(0) / n)


class BoundTerms(Metric):
    """Mean of the per-timestep variational bound terms over samples, ``[T]``.

    What the "bound terms vs t" plot shows: where in the noise schedule a model
    loses its likelihood (usually the last few, least noisy steps).

    Args:
        num_timesteps: ``T``.
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = False

    def __init__(self, num_timesteps: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if int(num_timesteps) < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        self.num_timesteps = int(num_timesteps)
        self.add_state(
            "terms_sum",
            torch.zeros(self.num_timesteps, dtype=torch.float64),
            dist_reduce_fx="sum",
        )
        self.add_state(
            "count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, terms: Tensor) -> None:
        """Args: terms ``[B, T]`` per-sample bound terms (any unit, e.g. bits/dim)."""
        if terms.ndim != 2 or terms.shape[1] != self.num_timesteps:
            raise ValueError(
                f"terms must be [B, {self.num_timesteps}], got {tuple(terms.shape)}"
            )
        self.terms_sum += terms.to(torch.float64).sum(dim=0)
        self.count += terms.shape[0]

    def compute(self) -> Tensor:
        """Returns: ``[T]`` mean terms, in the unit of the input."""
        return self.terms_sum / self.count


__all__ = ["BitsPerDim", "BoundTerms"]
