"""Point weights for means over grid points, and the base class of point-averaged metrics.

A mean over grid points in scidiff is always a weighted mean

    mean(v) = sum_p w_p v_p / sum_p w_p,    w_p = mask_p * weights_p,

with ``mask`` (1 = valid, 0 = missing, e.g. land in an ocean field) and area
``weights`` (e.g. cos(latitude) on a regular lat/lon grid, so that every square
metre counts the same). Both are optional and broadcast against the field.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from scidiff.shapes import check_field

Average = Literal["none", "channels"]


def point_weights(
    like: Tensor, mask: Tensor | None = None, weights: Tensor | None = None
) -> Tensor:
    """Per-point weights ``w = mask * weights``, float64, expanded to ``like.shape``.

    The raw product, not normalised: metrics keep float64 sums of ``w * v`` and of
    ``w`` (exact under DDP) and divide at the end. The likelihoods' per-dimension
    averages use :func:`scidiff.diffusion.averaging.normalised_point_weights` instead:
    the same product in the field's dtype, rescaled per sample to mean 1 over the valid
    points, and stricter about shapes (mask and weights of the field's rank, or weights
    ``[*S]``) and values (finite).

    Args:
        like: the tensor the weights apply to, e.g. a field ``[B, C, *S]``.
        mask: 1 = valid, 0 = missing (bool or float), broadcastable to ``like``
            (e.g. ``[B, C, *S]``, ``[B, 1, *S]`` or ``[*S]``).
        weights: non-negative area weights broadcastable to ``like``
            (e.g. cos(latitude) as ``[H, 1]`` for a ``[B, C, H, W]`` lat/lon field).

    Returns:
        ``[*like.shape]`` float64 weights (an expanded view: do not write into it).
    """
    w = torch.ones((), dtype=torch.float64, device=like.device)
    for name, part in (("mask", mask), ("weights", weights)):
        if part is None:
            continue
        part = torch.as_tensor(part, device=like.device).to(torch.float64)
        try:
            shape = torch.broadcast_shapes(part.shape, like.shape)
        except RuntimeError as err:
            raise ValueError(
                f"{name} of shape {tuple(part.shape)} does not broadcast to {tuple(like.shape)}"
            ) from err
        if shape != like.shape:
            raise ValueError(
                f"{name} of shape {tuple(part.shape)} would enlarge the field {tuple(like.shape)}"
            )
        if (part < 0).any():
            raise ValueError(f"{name} must be non-negative")
        w = w * part
    return w.expand(like.shape)


def weighted(w: Tensor, v: Tensor) -> Tensor:
    """``w * v`` with exact zeros where ``w == 0``, so that NaNs at masked points
    (missing observations are often stored as NaN) never reach a sum."""
    return torch.where(w > 0, w * v, torch.zeros((), dtype=w.dtype, device=w.device))


def check_average(average: str) -> str:
    if average not in ("none", "channels"):
        raise ValueError(f"average must be 'none' or 'channels', got {average!r}")
    return average


def check_spatial_shape(
    spatial_shape: Sequence[int] | None, name: str = "spatial_shape"
):
    if spatial_shape is None:
        return None
    shape = tuple(int(s) for s in spatial_shape)
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise ValueError(
            f"{name} must hold 1-3 positive sizes, got {tuple(spatial_shape)}"
        )
    return shape


class PointMeanMetric(Metric):
    """Base of metrics that are weighted means over samples and grid points.

    Every state is a float64 sum (``dist_reduce_fx="sum"``), so the metric is
    exact under DDP: rank states add up to the state of one process that saw all
    samples. Subclasses add states with :meth:`_add_sum_state` and accumulate
    per-point values ``[B, C, *S]`` with :meth:`_sum_points`.

    Args:
        num_channels: ``C``, the number of physical variables; results are per channel.
        spatial_shape: ``None`` to average over samples *and* points (results ``[C]``),
            or the grid shape ``S`` to average over samples only and return maps ``[C, *S]``.
        average: ``"none"`` keeps channels apart; ``"channels"`` averages them
            (only meaningful when all channels share units, e.g. normalised data).
    """

    full_state_update = False
    is_differentiable = False

    def __init__(
        self,
        num_channels: int,
        spatial_shape: Sequence[int] | None = None,
        average: Average = "none",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        self.num_channels = int(num_channels)
        self.spatial_shape = check_spatial_shape(spatial_shape)
        self.average = check_average(average)
        self._state_shape = (
            (self.num_channels,)
            if self.spatial_shape is None
            else (self.num_channels, *self.spatial_shape)
        )

    def _add_sum_state(self, name: str) -> None:
        self.add_state(
            name,
            default=torch.zeros(self._state_shape, dtype=torch.float64),
            dist_reduce_fx="sum",
        )

    def _check_field(self, x: Tensor, name: str) -> None:
        check_field(x, name)
        if x.shape[1] != self.num_channels:
            raise ValueError(
                f"{name} has {x.shape[1]} channels, the metric was built for {self.num_channels}"
            )
        if self.spatial_shape is not None and tuple(x.shape[2:]) != self.spatial_shape:
            raise ValueError(
                f"{name} has spatial shape {tuple(x.shape[2:])}, expected {self.spatial_shape}"
            )

    def _sum_points(self, v: Tensor) -> Tensor:
        """``[B, C, *S] -> [C]`` (sum over samples and points) or ``[C, *S]`` (over samples)."""
        if self.spatial_shape is None:
            return v.sum(dim=(0, *range(2, v.ndim)))
        return v.sum(dim=0)

    def _reduce_channels(self, value: Tensor) -> Tensor:
        return value.mean(dim=0) if self.average == "channels" else value
