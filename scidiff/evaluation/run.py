"""The evaluation loop: the variational bound of held-out data and the metrics of samples.

:func:`evaluate` takes a trained model (:class:`~scidiff.training.pretrained.Pretrained`)
and one split of its data set, rebuilt from the checkpoint's ``data`` config with the
checkpoint's normalisation statistics and split indices (never recomputed), and computes

* the variational bound of every data sample (exact over all T terms, or the
  importance-sampled estimate with its standard error) in bits/dim **in physical
  units** (the data transform's log-determinant included, masks and area weights
  honoured), with its per-timestep terms, and again for each requested reverse
  variance (``fixed_small``, ``fixed_large``, ``learned_range``, ``optimal``);
* an ensemble of ``members`` samples per data sample (``sampler``, through the one
  generation path of :mod:`scidiff.inference.generation`), conditioned on that
  sample's parameters/fields (or read from a ``scidiff-sample`` store), and its
  metrics against the data: power spectra and spectral error (the mean over
  wavenumber shells of ``|ln(P_samples(k) / P_data(k))|``, dimensionless: 0.1 is about
  10% off on a typical scale), fair CRPS, spread-skill ratio, energy score, rank
  histogram, bias/std maps, Wasserstein-1, and for voxel densities the atom counts;
* the **noise floor** of every sample metric (``floor/<metric>``): the same metrics for
  ensembles of ``members`` real fields of the store, the nearest neighbours of each
  sample in condition space (:mod:`scidiff.evaluation.floor`), and the **verdict**:
  each metric against its floor, pass or fail (:mod:`scidiff.evaluation.verdict`).

Randomness is keyed by (seed, store index, member): the number for sample ``j`` is the
same whatever the batch size or the number of ranks. Under ``torch.distributed`` each
rank takes every ``world_size``-th sample; the metrics are torchmetrics with sum
reductions, and per-sample values are gathered, so every rank returns the same
:class:`Evaluation` (only rank 0 should write or log it).
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from scidiff.conditioning import Conditioning
from scidiff.diffusion import likelihood
from scidiff.evaluation.ensemble import CRPS, EnergyScore, RankHistogram, SpreadSkillRatio
from scidiff.evaluation.fields import BiasStdMaps, Wasserstein1
from scidiff.evaluation.floor import FloorEnsemble, FloorSettings, prefixed
from scidiff.evaluation.floor import check_settings as check_floor_settings
from scidiff.evaluation.likelihood import BitsPerDim, BoundTerms
from scidiff.evaluation.molecules import AtomCounts
from scidiff.evaluation.spectra import SpectralError
from scidiff.evaluation.verdict import Verdict, VerdictSettings, judge
from scidiff.evaluation.verdict import check_settings as check_verdict_settings
from scidiff.inference.generation import DDIM, GuidanceSpec, Sampler, initial_noise, sample_model
from scidiff.inference.runtime import DeviceError, current_context, resolve_device
from scidiff.inference.seeds import generator

LN2 = math.log(2.0)
Estimator = Literal["exact", "importance"]
SPLITS = ("train", "val", "test")
VARIANCE_CHOICES = ("fixed_small", "fixed_large", "learned_range", "optimal")
LAT_NAMES = ("lat", "latitude")


class EvaluationError(ValueError):
    """An evaluation that cannot run as asked; the message names the setting or the file."""


# ----------------------------------------------------------------------------- settings
@dataclass
class BoundSettings:
    """Args:
    enabled: compute the bound at all.
    estimator: ``"exact"`` (all T terms, per-timestep terms kept) or ``"importance"``
        (K = ``num_terms`` sampled denoising terms, unbiased, with a standard error).
    num_terms: K of the importance estimator.
    timestep_batch: (sample, timestep) pairs per denoiser call of the exact bound.
    variance: reverse variances evaluated besides the model's own; ``"optimal"`` is the
        Analytic-DPM variance estimated from ``optimal_samples`` training samples at
        ``optimal_timesteps`` timesteps (interpolated in between).
    """

    enabled: bool = True
    estimator: Estimator = "exact"
    num_terms: int = 16
    timestep_batch: int = 50
    variance: Sequence[str] = ()
    optimal_samples: int = 64
    optimal_timesteps: int = 100


@dataclass
class ODESettings:
    """Args: enabled (the exact NLL through the probability-flow ODE, Hutchinson trace);
    num_steps (Heun steps on a fixed grid: every rank does the same work); num_probes."""

    enabled: bool = False
    num_steps: int = 100
    num_probes: int = 4


@dataclass
class SamplingSettings:
    """Args: enabled (generate members and score them); members per data sample (>= 2).
    Which sampler and guidance: :attr:`EvaluationSettings.sampler` and ``guidance``."""

    enabled: bool = True
    members: int = 4


@dataclass
class MetricSettings:
    """Args:
    area_weights: ``"auto"`` (cos latitude when a spatial dim is lat/latitude) or ``"none"``.
    wasserstein_bins: histogram bins of the Wasserstein-1 distance.
    spectral_max_wavenumber: highest shell of the spectral error (None: Nyquist).
    atoms: ``"auto"`` (3-D fields in number-density units, ``*-3``), ``"on"`` or ``"off"``.
    atom_threshold, atom_min_distance: peak finding of the atom counts.
    true_loglik_variable: a per-sample variable of the data store holding the exact
        log-density of each sample (dims = the sample dims, nats, physical units, the
        density of exactly the fields the model is evaluated on), e.g. the GRF store's
        ``log_likelihood``; when present, the true NLL and the gap (bound - true) of
        every bound and of the ODE NLL are reported (see :func:`true_log_likelihood`).
        None: never; a store without it is evaluated without.
    """

    area_weights: Literal["auto", "none"] = "auto"
    wasserstein_bins: int = 1000
    spectral_max_wavenumber: float | None = None
    atoms: Literal["auto", "on", "off"] = "auto"
    atom_threshold: float = 0.1
    atom_min_distance: int = 1
    true_loglik_variable: str | None = "log_likelihood"


@dataclass
class EvaluationSettings:
    split: Literal["train", "val", "test"] = "test"
    max_samples: int | None = None
    batch_size: int = 16
    seed: int = 0
    num_panels: int = 4
    bound: BoundSettings = field(default_factory=BoundSettings)
    ode: ODESettings = field(default_factory=ODESettings)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    sampler: Sampler = field(default_factory=DDIM)
    guidance: GuidanceSpec = field(default_factory=GuidanceSpec)
    metrics: MetricSettings = field(default_factory=MetricSettings)
    floor: FloorSettings = field(default_factory=FloorSettings)
    verdict: VerdictSettings = field(default_factory=VerdictSettings)


# ------------------------------------------------------------------------------ result
@dataclass
class Evaluation:
    """Everything :func:`evaluate` computed, as numpy arrays and floats (physical units).

    Attributes:
        split: the split evaluated; ``indices`` ``[N]`` the samples' flat store indices.
        scalars: metric name -> value, names as logged under ``eval/<split>/`` (e.g.
            ``bpd``, ``bpd_se``, ``crps/<var>``).
        per_sample: name -> ``[N]`` (``bpd``, ``bpd_model``, ``log_det_bpd``, ``prior_bpd``,
            ``reconstruction_bpd``, ``bpd_se`` (importance), ``bpd/<variance>``, and with
            a true log-likelihood in the store ``true_nll_bpd`` and ``gap/<variance>``,
            ``gap/ode``, or ``conditional_nll_bpd`` and ``gap_conditional/...``).
        terms: ``[T]`` mean per-timestep bound terms in bits/dim (model units; column 0 is
            L_0): the exact terms, or with the importance estimator their unbiased
            (Horvitz-Thompson) estimates from the sampled timesteps (zero where no
            sample drew t; ``info["terms"]`` says which); either way they sum, with the
            mean prior term ``prior_bpd``, to the mean ``bpd_model``.
        wavenumber ``[K]``, power_data / power_samples ``[C, K]``: mean radial spectra.
        rank_histogram: ``[C, M + 1]`` relative frequencies.
        maps: name -> ``[C, *S]`` (``crps``, ``bias``, ``std_samples``, ``std_data``).
        panels_data / panels_samples: ``[n, C, *S]`` the first data samples and member 0.
        channel_names, units, spatial_dims, coords: from the checkpoint's metadata.
        info: provenance (checkpoint, sha256, estimator, ...), plain python.
        power_floor ``[C, K]``, rank_histogram_floor ``[C, M + 1]``: the same for the floor
            ensembles (real fields; :mod:`scidiff.evaluation.floor`); their scalars are
            ``floor/<metric>`` in ``scalars``.
        floor_indices: ``[N, M]`` store indices of each sample's floor ensemble.
        verdict: every sample metric against its floor (:mod:`scidiff.evaluation.verdict`),
            None without sampling or floor.
        grid_units: per spatial dim, the unit of its coordinate (``units`` attribute), or
            ``grid spacing`` (no coordinate, unit steps), or ``<dim> units``.
    """

    split: str
    indices: np.ndarray
    scalars: dict[str, float]
    per_sample: dict[str, np.ndarray]
    terms: np.ndarray | None
    wavenumber: np.ndarray | None
    power_data: np.ndarray | None
    power_samples: np.ndarray | None
    rank_histogram: np.ndarray | None
    maps: dict[str, np.ndarray]
    panels_data: np.ndarray | None
    panels_samples: np.ndarray | None
    channel_names: tuple[str, ...]
    units: tuple[str, ...]
    spatial_dims: tuple[str, ...]
    coords: dict[str, np.ndarray]
    info: dict[str, Any]
    power_floor: np.ndarray | None = None
    rank_histogram_floor: np.ndarray | None = None
    floor_indices: np.ndarray | None = None
    verdict: Verdict | None = None
    grid_units: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- helpers
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


def area_weights(metadata, mode: str) -> Tensor | None:
    """cos(latitude) weights ``[*S]`` (float64) on a lat/lon grid, else None."""
    if mode == "none":
        return None
    if mode != "auto":
        raise EvaluationError(f"metrics.area_weights: expected auto or none, got {mode!r}")
    for axis, dim in enumerate(metadata.spatial_dims):
        lat = metadata.coords.get(dim)
        if dim.lower() in LAT_NAMES and lat is not None and np.ndim(lat) == 1:
            w = np.cos(np.deg2rad(np.asarray(lat, np.float64))).clip(min=0.0)
            shape = [1] * len(metadata.spatial_shape)
            shape[axis] = -1
            return torch.from_numpy(w).reshape(shape).expand(*metadata.spatial_shape).contiguous()
    return None


def _atoms_enabled(metadata, mode: str) -> bool:
    if mode == "on":
        if len(metadata.spatial_shape) != 3:
            raise EvaluationError("metrics.atoms: on needs 3-D voxel fields")
        return True
    if mode == "off":
        return False
    return len(metadata.spatial_shape) == 3 and all(str(u).endswith("-3") for u in metadata.units)


def _value_ranges(pretrained) -> list[tuple[float, float]]:
    """Per-channel physical value range of the Wasserstein histograms: the training range
    widened by half its span on each side (in the transform's warped space)."""
    from scidiff.data.transforms import unwarp

    out = []
    for s in pretrained.statistics.x:
        span = max(s.max - s.min, 1e-12 * max(1.0, abs(s.max)))
        lo, hi = (float(unwarp(torch.tensor(v, dtype=torch.float64), s.pointwise, s.log_offset))
                  for v in (s.min - 0.5 * span, s.max + 0.5 * span))
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            lo, hi = (float(unwarp(torch.tensor(v, dtype=torch.float64), s.pointwise, s.log_offset))
                      for v in (s.min, s.max))
        out.append((lo, hi))
    return out


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
    from scidiff.data.dataset import open_store

    base = dm._base
    ds = open_store(dm.path, base.engine, base.open_kwargs)
    try:
        if variable not in ds.variables:
            return None
        da = ds[variable]
        sample_dims = tuple(base.sample_dims)
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


# -------------------------------------------------------------------------- ensembles
class EnsembleSource:
    """Members read from a ``scidiff-sample`` zarr store (dims ``(sample, member, *spatial)``,
    one variable per channel, physical units), matched to data samples.

    Matching: a ``data_index`` (or ``index``) coordinate along ``sample`` gives each
    ensemble sample's flat index in the data store; without it, ensemble sample ``j``
    is the ``j``-th sample of the evaluated split. Conditioning parameters stored along
    ``sample`` must equal the data's (else the data do not match the ensemble).
    """

    def __init__(self, path: str | os.PathLike, metadata, members: int | None = None) -> None:
        import xarray as xr

        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise EvaluationError(f"ensemble: store {self.path} does not exist")
        try:
            self.ds = xr.open_zarr(self.path)
        except Exception as exc:  # noqa: BLE001
            raise EvaluationError(f"ensemble: {self.path} is not a readable zarr store ({type(exc).__name__})") from None
        names = list(metadata.channel_names)
        missing = [n for n in names if n not in self.ds.data_vars]
        if missing:
            raise EvaluationError(f"ensemble: {self.path} lacks the variables {missing} of the checkpoint's channels")
        want = ("sample", "member", *metadata.spatial_dims)
        for n in names:
            if tuple(self.ds[n].dims) != want:
                raise EvaluationError(f"ensemble: variable {n!r} in {self.path} has dims {self.ds[n].dims}, expected {want}")
        self.names = names
        self.num_members = int(self.ds.sizes["member"])
        if members is not None and members < self.num_members:
            self.num_members = int(members)
        self.index_coord = next((c for c in ("data_index", "index") if c in self.ds.coords or c in self.ds.data_vars), None)
        self.param_names = [p for p in metadata.param_names if p in self.ds.coords or p in self.ds.data_vars]

    @property
    def size(self) -> int:
        return int(self.ds.sizes["sample"])

    def data_indices(self) -> np.ndarray | None:
        if self.index_coord is None:
            return None
        return np.asarray(self.ds[self.index_coord].values, np.int64).reshape(-1)

    def read(self, positions: np.ndarray) -> Tensor:
        """Members ``[B, M, C, *S]`` (float64, physical) of ensemble samples ``positions``."""
        if "done" in self.ds:  # scidiff-sample marks each member once it is on disk
            done = np.asarray(self.ds["done"].isel(sample=positions, member=slice(0, self.num_members)).values)
            if not done.all():
                j, k = np.argwhere(~done)[0]
                raise EvaluationError(
                    f"ensemble: member {int(k)} of sample {int(positions[j])} in {self.path} is not written yet "
                    "(finish the scidiff-sample run first)"
                )
        arrays = [np.asarray(self.ds[n].isel(sample=positions, member=slice(0, self.num_members)).values, np.float64)
                  for n in self.names]
        return torch.from_numpy(np.stack(arrays, axis=2))

    def check_params(self, positions: np.ndarray, params: np.ndarray | None, names: Sequence[str],
                     store_indices: np.ndarray) -> None:
        if params is None:
            return
        for p in self.param_names:
            stored = np.asarray(self.ds[p].isel(sample=positions).values, np.float64)
            data = params[:, list(names).index(p)]
            bad = ~np.isclose(stored, data, rtol=1e-4, atol=1e-6)
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                raise EvaluationError(
                    f"ensemble: sample {int(positions[j])} of {self.path} has {p}={stored[j]:.6g} but the data sample "
                    f"{int(store_indices[j])} it is matched with has {p}={data[j]:.6g} (give the matching data)"
                )


# ------------------------------------------------------------------------------ bound
def _bound_variants(pretrained, settings: BoundSettings) -> list[str]:
    variants = []
    for v in settings.variance:
        if v not in VARIANCE_CHOICES:
            raise EvaluationError(f"bound.variance: unknown variance {v!r}; expected some of {list(VARIANCE_CHOICES)}")
        if v == "learned_range" and not pretrained.diffusion.learns_variance:
            raise EvaluationError("bound.variance: learned_range needs a model trained with variance=learned_range")
        if v not in variants and v != pretrained.diffusion.variance:
            variants.append(v)
    return variants


def _optimal_variance(pretrained, dm, settings: BoundSettings, eval_settings: EvaluationSettings,
                      device: torch.device, weights: Tensor | None) -> Tensor:
    """Analytic-DPM reverse variance from up to ``optimal_samples`` training samples."""
    if not hasattr(likelihood, "estimate_optimal_variance"):
        raise EvaluationError("bound.variance: 'optimal' needs likelihood.estimate_optimal_variance (not available)")
    train = dm.datasets["train"]
    n = min(len(train), settings.optimal_samples)
    if n == 0:
        raise EvaluationError("bound.variance: 'optimal' is estimated on the training split, which is empty")
    T = pretrained.diffusion.num_timesteps
    k = min(T, max(2, settings.optimal_timesteps))
    timesteps = torch.unique(torch.linspace(0, T - 1, k).round().long())
    batches = []
    for start in range(0, n, eval_settings.batch_size):
        batch = train.read_batch(train.indices[start:min(n, start + eval_settings.batch_size)])
        batches.append({"x": batch["x"].to(device), "mask": _to(batch.get("mask"), device),
                        "cond": _cond(batch, device)})
    return likelihood.estimate_optimal_variance(
        pretrained.denoiser, pretrained.diffusion, batches, timesteps=timesteps,
        generator=generator(eval_settings.seed, 3), weights=None if weights is None else weights.to(device),
        timestep_batch=settings.timestep_batch,
    )


def _to(t: Tensor | None, device) -> Tensor | None:
    return None if t is None else t.to(device)


def _cond(batch: Mapping[str, Tensor], device) -> Conditioning | None:
    params, fields = batch.get("params"), batch.get("fields")
    if params is None and fields is None:
        return None
    return Conditioning(params=_to(params, device), fields=_to(fields, device))


def _sample_bound(pretrained, x, cond, mask, log_det, weights, variance, settings: BoundSettings,
                  gen: torch.Generator):
    """The bound of one sample ``x`` ``[1, C, *S]``: (bits/dim physical, se or nan, prior, L_0, terms ``[1, T]``
    nats/dim: exact, or the importance estimator's unbiased per-timestep estimates)."""
    kw = dict(variance=variance, weights=weights, log_det=log_det, generator=gen)
    if settings.estimator == "exact":
        b = likelihood.variational_bound(pretrained.denoiser, pretrained.diffusion, x, cond, mask,
                                         timestep_batch=settings.timestep_batch, **kw)
        return b.bits_per_dim, torch.full_like(b.bits_per_dim, float("nan")), b.prior, b.terms[:, 0], b.terms
    est = likelihood.estimate_bound(pretrained.denoiser, pretrained.diffusion, x, cond, mask,
                                    num_terms=settings.num_terms, **kw)
    return est.bits_per_dim, est.standard_error_bits, est.prior, est.reconstruction, est.per_timestep()


# ------------------------------------------------------------------------------- loop
def split_indices(dm, settings: EvaluationSettings, ensemble: EnsembleSource | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(store indices to evaluate, matching ensemble positions or None)."""
    positions = None
    if ensemble is not None and ensemble.data_indices() is not None:
        indices = ensemble.data_indices()
        positions = np.arange(indices.size)
        total = int(np.prod(dm.metadata.sample_shape))
        if indices.size and (indices.min() < 0 or indices.max() >= total):
            raise EvaluationError(f"ensemble: {ensemble.index_coord} holds indices outside the data store's {total} samples")
    else:
        indices = np.asarray(dm.split_indices[settings.split], np.int64)
    if settings.max_samples is not None:
        indices = indices[: settings.max_samples]
        positions = None if positions is None else positions[: settings.max_samples]
    if indices.size == 0:
        raise EvaluationError(f"split: the {settings.split!r} split of this data set is empty (choose another split)")
    if ensemble is not None and positions is None:
        if ensemble.size < indices.size:
            raise EvaluationError(
                f"ensemble: {ensemble.path} has {ensemble.size} samples, fewer than the {indices.size} data samples "
                f"of split {settings.split!r} (set max_samples or give the matching data)"
            )
        positions = np.arange(indices.size)
    return indices, positions


def evaluate(
    pretrained,
    settings: EvaluationSettings | None = None,
    *,
    data_path: str | os.PathLike | None = None,
    ensemble: str | os.PathLike | None = None,
    device: str | torch.device = "auto",
    progress: bool = True,
) -> Evaluation:
    """Evaluate ``pretrained`` on one split of its data set (see the module docstring).

    Args:
        pretrained: from :func:`scidiff.training.pretrained.load_pretrained`.
        settings: what to compute (:class:`EvaluationSettings`).
        data_path: another location of the data store (same layout).
        ensemble: a ``scidiff-sample`` zarr store whose members replace generation.
        device: ``"auto"`` (the rank's GPU, else CPU), ``"cpu"``, ``"cuda:0"``, ...
        progress: a tqdm bar on rank 0.

    Returns:
        :class:`Evaluation`, identical on every rank.
    """
    s = settings or EvaluationSettings()
    if s.split not in SPLITS:
        raise EvaluationError(f"split: expected one of {list(SPLITS)}, got {s.split!r}")
    if s.batch_size < 1:
        raise EvaluationError(f"batch_size: must be >= 1, got {s.batch_size}")
    if s.bound.estimator not in ("exact", "importance"):
        raise EvaluationError(f"bound.estimator: expected exact or importance, got {s.bound.estimator!r}")
    try:
        check_floor_settings(s.floor)
        check_verdict_settings(s.verdict)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    ctx = current_context()
    rank, world = ctx.rank, ctx.world_size
    try:
        dev = resolve_device(str(device))
    except DeviceError as exc:
        raise EvaluationError(str(exc)) from None
    pretrained.to(dev)
    meta = pretrained.metadata
    dm = build_datamodule(pretrained, data_path)
    source = None if ensemble is None else EnsembleSource(ensemble, meta)  # all its members
    sampling = s.sampling.enabled or source is not None
    members = source.num_members if source is not None else s.sampling.members
    if sampling and members < 2:
        raise EvaluationError(f"sampling.members: CRPS and the spread-skill ratio need >= 2 members, got {members}")
    if not s.bound.enabled and not sampling and not s.ode.enabled:
        raise EvaluationError("bound.enabled, ode.enabled and sampling.enabled are all false: nothing to evaluate")
    indices, positions = split_indices(dm, s, source)
    reader = dm.datasets[s.split]  # read_batch takes flat store indices, whatever the split
    mine = np.arange(rank, indices.size, world)
    xt = pretrained.x_transform
    weights = area_weights(meta, s.metrics.area_weights)

    true_ll = None
    if s.bound.enabled or s.ode.enabled:
        true_ll = true_log_likelihood(dm, pretrained, indices, s.metrics.true_loglik_variable)
    if true_ll is not None and weights is not None:
        warnings.warn(f"metrics.true_loglik_variable: {true_ll.variable} is ignored: with area weights the bound is a "
                      "weighted mean per dimension, not comparable with a log-density (metrics.area_weights=none)",
                      stacklevel=2)
        true_ll = None
    if true_ll is not None and true_ll.conditional and rank == 0:
        warnings.warn(f"metrics.true_loglik_variable: {true_ll.describe()}; reported as conditional_nll_bpd and "
                      "gap_conditional/*, not true_nll_bpd", stacklevel=2)
    likelihoods = _Likelihoods(pretrained, dm, s, dev, weights, true_ll)
    metrics = _SampleMetrics(pretrained, members, s.metrics, dev) if sampling else None
    floor = _floor(dm, reader, pretrained, indices, members, s, sampling, dev)
    rows: dict[str, list[np.ndarray]] = {}
    panels: list[tuple[Tensor, Tensor]] = []
    t_sample = 0.0
    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=mine.size, desc=f"scidiff-evaluate {s.split} (rank 0)", unit="sample", dynamic_ncols=True)

    def add_row(name: str, value: Tensor) -> None:
        rows.setdefault(name, []).append(value.detach().to(torch.float64).cpu().numpy())

    with torch.no_grad():
        for start in range(0, mine.size, s.batch_size):
            pos = mine[start:start + s.batch_size]
            store_idx = indices[pos]
            batch = reader.read_batch(store_idx)
            x = batch["x"].to(dev)
            mask = _to(batch.get("mask"), dev)
            cond = _cond(batch, dev)
            x_phys = xt.inverse(x.to(torch.float64))
            add_row("index", torch.from_numpy(store_idx))
            likelihoods.update(x, x_phys, cond, mask, store_idx, add_row)
            if metrics is not None:
                tic = time.perf_counter()
                if source is not None:
                    params = None if batch.get("params") is None else dm.inverse_params(batch["params"]).double().numpy()
                    source.check_params(positions[pos], params, meta.param_names, store_idx)
                    ens_phys = source.read(positions[pos]).to(dev)
                    ens = xt(ens_phys.flatten(0, 1)).reshape(ens_phys.shape)
                else:
                    ens = _generate(pretrained, x, cond, store_idx, s, dev).to(torch.float64)
                    ens_phys = xt.inverse(ens.flatten(0, 1)).reshape(ens.shape)
                metrics.update(ens_phys, ens, x_phys, x.to(torch.float64), mask, weights)
                if rank == 0 and sum(len(p[0]) for p in panels) < s.num_panels:
                    panels.append((x_phys.cpu(), ens_phys[:, 0].cpu()))
                t_sample += time.perf_counter() - tic
            if floor is not None:  # the same metrics for real fields of the nearest conditions
                f_phys, f_model, f_mask = floor[0].read(store_idx, xt, mask, dev)
                floor[1].update(f_phys, f_model, x_phys, x.to(torch.float64), f_mask, weights)
            if bar is not None:
                bar.update(len(pos))
    if bar is not None:
        bar.close()

    # ---- per-sample rows of every rank, in split order; then the metrics (collectives)
    local = {k: np.concatenate(v) for k, v in rows.items()}
    local["position"] = mine.astype(np.int64)
    parts = ctx.gather(local)
    merged = {k: np.concatenate([p[k] for p in parts if k in p]) for k in parts[0]}
    order = np.argsort(merged.pop("position"), kind="stable")
    per_sample = {k: v[order] for k, v in merged.items()}
    store_order = per_sample.pop("index").astype(np.int64)
    timing = ctx.gather((likelihoods.seconds, t_sample, int(mine.size)))

    scalars: dict[str, float] = {"num_samples": float(indices.size)}
    scalars.update(likelihoods.results(per_sample))
    if s.bound.enabled:
        scalars["bound_seconds_per_1000"] = 1000.0 * max(t[0] / max(t[2], 1) for t in timing)
    spectra, rank_hist, maps = (None, None, None), None, {}
    if metrics is not None:
        more, spectra, rank_hist, maps = metrics.results()
        scalars.update(more)
        scalars["sampling_seconds_per_1000"] = 1000.0 * max(t[1] / max(t[2], 1) for t in timing)
    floor_spectra, floor_hist, verdict = None, None, None
    if floor is not None:
        more, (_, _, floor_spectra), floor_hist, _ = floor[1].results()
        scalars.update(prefixed(more))
        verdict = judge(scalars, s.verdict)
    dm.teardown()
    info = {
        "checkpoint": str(pretrained.checkpoint), "sha256": pretrained.sha256, "global_step": pretrained.global_step,
        "weights": pretrained.weights, "data_path": dm.path, "split": s.split,
        "estimator": s.bound.estimator if s.bound.enabled else "none",
        "terms": ("none" if likelihoods.terms is None else "exact" if s.bound.estimator == "exact" else
                  "importance-sampled, unbiased per-timestep estimates (zero where no sample drew t)"),
        "true_nll": "none" if true_ll is None else true_ll.describe(),
        "variances": [pretrained.diffusion.variance, *likelihoods.variants], "num_terms": s.bound.num_terms,
        "members": members if sampling else 0,
        "sampling": "ensemble " + os.fspath(ensemble) if source is not None else (
            s.sampler.describe() if sampling else "none"),
        "area_weights": "cos(latitude)" if weights is not None else "none", "world_size": world,
        "floor": (floor[0].describe() if floor is not None else "none: sampling is off" if not sampling
                  else "none: floor.enabled is false"),
        "seed": s.seed, "device": str(dev),
    }
    return Evaluation(
        split=s.split, indices=store_order, scalars=scalars, per_sample=per_sample, terms=likelihoods.terms_result,
        wavenumber=spectra[0], power_data=spectra[1], power_samples=spectra[2], rank_histogram=rank_hist,
        maps=maps, panels_data=torch.cat([p[0] for p in panels])[: s.num_panels].numpy() if panels else None,
        panels_samples=torch.cat([p[1] for p in panels])[: s.num_panels].numpy() if panels else None,
        channel_names=tuple(meta.channel_names), units=tuple(meta.units), spatial_dims=tuple(meta.spatial_dims),
        coords={k: np.asarray(v) for k, v in meta.coords.items()
                if tuple(meta.coord_dims.get(k, ())) and set(meta.coord_dims[k]) <= set(meta.spatial_dims)},
        info=info, power_floor=floor_spectra, rank_histogram_floor=floor_hist,
        floor_indices=None if floor is None else floor[0].indices, verdict=verdict, grid_units=grid_units(meta),
    )


def _floor(dm, reader, pretrained, indices, members, s: EvaluationSettings, sampling: bool, dev):
    """(the floor ensembles, their metrics) or None (no sampling, or floor.enabled false)."""
    if not (sampling and s.floor.enabled):
        return None
    try:
        ensembles = FloorEnsemble(dm, reader, pretrained.metadata, indices, members, s.floor, s.seed)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    return ensembles, _SampleMetrics(pretrained, members, s.metrics, dev)


class _Likelihoods:
    """The bound of every data sample (with each extra reverse variance) and the ODE NLL,
    one call per sample with the generator keyed by its store index; dataset totals in
    :class:`BitsPerDim` metrics (sum states), the mean terms in :class:`BoundTerms`."""

    def __init__(self, pretrained, dm, s: EvaluationSettings, device: torch.device, weights: Tensor | None,
                 true_ll: TrueLogLikelihood | None = None) -> None:
        self.p, self.s, self.weights, self.true = pretrained, s, weights, true_ll
        self.variants = _bound_variants(pretrained, s.bound) if s.bound.enabled else []
        names = (["", "model", *self.variants] if s.bound.enabled else []) + (["ode"] if s.ode.enabled else [])
        # the gaps are named after the variance ("" is the model's own) or "ode"
        self.gap_names = [self._name(n) for n in names if n != "model"]
        if true_ll is not None:
            nll, gap = true_ll.prefix
            names += [nll, *(f"{gap}/{n}" for n in self.gap_names)]
        self.bpd = {n: BitsPerDim().to(device) for n in names}
        self.terms = BoundTerms(pretrained.diffusion.num_timesteps).to(device) if s.bound.enabled else None
        self.tables: dict[str, Any] = {v: v for v in self.variants}
        if "optimal" in self.tables:
            self.tables["optimal"] = _optimal_variance(pretrained, dm, s.bound, s, device, weights)
        self.seconds = 0.0
        self.terms_result: np.ndarray | None = None

    def _name(self, variant: str) -> str:
        return variant or self.p.diffusion.variance

    def update(self, x, x_phys, cond, mask, store_idx, add_row) -> None:
        s = self.s
        if not (s.bound.enabled or s.ode.enabled):
            return
        tic = time.perf_counter()
        log_det = self.p.x_transform.log_abs_det_jacobian(x_phys, mask)  # [B] nats, physical -> normalised
        dims = (mask.expand_as(x).flatten(1).sum(1) if mask is not None
                else torch.full((x.shape[0],), float(x[0].numel()), device=x.device)).to(torch.float64)
        true_bpd = None
        if self.true is not None:  # -log p(x) / (d ln 2), physical units, d = the valid points
            nll_name, gap_name = self.true.prefix
            true_nats = torch.from_numpy(-self.true.values[np.asarray(store_idx, np.int64)]).to(dims)
            self.bpd[nll_name].update(true_nats, dims)
            true_bpd = true_nats / dims / LN2
            add_row(nll_name, true_bpd)

        def add_gap(name: str, bits: Tensor) -> None:
            if true_bpd is not None:
                gap = bits.to(true_bpd) - true_bpd
                self.bpd[f"{gap_name}/{name}"].update(gap * dims * LN2, dims)
                add_row(f"{gap_name}/{name}", gap)

        def one(i: int):
            return (x[i:i + 1], None if cond is None else cond.map(lambda v: v[i:i + 1]),
                    None if mask is None else mask[i:i + 1], log_det[i:i + 1])

        if s.bound.enabled:
            log_det_bpd = log_det / dims / LN2
            add_row("log_det_bpd", log_det_bpd)
            for variant in ["", *self.variants]:
                out = [_sample_bound(self.p, *one(i), self.weights, self.tables.get(variant), s.bound,
                                     generator(s.seed, 1, int(j))) for i, j in enumerate(store_idx)]
                phys = torch.cat([o[0] for o in out]).double()
                self.bpd[variant].update(phys * dims * LN2, dims)
                suffix = f"/{variant}" if variant else ""
                add_row("bpd" + suffix, phys)
                add_gap(self._name(variant), phys)
                if s.bound.estimator == "importance":
                    add_row("bpd_se" + suffix, torch.cat([o[1] for o in out]))
                if not variant:
                    model_bpd = phys + log_det_bpd
                    self.bpd["model"].update(model_bpd * dims * LN2, dims)
                    add_row("bpd_model", model_bpd)
                    add_row("prior_bpd", torch.cat([o[2] for o in out]) / LN2)
                    add_row("reconstruction_bpd", torch.cat([o[3] for o in out]) / LN2)
                    if self.terms is not None:
                        self.terms.update(torch.cat([o[4] for o in out]) / LN2)
        if s.ode.enabled:
            out = []
            for i, j in enumerate(store_idx):
                xi, ci, mi, li = one(i)
                out.append(likelihood.ode_nll(
                    self.p.denoiser, self.p.diffusion, xi, ci, mi, num_steps=s.ode.num_steps,
                    num_probes=s.ode.num_probes, weights=self.weights, log_det=li, generator=generator(s.seed, 4, int(j)),
                ))
            bits = torch.cat([o.bits_per_dim for o in out]).double()
            self.bpd["ode"].update(bits * dims * LN2, dims)
            add_row("ode_bpd", bits)
            add_gap("ode", bits)
            add_row("ode_bpd_se", torch.cat([o.standard_error_bits for o in out]))
        self.seconds += time.perf_counter() - tic

    def results(self, per_sample: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Scalars (collectives under DDP: call on every rank)."""
        out: dict[str, float] = {}
        if self.s.bound.enabled:
            out["bpd"] = float(self.bpd[""].compute())
            out["bpd_se"] = float(self.bpd[""].standard_error())
            out["bpd_model"] = float(self.bpd["model"].compute())
            out["log_det_bpd"] = out["bpd_model"] - out["bpd"]  # log|det dT/dx| per dimension, bits
            out["prior_bpd"] = float(per_sample["prior_bpd"].mean())
            out["reconstruction_bpd"] = float(per_sample["reconstruction_bpd"].mean())
            if self.s.bound.estimator == "importance":  # Monte-Carlo error of the mean for these samples
                se = per_sample["bpd_se"]
                out["bpd_mc_se"] = float(np.sqrt(np.sum(se**2)) / se.size)
            for v in self.variants:
                out[f"bpd/{v}"] = float(self.bpd[v].compute())
                out[f"bpd_se/{v}"] = float(self.bpd[v].standard_error())
                if self.s.bound.estimator == "importance":
                    se = per_sample[f"bpd_se/{v}"]
                    out[f"bpd_mc_se/{v}"] = float(np.sqrt(np.sum(se**2)) / se.size)
            if self.terms is not None:
                self.terms_result = self.terms.compute().cpu().numpy()
        if self.s.ode.enabled:
            out["ode_bpd"] = float(self.bpd["ode"].compute())
            out["ode_bpd_se"] = float(self.bpd["ode"].standard_error())
            se = per_sample["ode_bpd_se"]
            out["ode_bpd_probe_se"] = float(np.sqrt(np.sum(se**2)) / se.size)
        if self.true is not None:  # the gap's SE: over the per-sample differences (paired)
            nll, gap = self.true.prefix
            out[nll] = float(self.bpd[nll].compute())
            out[f"{nll}_se"] = float(self.bpd[nll].standard_error())
            for name in self.gap_names:
                out[f"{gap}/{name}"] = float(self.bpd[f"{gap}/{name}"].compute())
                out[f"{gap}_se/{name}"] = float(self.bpd[f"{gap}/{name}"].standard_error())
        return out


class _SampleMetrics:
    """Ensembles ``[B, M, C, *S]`` against data ``[B, C, *S]``, physical units (energy score:
    normalised units); every metric a torchmetrics ``Metric`` with sum states."""

    def __init__(self, pretrained, members: int, settings: MetricSettings, device: torch.device) -> None:
        meta = pretrained.metadata
        c, shape = meta.num_channels, tuple(meta.spatial_shape)
        spacing = grid_spacing(meta)
        self.members = members
        self.names = [_clean(n) for n in meta.channel_names]
        self.m: dict[str, Any] = {
            "crps": CRPS(c), "crps_map": CRPS(c, spatial_shape=shape), "spread_skill": SpreadSkillRatio(c),
            "energy": EnergyScore(), "rank": RankHistogram(c, members), "maps": BiasStdMaps(c, shape),
            "w1": Wasserstein1(c, _value_ranges(pretrained), num_bins=settings.wasserstein_bins),
            "spectral": SpectralError(c, shape, spacing=spacing, max_wavenumber=settings.spectral_max_wavenumber),
        }
        if _atoms_enabled(meta, settings.atoms):
            for name in ("atoms_samples", "atoms_data"):
                self.m[name] = AtomCounts(c, settings.atom_threshold, voxel_volume=float(np.prod(spacing)),
                                          min_distance=settings.atom_min_distance)
        for metric in self.m.values():
            metric.to(device)

    def update(self, ens_phys, ens_model, x_phys, x_model, mask, weights) -> None:
        m = self.m
        w = None if weights is None else weights.reshape(1, 1, *weights.shape).to(x_phys.device)
        m["crps"].update(ens_phys, x_phys, mask, w)
        m["crps_map"].update(ens_phys, x_phys, mask)
        m["spread_skill"].update(ens_phys, x_phys, mask, w)
        m["energy"].update(ens_model, x_model, mask, w)  # normalised: channels of different units
        m["rank"].update(ens_phys, x_phys, mask, w)
        m["maps"].update(ens_phys, x_phys, mask)
        m["w1"].update(ens_phys, x_phys, mask, w)
        if mask is None:
            m["spectral"].update(ens_phys, x_phys)
        else:  # masks may differ between samples: each sample's members with its own mask
            for i in range(x_phys.shape[0]):
                m["spectral"].update(ens_phys[i], x_phys[i:i + 1], mask[i:i + 1])
        if "atoms_samples" in m:
            m["atoms_samples"].update(ens_phys.flatten(0, 1))
            m["atoms_data"].update(x_phys)

    def results(self):
        """(scalars, (wavenumber, power_data, power_samples), rank histogram, maps); collectives."""
        m, names, members = self.m, self.names, self.members
        moments = m["maps"].compute()
        rank_hist = m["rank"].compute().cpu().numpy()
        per_channel = {
            "crps": m["crps"].compute(), "spread_skill": m["spread_skill"].compute(),
            "spectral_error": m["spectral"].compute(), "w1": m["w1"].compute(),
            "bias_rms": _nanrms(moments.bias), "std_ratio": _nanmean(moments.std_ratio),
            # total variation distance of the rank histogram from the flat one (0 = calibrated)
            "rank_deviation": torch.from_numpy(0.5 * np.abs(rank_hist - 1.0 / (members + 1)).sum(axis=1)),
        }
        scalars = {"members": float(members), "energy_score": float(m["energy"].compute())}
        for key, values in per_channel.items():
            for name, value in zip(names, values.reshape(-1).tolist()):
                scalars[f"{key}/{name}"] = float(value)
        for name, a, b in zip(names, *(v.tolist() for v in m["w1"].out_of_range())):
            scalars[f"w1_out_of_range/{name}"] = float(max(a, b))
        samples_spec, data_spec = m["spectral"].spectra()
        spectra = (data_spec.wavenumber.cpu().numpy(), data_spec.power.cpu().numpy(), samples_spec.power.cpu().numpy())
        maps = {"crps": m["crps_map"].compute().cpu().numpy(), "bias": moments.bias.cpu().numpy(),
                "std_samples": moments.std_samples.cpu().numpy(), "std_data": moments.std_data.cpu().numpy()}
        if "atoms_samples" in m:
            found = {"samples": m["atoms_samples"].compute(), "data": m["atoms_data"].compute()}
            for i, name in enumerate(names):
                for group, summary in found.items():
                    scalars[f"atoms/{name}/peaks_{group}"] = float(summary.peaks_mean[i])
                    scalars[f"atoms/{name}/integrated_{group}"] = float(summary.integrated_mean[i])
        return scalars, spectra, rank_hist, maps


def _clean(name: str) -> str:
    """An MLflow-safe metric name part (letters, digits, _ - . space)."""
    return "".join(ch if ch.isalnum() or ch in "_-. " else "_" for ch in str(name))


def _nanrms(maps: Tensor) -> Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    return torch.sqrt(torch.nanmean(flat**2, dim=1))


def _nanmean(maps: Tensor) -> Tensor:
    return torch.nanmean(maps.reshape(maps.shape[0], -1), dim=1)


def _generate(pretrained, x: Tensor, cond: Conditioning | None, store_idx: np.ndarray, s: EvaluationSettings,
              dev: torch.device) -> Tensor:
    """``members`` samples per data sample, ``[B, M, C, *S]`` normalised; member k of store
    sample j draws its x_T and its sampler noise from the generator keyed (seed, 2, j, k)."""
    b, m = x.shape[0], s.sampling.members
    gens = [generator(s.seed, 2, int(j), k) for j in store_idx for k in range(m)]
    x_T = initial_noise(x.shape[1:], gens, dev, x.dtype)
    rep = None if cond is None else cond.map(lambda v: v.repeat_interleave(m, dim=0))
    out = sample_model(pretrained.denoiser, pretrained.diffusion, x_T, rep, sampler=s.sampler, guidance=s.guidance, generator=gens)
    return out.reshape(b, m, *x.shape[1:])


__all__ = [
    "BoundSettings",
    "EnsembleSource",
    "Evaluation",
    "EvaluationError",
    "EvaluationSettings",
    "FloorSettings",
    "MetricSettings",
    "ODESettings",
    "SamplingSettings",
    "TrueLogLikelihood",
    "VerdictSettings",
    "area_weights",
    "build_datamodule",
    "evaluate",
    "grid_spacing",
    "grid_units",
    "true_log_likelihood",
]
