"""Reversible per-channel normalisation between physical units and model space.

Every channel ``c`` (a variable, a level of a variable, or a parameter) goes
through a pointwise warp ``g_c`` and then an affine scaling::

    y_c = (g_c(x_c) - shift_c) / scale_c            physical x  ->  normalised y
    x_c = g_c^{-1}(shift_c + scale_c * y_c)          the inverse

with ``g`` one of ``none`` (identity), ``log`` (``log(x + offset)``) or ``log1p``
(``log(1 + x)``), and the scaling chosen from statistics of ``g(x)`` on the
training split: ``zscore`` (shift = mean, scale = std), ``minmax`` (to
``[-1, 1]``: shift = (max + min) / 2, scale = (max - min) / 2), ``fixed``
(a known physical shift and scale from the config, no statistics), ``none``,
or ``anomaly``: the standardised anomaly, with a shift and scale *per grid
point* (that point's mean and std over the training split), so ``shift_c`` and
``scale_c`` are maps of the field's spatial shape instead of numbers.

The map is diagonal, so the log-determinant of its Jacobian is a sum of
per-point terms (``log |dy/dx| = log g'(x) - log scale``). Likelihoods computed
in model space convert to physical units with it::

    log p_phys(x) = log p_model(T(x)) + log|det dT/dx|(x)

The same class serves fields ``[B, C, *S]`` and parameters ``[B, P]``: the
channel axis is axis 1 in both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

import torch
from torch import Tensor

Pointwise = Literal["none", "log", "log1p"]
Scaling = Literal["zscore", "minmax", "fixed", "none", "anomaly"]
# The user-facing name of a transform: the warp and its default scaling.
TransformName = Literal["zscore", "minmax", "log", "log1p", "none", "anomaly"]

_NAMED: dict[str, tuple[str, str]] = {
    "zscore": ("none", "zscore"),
    "minmax": ("none", "minmax"),
    "log": ("log", "zscore"),
    "log1p": ("log1p", "zscore"),
    "none": ("none", "none"),
    "anomaly": ("none", "anomaly"),
}


def check_mode(value: Any, allowed: Any, argument: str) -> str:
    """Return ``value`` if it is one of the ``Literal`` ``allowed``, else raise naming ``argument``."""
    options = get_args(allowed)
    if value not in options:
        raise ValueError(f"{argument}={value!r} is not one of {list(options)}")
    return value


def resolve_transform(
    transform: TransformName, scaling: Scaling | None = None, argument: str = "transform"
) -> tuple[Pointwise, Scaling]:
    """``"log1p"`` -> ``("log1p", "zscore")``; ``scaling`` overrides the default scaling."""
    check_mode(transform, TransformName, argument)
    pointwise, default_scaling = _NAMED[transform]
    if scaling is not None:
        check_mode(scaling, Scaling, f"{argument} scaling")
    return pointwise, (scaling or default_scaling)


def warp(x: Tensor, pointwise: str, offset: float) -> Tensor:
    """``g(x)``: the pointwise part of the transform."""
    if pointwise == "none":
        return x
    if pointwise == "log":
        return torch.log(x + offset)
    if pointwise == "log1p":
        return torch.log1p(x)
    raise ValueError(f"pointwise={pointwise!r} is not one of {list(get_args(Pointwise))}")


def unwarp(u: Tensor, pointwise: str, offset: float) -> Tensor:
    """``g^{-1}(u)``."""
    if pointwise == "none":
        return u
    if pointwise == "log":
        return torch.exp(u) - offset
    if pointwise == "log1p":
        return torch.expm1(u)
    raise ValueError(f"pointwise={pointwise!r} is not one of {list(get_args(Pointwise))}")


def log_warp_derivative(x: Tensor, pointwise: str, offset: float) -> Tensor:
    """``log g'(x)`` elementwise: 0, ``-log(x + offset)`` or ``-log1p(x)``."""
    if pointwise == "none":
        return torch.zeros_like(x)
    if pointwise == "log":
        return -torch.log(x + offset)
    if pointwise == "log1p":
        return -torch.log1p(x)
    raise ValueError(f"pointwise={pointwise!r} is not one of {list(get_args(Pointwise))}")


def warp_domain_ok(x_min: float, pointwise: str, offset: float) -> bool:
    """Whether the smallest finite value lies where ``g`` is defined (and finite)."""
    if pointwise == "log":
        return x_min + offset > 0
    if pointwise == "log1p":
        return x_min > -1
    return True


def affine_from_stats(scaling: str, mean: float, std: float, vmin: float, vmax: float,
                      fixed_shift: float = 0.0, fixed_scale: float | None = None) -> tuple[float, float]:
    """``(shift, scale)`` of the affine part from statistics of ``g(x)`` (or the fixed pair)."""
    if scaling == "fixed":
        if fixed_scale is None or not fixed_scale > 0:
            raise ValueError(f"fixed scaling needs a scale > 0, got {fixed_scale!r}")
        return fixed_shift, fixed_scale
    if scaling == "zscore":
        return mean, std
    if scaling == "minmax":
        return 0.5 * (vmax + vmin), 0.5 * (vmax - vmin)
    if scaling == "none":
        return 0.0, 1.0
    if scaling == "anomaly":
        raise ValueError("anomaly scaling has a shift and scale per grid point: they come from the point "
                         "statistics (ChannelStats.affine), not from a channel's four moments")
    raise ValueError(f"scaling={scaling!r} is not one of {list(get_args(Scaling))}")


class ChannelTransform:
    """The per-channel map physical -> normalised along axis 1 (see module docstring).

    Args:
        names: one name per channel (``C`` of them), e.g. ``["t2m", "precip"]``.
        pointwise: ``"none" | "log" | "log1p"`` per channel.
        shift, scale: the affine part, in units of ``g(x)``; ``scale > 0``. Either one number
            per channel (``[C]``) or, when some channel is normalised per grid point
            (``anomaly``), one map per channel (``[C, *S]``, channels with one number given
            as a constant map); the transform then applies to fields of spatial shape ``S``
            only.
        log_offset: ``offset`` of ``log(x + offset)`` per channel (ignored otherwise).

    Example:
        >>> t = ChannelTransform(["a"], ["none"], shift=[2.0], scale=[4.0])
        >>> t(torch.tensor([[6.0]]))
        tensor([[1.]])
    """

    def __init__(
        self,
        names: Sequence[str],
        pointwise: Sequence[Pointwise],
        shift: Sequence[float] | Tensor,
        scale: Sequence[float] | Tensor,
        log_offset: Sequence[float] | None = None,
    ) -> None:
        self.names = tuple(str(n) for n in names)
        c = len(self.names)
        self.pointwise = tuple(check_mode(p, Pointwise, f"pointwise[{n}]") for p, n in zip(pointwise, self.names))
        self.shift = torch.as_tensor(shift, dtype=torch.float64)
        self.scale = torch.as_tensor(scale, dtype=torch.float64)
        if self.shift.ndim <= 1 and self.scale.ndim <= 1:
            self.shift, self.scale = self.shift.reshape(-1), self.scale.reshape(-1)
        elif self.shift.shape != self.scale.shape:
            raise ValueError(f"ChannelTransform: per-point shift {tuple(self.shift.shape)} and scale "
                             f"{tuple(self.scale.shape)} differ in shape")
        offsets = [0.0] * c if log_offset is None else list(log_offset)
        self.log_offset = tuple(float(o) for o in offsets)
        sizes = {"names": c, "pointwise": len(self.pointwise), "shift": self.shift.shape[0] if self.shift.ndim else 1,
                 "scale": self.scale.shape[0] if self.scale.ndim else 1, "log_offset": len(self.log_offset)}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"ChannelTransform: per-channel arguments disagree in length: {sizes}")
        bad = [n for n, s in zip(self.names, self.scale.reshape(c, -1) if c else [])
               if not bool(torch.all(s > 0) & torch.all(torch.isfinite(s)))]
        if bad:
            raise ValueError(f"ChannelTransform: scale must be finite and > 0; it is not for {bad}")

    @property
    def grid_shape(self) -> tuple[int, ...] | None:
        """The spatial shape ``S`` of per-point shift and scale maps (``anomaly``), else None."""
        return tuple(self.shift.shape[1:]) if self.shift.ndim > 1 else None

    @property
    def num_channels(self) -> int:
        return len(self.names)

    def _check(self, x: Tensor, what: str) -> None:
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"{what}: expected channels on axis 1 with {self.num_channels} entries "
                f"{list(self.names)}, got shape {tuple(x.shape)}"
            )

    def _per_channel(self, v: Tensor, x: Tensor) -> Tensor:
        if v.ndim == 1:
            return v.to(dtype=x.dtype, device=x.device).reshape(1, -1, *([1] * (x.ndim - 2)))
        if tuple(x.shape[2:]) != self.grid_shape:
            c = len(self.names)
            per_point = [n for n, s, k in zip(self.names, self.shift.reshape(c, -1), self.scale.reshape(c, -1))
                         if s.unique().numel() > 1 or k.unique().numel() > 1]
            raise ValueError(
                f"ChannelTransform: the channels {per_point or list(self.names)} are normalised per grid point "
                f"(transform 'anomaly') on a grid of shape {self.grid_shape}; these fields have spatial shape "
                f"{tuple(x.shape[2:])}. Give them on the training grid, or train with transform 'zscore'"
            )
        return v.to(dtype=x.dtype, device=x.device).unsqueeze(0)

    def _channelwise(self, x: Tensor, fn) -> Tensor:
        if all(p == "none" for p in self.pointwise):
            return x
        return torch.cat(
            [fn(x[:, c : c + 1], p, o) for c, (p, o) in enumerate(zip(self.pointwise, self.log_offset))], dim=1
        )

    def forward(self, x: Tensor) -> Tensor:
        """Physical ``[B, C, ...]`` -> normalised, same shape; NaN stays NaN."""
        self._check(x, "ChannelTransform.forward")
        u = self._channelwise(x, warp)
        return (u - self._per_channel(self.shift, x)) / self._per_channel(self.scale, x)

    __call__ = forward

    def inverse(self, y: Tensor) -> Tensor:
        """Normalised ``[B, C, ...]`` -> physical units, same shape."""
        self._check(y, "ChannelTransform.inverse")
        u = y * self._per_channel(self.scale, y) + self._per_channel(self.shift, y)
        return self._channelwise(u, unwarp)

    def log_abs_det_jacobian(self, x_physical: Tensor, mask: Tensor | None = None,
                             point_weights: Tensor | None = None) -> Tensor:
        """``log |det d forward / d x|`` per sample, in nats: ``[B, C, ...] -> [B]`` (float64).

        The map is diagonal, so this is ``sum over valid points of
        (log g'_c(x) - log scale_c)``. ``mask`` (1 = valid, broadcastable to
        ``x_physical``) excludes missing points; masked values (even NaN) are
        ignored. Add it to a log-likelihood of the normalised data to get the
        log-likelihood of the physical data (in the physical units' measure).
        ``point_weights`` (broadcastable, e.g. area weights normalised to a mean of 1
        over the valid points) weigh each point's term: the sum whose per-point mean
        belongs beside an area-weighted bound.
        """
        self._check(x_physical, "ChannelTransform.log_abs_det_jacobian")
        x = x_physical.to(torch.float64)
        terms = self._channelwise(x, log_warp_derivative) if any(p != "none" for p in self.pointwise) else 0.0
        terms = terms - torch.log(self._per_channel(self.scale, x))
        terms = torch.broadcast_to(terms, x.shape)
        if mask is not None:
            valid = torch.broadcast_to(mask.to(device=x.device) != 0, x.shape)
            terms = torch.where(valid, terms, torch.zeros((), dtype=x.dtype, device=x.device))
        if point_weights is not None:
            terms = terms * torch.broadcast_to(point_weights.to(device=x.device, dtype=x.dtype), x.shape)
        return terms.reshape(x.shape[0], -1).sum(dim=1)

    def select(self, names: Sequence[str]) -> ChannelTransform:
        """The transform of a subset of channels, in the given order."""
        missing = [n for n in names if n not in self.names]
        if missing:
            raise ValueError(f"ChannelTransform.select: unknown channels {missing}; have {list(self.names)}")
        idx = [self.names.index(n) for n in names]
        return ChannelTransform(
            names, [self.pointwise[i] for i in idx], self.shift[idx], self.scale[idx],
            [self.log_offset[i] for i in idx],
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain python (JSON-able) state; :meth:`from_state` rebuilds the transform."""
        return {
            "names": list(self.names),
            "pointwise": list(self.pointwise),
            "shift": self.shift.tolist(),
            "scale": self.scale.tolist(),
            "log_offset": list(self.log_offset),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ChannelTransform:
        return cls(state["names"], state["pointwise"], state["shift"], state["scale"], state.get("log_offset"))

    @classmethod
    def identity(cls, names: Sequence[str]) -> ChannelTransform:
        return cls(names, ["none"] * len(names), [0.0] * len(names), [1.0] * len(names))

    def __repr__(self) -> str:
        def short(v: Tensor) -> str:
            if v.numel() == 1 or v.unique().numel() == 1:
                return f"{float(v.reshape(-1)[0]):.4g}"
            return f"[{float(v.min()):.4g}..{float(v.max()):.4g}] per point"

        parts = [f"{n}: {p}, shift={short(s)}, scale={short(k)}"
                 for n, p, s, k in zip(self.names, self.pointwise, self.shift, self.scale)]
        return "ChannelTransform(" + "; ".join(parts) + ")"
