"""Rank-agnostic tensor helpers: broadcasting per-sample scalars over ``[B, C, *S]``."""

from __future__ import annotations

import torch
from torch import Tensor


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """View ``v`` (shape ``[B]`` or ``[B, ...]``) with trailing singleton dims up to ``ndim``.

    >>> import torch
    >>> append_dims(torch.ones(4), 5).shape
    torch.Size([4, 1, 1, 1, 1])
    """
    extra = ndim - v.ndim
    if extra < 0:
        raise ValueError(f"append_dims: tensor has {v.ndim} dims, more than the target {ndim}")
    return v.reshape(*v.shape, *([1] * extra))


def check_field(x: Tensor, name: str = "x") -> None:
    """Raise ``ValueError`` (naming ``name``) unless ``x`` is a floating-point ``[B, C, *S]`` with
    1, 2 or 3 spatial dims."""
    if not 3 <= x.ndim <= 5:
        raise ValueError(
            f"{name} must be [B, C, *spatial] with 1-3 spatial dims, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor (fields are real-valued), got {x.dtype}")


def check_broadcast(part: Tensor, x: Tensor, name: str, target: str = "x0") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``part`` has ``x``'s rank and broadcasts to it
    (a mask or point weights ``[B or 1, C or 1, *S or 1]``)."""
    try:
        fits = part.ndim == x.ndim and torch.broadcast_shapes(part.shape, x.shape) == x.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"{name} of shape {tuple(part.shape)} does not broadcast to {target} of shape {tuple(x.shape)}")


def mean_flat(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over all non-batch dims, ``[B, ...] -> [B]``; with ``mask`` (1 = valid,
    broadcastable to ``x``), the mean over valid points only."""
    dims = tuple(range(1, x.ndim))
    if mask is None:
        return x.mean(dim=dims)
    mask = mask.to(x.dtype).expand_as(x)
    return (x * mask).sum(dim=dims) / mask.sum(dim=dims).clamp_min(1.0)
