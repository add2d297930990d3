"""The data side of an evaluation: the checkpoint's data set rebuilt, the samples to
evaluate, the grid, and the store's exact log-likelihood.

* :func:`build_datamodule` -- the checkpoint's data module with its normalisation
  statistics and split indices restored, never recomputed;
* :func:`split_indices` -- the flat store indices of the evaluated split (or of an
  ensemble store's samples) and the matching ensemble positions;
* :func:`grid_spacing`, :func:`grid_units`, :func:`area_weights` -- the grid's spacing and
  units per spatial axis, and the cos-latitude weights of lat/lon grids;
* :func:`true_log_likelihood` (:class:`TrueLogLikelihood`) -- a per-sample log-density
  variable of the store (e.g. the GRF generator's), for the gap bound - true NLL;
* :func:`on_device`, :func:`condition_of` -- a batch's mask and condition on the device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor

from scidiff.conditioning import Conditioning
from scidiff.evaluation.result import EvaluationError

if TYPE_CHECKING:
    from scidiff.evaluation.members import EnsembleSource

LAT_NAMES = ("lat", "latitude")


# ------------------------------------------------------------------------ the data set
def build_datamodule(pretrained, data_path: str | os.PathLike | None = None):
    """The checkpoint's :class:`~scidiff.data.FieldDataModule` with its statistics and
    splits restored (nothing recomputed); ``data_path`` replaces the store's path."""
    import hydra.utils as hu

    cfg = pretrained.config.get("data")
    if not isinstance(cfg, Mapping) or "_target_" not in cfg:
        raise EvaluationError(f"checkpoint: {pretrained.checkpoint} has no data config to rebuild the data set from")
    path = os.fspath(data_path) if data_path is not None else cfg.get("path")
    if path is None or not os.path.exists(path):
        key = "data_path" if data_path is not None else "data_path (the checkpoint's data.path)"
        raise EvaluationError(f"{key}: dataset {path} does not exist (pass data_path=<store>)")
    overrides = {"path": path, "num_workers": 0, "statistics_path": None}
    try:
        dm = hu.instantiate(dict(cfg), **overrides)
    except Exception as exc:  # noqa: BLE001 - instantiate wraps everything; report one line
        cause = exc.__cause__ or exc
        raise EvaluationError(f"data: cannot open {path} with the checkpoint's data config ({cause})") from None
    state = {"statistics": pretrained.statistics.state_dict(),
             "split_indices": {k: list(v) for k, v in pretrained.split_indices.items()}}
    dm.load_state_dict(state)
    if dm.split_indices is None:  # an old checkpoint without indices: the split is recomputed, not the statistics
        dm.setup()
    if tuple(dm.metadata.channel_names) != tuple(pretrained.metadata.channel_names):
        raise EvaluationError(
            f"data_path: {path} has channels {list(dm.metadata.channel_names)}, the checkpoint was trained on "
            f"{list(pretrained.metadata.channel_names)}"
        )
    if tuple(dm.metadata.spatial_shape) != tuple(pretrained.metadata.spatial_shape):
        raise EvaluationError(
            f"data_path: {path} has grid {tuple(dm.metadata.spatial_shape)}, the checkpoint was trained on "
            f"{tuple(pretrained.metadata.spatial_shape)}"
        )
    return dm


def grid_spacing(metadata) -> tuple[float, ...]:
    """Spacing per spatial axis from 1-D coordinates on the spatial dims (1 where unknown)."""
    out = []
    for dim, n in zip(metadata.spatial_dims, metadata.spatial_shape):
        c = metadata.coords.get(dim)
        if c is not None and np.ndim(c) == 1 and len(c) == n and n > 1 and np.issubdtype(np.asarray(c).dtype, np.number):
            d = float(np.abs(np.diff(np.asarray(c, np.float64))).mean())
            out.append(d if d > 0 else 1.0)
        else:
            out.append(1.0)
    return tuple(out)


def grid_units(metadata) -> tuple[str, ...]:
    """The length unit of each spatial axis, as :func:`grid_spacing` measures it: the
    coordinate's ``units`` attribute, else (no unit, or ``1``) ``grid spacing`` for unit
    steps (no coordinate, or positions 0, 1, ...), else ``<dim> units``."""
    out = []
    for dim, spacing in zip(metadata.spatial_dims, grid_spacing(metadata)):
        attrs = (getattr(metadata, "coord_attrs", None) or {}).get(dim) or {}
        unit = str(attrs.get("units", "")).strip()
        if unit in ("", "1"):  # positions in grid spacings, or a coordinate without a unit
            unit = "grid spacing" if spacing == 1.0 else f"{dim} units"
        out.append(unit)
    return tuple(out)


def area_weights(metadata, mode: Literal["auto", "none"]) -> Tensor | None:
    """cos(latitude) weights ``[*S]`` (float64) on a lat/lon grid, else None; ``mode`` is
    the metric suite's ``area_weights`` (checked there): ``none`` gives None."""
    if mode == "none":
        return None
    for axis, dim in enumerate(metadata.spatial_dims):
        lat = metadata.coords.get(dim)
        if dim.lower() in LAT_NAMES and lat is not None and np.ndim(lat) == 1:
            w = np.cos(np.deg2rad(np.asarray(lat, np.float64))).clip(min=0.0)
            shape = [1] * len(metadata.spatial_shape)
            shape[axis] = -1
            return torch.from_numpy(w).reshape(shape).expand(*metadata.spatial_shape).contiguous()
    return None


def split_indices(dm, split: str, max_samples: int | None,
                  ensemble: EnsembleSource | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat store indices to evaluate, the matching ensemble positions or None): the
    ensemble's ``data_index`` samples when it has them, else the split's, the first
    ``max_samples`` of them."""
    positions = None
    if ensemble is not None and ensemble.data_indices() is not None:
        indices = ensemble.data_indices()
        positions = np.arange(indices.size)
        total = int(np.prod(dm.metadata.sample_shape))
        if indices.size and (indices.min() < 0 or indices.max() >= total):
            raise EvaluationError(f"ensemble: {ensemble.index_coord} holds indices outside the data store's {total} samples")
    else:
        indices = np.asarray(dm.split_indices[split], np.int64)
    if max_samples is not None:
        indices = indices[: max_samples]
        positions = None if positions is None else positions[: max_samples]
    if indices.size == 0:
        raise EvaluationError(f"split: the {split!r} split of this data set is empty (choose another split)")
    if ensemble is not None and positions is None:
        if ensemble.size < indices.size:
            raise EvaluationError(
                f"ensemble: {ensemble.path} has {ensemble.size} samples, fewer than the {indices.size} data samples "
                f"of split {split!r} (set max_samples or give the matching data)"
            )
        positions = np.arange(indices.size)
    return indices, positions


def on_device(t: Tensor | None, device) -> Tensor | None:
    """``t`` on ``device`` (None stays None)."""
    return None if t is None else t.to(device)


def condition_of(batch: Mapping[str, Tensor], device) -> Conditioning | None:
    """The batch's (normalised) parameters, conditioning fields and embedding on ``device``, or None."""
    parts = {k: batch.get(k) for k in ("params", "fields", "embedding")}
    if all(v is None for v in parts.values()):
        return None
    return Conditioning(**{k: on_device(v, device) for k, v in parts.items()})


# ---------------------------------------------------------------------------- true NLL
NAT_UNITS = ("nat", "nats", "")


@dataclass(frozen=True)
class TrueLogLikelihood:
    """The data store's exact per-sample log-density, for the gap (bound - true NLL).

    Attributes:
        values: ``[N_store]`` float64 log p(x_j) in nats, physical units, by flat store index.
        variable: the store variable it was read from.
        conditional: True when the model is not given parameters the store's density is
            conditioned on (they vary across the evaluated samples): the values are then
            -log p(x | params), not the marginal NLL the unconditional model bounds.
        unconditioned: those parameters.
    """

    values: np.ndarray
    variable: str
    conditional: bool
    unconditioned: tuple[str, ...]

    @property
    def prefix(self) -> tuple[str, str]:
        """(name of the NLL, name of the gaps): ``("true_nll_bpd", "gap")`` or
        ``("conditional_nll_bpd", "gap_conditional")``."""
        return ("conditional_nll_bpd", "gap_conditional") if self.conditional else ("true_nll_bpd", "gap")

    def describe(self) -> str:
        if not self.conditional:
            return f"{self.variable}: exact log-density of each sample given its parameters (nats, physical units)"
        return (f"{self.variable}: conditional NLL -log p(x | {', '.join(self.unconditioned)}); the model is not "
                "conditioned on these, so this is not its marginal NLL (no per-sample bound is implied; "
                "on average it lies below the marginal NLL by I(x; params)/d, so gap_conditional overstates the gap)")


def true_log_likelihood(dm, pretrained, indices: np.ndarray, variable: str | None) -> TrueLogLikelihood | None:
    """The store's exact log-likelihood variable, or None when it is absent (or ``variable`` is None).

    The variable must have exactly the store's sample dims (one value per sample), be
    finite at the evaluated ``indices`` (flat store indices) and be in nats (``units``
    ``nat``/``nats`` or none). It is the log-density of the fields in physical units,
    like ``bpd``.

    **Conditional or not.** A generator's stored log-density is that of the field
    *given its parameters*. For a model conditioned on all parameters that vary across
    the evaluated samples (or a store whose parameters are constant there) that is the
    true NLL of what the model bounds. For a model that is not given some of them (an
    unconditional model on a mixture), the model's bound is on the marginal -log p(x),
    and -log p(x | params) is not a per-sample lower bound of it; over i.i.d. samples its
    mean estimates H(x | params) = H(x) - I(x; params) <= H(x), so the "gap" to it
    overstates the model's gap by the mutual information per dimension. The numbers are
    then still reported, under other names (``conditional_nll_bpd``,
    ``gap_conditional/...``), with a warning, never as ``true_nll_bpd``.
    """
    if variable is None:
        return None
    ds = dm.open_store()
    try:
        if variable not in ds.variables:
            return None
        da = ds[variable]
        sample_dims = tuple(dm.metadata.sample_dims)
        if set(da.dims) != set(sample_dims):
            raise EvaluationError(
                f"metrics.true_loglik_variable: {variable!r} in {dm.path} has dims {da.dims}, expected the sample "
                f"dims {sample_dims} (one log-likelihood per sample; null to ignore it)"
            )
        units = str(da.attrs.get("units", "")).strip().lower()
        if units not in NAT_UNITS:
            raise EvaluationError(
                f"metrics.true_loglik_variable: {variable!r} in {dm.path} has units {da.attrs.get('units')!r}; "
                "expected nats (units 'nat')"
            )
        values = np.asarray(da.transpose(*sample_dims).values, np.float64).reshape(-1)
        if not np.all(np.isfinite(values[indices])):
            raise EvaluationError(f"metrics.true_loglik_variable: {variable!r} in {dm.path} is not finite for "
                                  "every evaluated sample")
        names = str(ds.attrs.get("parameters", "")).split()
        if not names:  # no declared parameters: every other 1-D numeric variable along the sample dims
            names = [n for n, v in ds.data_vars.items() if n != variable and set(v.dims) == set(sample_dims)
                     and np.issubdtype(v.dtype, np.number)]
        model_params = set(pretrained.metadata.param_names)
        unconditioned = []
        for name in names:
            if name in model_params or name not in ds.variables or set(ds[name].dims) != set(sample_dims):
                continue
            p = np.asarray(ds[name].transpose(*sample_dims).values, np.float64).reshape(-1)[indices]
            if p.size and np.nanmax(p) - np.nanmin(p) > 1e-9 * max(1.0, float(np.nanmax(np.abs(p)))):
                unconditioned.append(name)
    finally:
        ds.close()
    return TrueLogLikelihood(values, variable, bool(unconditioned), tuple(unconditioned))


__all__ = [
    "TrueLogLikelihood",
    "area_weights",
    "build_datamodule",
    "condition_of",
    "grid_spacing",
    "grid_units",
    "on_device",
    "split_indices",
    "true_log_likelihood",
]
