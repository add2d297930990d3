"""Deterministic train/val/test splits of a store's samples.

A sample is one position on the grid of the *sample dims* (``("time",)``, or
``("simulation", "time")`` for an ensemble of runs); its flat index is the
C-order position on that grid. Each split class returns, for the names
``train``, ``val`` and ``test``, sorted int64 flat indices, and raises if two
splits share a sample. Choose the class in the config (``_target_``):

* :class:`IndexSplit` — half-open ranges of flat indices, ``train: [0, 800]``;
* :class:`FractionSplit` — contiguous fractions (optionally shuffled with a seed,
  or whole groups of a coordinate, e.g. whole simulations);
* :class:`CoordinateSplit` — inclusive ranges of a coordinate's values, e.g.
  ``coord: time.year, train: [1980, 2009]`` or ``coord: time, test: ["2015-01-01", "2019-12-31"]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

SPLIT_NAMES = ("train", "val", "test")

Range = Sequence[Any]  # (lo, hi), or a list of such pairs


def sample_grid_shape(ds: xr.Dataset, sample_dims: Sequence[str]) -> tuple[int, ...]:
    missing = [d for d in sample_dims if d not in ds.sizes]
    if missing:
        raise ValueError(f"sample dims {missing} are not dimensions of the store (it has {dict(ds.sizes)})")
    return tuple(int(ds.sizes[d]) for d in sample_dims)


def _pairs(rng: Range | None, what: str) -> list[tuple[Any, Any]]:
    """``(lo, hi)`` or ``[(lo, hi), ...]`` -> list of pairs."""
    if rng is None:
        return []
    rng = list(rng)
    if len(rng) == 2 and not any(isinstance(r, (list, tuple)) or _is_listconfig(r) for r in rng):
        return [(rng[0], rng[1])]
    pairs = []
    for r in rng:
        r = list(r)
        if len(r) != 2:
            raise ValueError(f"{what}: a range is a pair [lo, hi], got {r!r}")
        pairs.append((r[0], r[1]))
    return pairs


def _is_listconfig(obj: Any) -> bool:
    return type(obj).__name__ == "ListConfig"


def check_disjoint(splits: Mapping[str, np.ndarray]) -> None:
    """Raise ``ValueError`` naming the two splits if any sample is in both."""
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            common = np.intersect1d(splits[a], splits[b])
            if common.size:
                raise ValueError(
                    f"splits {a!r} and {b!r} overlap in {common.size} samples (first flat indices "
                    f"{common[:5].tolist()}); give them disjoint ranges"
                )


def _finish(splits: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {k: np.unique(np.asarray(v, np.int64)) for k, v in splits.items()}
    check_disjoint(out)
    if out["train"].size == 0:
        raise ValueError("the training split is empty")
    return out


@dataclass(frozen=True)
class IndexSplit:
    """Half-open ranges ``[lo, hi)`` of flat sample indices; ``hi = None`` runs to the end,
    negative values count from the end. A split may be a list of ranges."""

    train: Range
    val: Range | None = None
    test: Range | None = None

    def indices(self, ds: xr.Dataset, sample_dims: Sequence[str]) -> dict[str, np.ndarray]:
        n = int(np.prod(sample_grid_shape(ds, sample_dims)))
        out = {}
        for name in SPLIT_NAMES:
            parts = []
            for lo, hi in _pairs(getattr(self, name), f"IndexSplit.{name}"):
                lo = 0 if lo is None else int(lo)
                hi = n if hi is None else int(hi)
                lo, hi = (lo + n if lo < 0 else lo), (hi + n if hi < 0 else hi)
                if not 0 <= lo <= hi <= n:
                    raise ValueError(f"IndexSplit.{name}: range [{lo}, {hi}) is outside the {n} samples")
                parts.append(np.arange(lo, hi))
            out[name] = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return _finish(out)


@dataclass(frozen=True)
class FractionSplit:
    """Fractions of the samples, in order: the first ``train`` of them, then ``val``, then ``test``.

    ``shuffle=True`` permutes first with ``seed`` (deterministic). ``group`` (a sample
    dim, or a coordinate along the sample dims such as ``simulation``) splits whole
    groups instead, in the order of the group's sorted values: e.g. every month of a
    simulation lands in the same split, so no split sees another's parameter setting.
    """

    train: float = 0.8
    val: float = 0.1
    test: float = 0.1
    shuffle: bool = False
    seed: int = 0
    group: str | None = None

    def indices(self, ds: xr.Dataset, sample_dims: Sequence[str]) -> dict[str, np.ndarray]:
        shape = sample_grid_shape(ds, sample_dims)
        fr = np.array([self.train, self.val, self.test], np.float64)
        if (fr < 0).any() or fr.sum() > 1 + 1e-9:
            raise ValueError(f"FractionSplit: fractions {fr.tolist()} must be >= 0 and sum to at most 1")
        if self.group is None:
            labels = np.arange(int(np.prod(shape)))
        else:
            labels = _on_sample_grid(ds, self.group, sample_dims, "FractionSplit.group")
        groups, inverse = np.unique(labels, return_inverse=True)
        order = np.arange(groups.size)
        if self.shuffle:
            order = np.random.default_rng(self.seed).permutation(groups.size)
        bounds = np.round(np.cumsum(np.concatenate([[0.0], fr])) * groups.size).astype(np.int64)
        out = {}
        for k, name in enumerate(SPLIT_NAMES):
            out[name] = np.flatnonzero(np.isin(inverse, order[bounds[k] : bounds[k + 1]]))
        return _finish(out)


def _on_sample_grid(ds: xr.Dataset, name: str, sample_dims: Sequence[str], argument: str) -> np.ndarray:
    """The values of ``ds[name]`` (dims among the sample dims) broadcast over the sample grid, flat."""
    shape = sample_grid_shape(ds, sample_dims)
    try:
        values = ds[name]
    except KeyError as err:
        raise ValueError(
            f"{argument}={name!r} is not a coordinate or variable of the store (coordinates: {list(ds.coords)}, "
            f"sample dims: {list(sample_dims)})"
        ) from err
    extra = [d for d in values.dims if d not in sample_dims]
    if extra:
        raise ValueError(f"{argument}={name!r} has dims {values.dims}; {extra} are not sample dims {list(sample_dims)}")
    template = xr.DataArray(np.zeros(shape, np.int8), dims=tuple(sample_dims))
    values = xr.DataArray(values.variable.values, dims=values.dims)
    return xr.broadcast(values, template)[0].transpose(*sample_dims).values.ravel()


@dataclass(frozen=True)
class CoordinateSplit:
    """Inclusive ranges ``[lo, hi]`` of a coordinate's values along the sample dims.

    ``coord`` is any variable or coordinate whose dims are sample dims, including
    xarray's virtual datetime components (``"time.year"``, ``"time.month"``). Dates
    may be strings (``"1995-01-01"``); they are compared as ``datetime64``.
    """

    coord: str
    train: Range
    val: Range | None = None
    test: Range | None = None

    def indices(self, ds: xr.Dataset, sample_dims: Sequence[str]) -> dict[str, np.ndarray]:
        v = _on_sample_grid(ds, self.coord, sample_dims, "CoordinateSplit.coord")
        out = {}
        for name in SPLIT_NAMES:
            sel = np.zeros(v.shape, bool)
            for lo, hi in _pairs(getattr(self, name), f"CoordinateSplit.{name}"):
                lo, hi = _as_coord_value(lo, v), _as_coord_value(hi, v)
                sel |= ((v >= lo) if lo is not None else True) & ((v <= hi) if hi is not None else True)
            out[name] = np.flatnonzero(sel)
        return _finish(out)


def _as_coord_value(value: Any, like: np.ndarray) -> Any:
    if value is None:
        return None
    if np.issubdtype(like.dtype, np.datetime64):
        return np.datetime64(str(value))
    return value
