"""The sample metrics: what ``scidiff-evaluate`` measures of an ensemble against the data.

:class:`FieldMetricSuite` is the suite of metrics of gridded fields, and its settings: the
config names it with ``_target_`` under ``metrics:`` (``configs/evaluate.yaml``), the
Python API passes one as :attr:`EvaluationSettings.metrics
<scidiff.evaluation.settings.EvaluationSettings.metrics>`; :func:`as_suite` turns a
config node into one. Its :meth:`~FieldMetricSuite.build` makes the metrics of one
evaluation (:class:`SampleMetrics`): the loop builds one for the model's members and one,
the same, for the noise floor's real fields (:mod:`~scidiff.evaluation.floor`).

Every metric is a torchmetrics ``Metric`` with sum states (the same number on one process
or under DDP): fair CRPS (and its map), spread-skill ratio, energy score (normalised
units), rank histogram, bias/std maps, the spread of the domain mean (std ratio of the
fields' area-weighted means, samples / data), Wasserstein-1, the spectral error (mean
over wavenumber shells of ``|ln(P_samples(k) / P_data(k))|``), the shell correlation (how
much a member's scales vary together, with its null standard error) and, for voxel number
densities, the atom counts. Scalars are named ``<metric>/<channel>`` (``energy_score`` over all
channels), the names :mod:`~scidiff.evaluation.verdict` judges.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from scidiff.evaluation.checks import check_choice, check_instance, check_integer, check_number
from scidiff.evaluation.data import grid_spacing
from scidiff.evaluation.ensemble import CRPS, EnergyScore, RankHistogram, SpreadSkillRatio
from scidiff.evaluation.fields import BiasStdMaps, DomainMeanStdRatio, Wasserstein1
from scidiff.evaluation.molecules import AtomCounts
from scidiff.evaluation.result import EvaluationError
from scidiff.evaluation.spectra import ShellCorrelation, SpectralError
from scidiff.inference.specs import settings_of, target_class

AREA_WEIGHTS = ("auto", "none")
ATOMS = ("auto", "on", "off")


@dataclass(frozen=True)
class FieldMetricSuite:
    """The sample metrics of gridded fields, and their settings (``metrics:`` in the config).

    Args:
        area_weights: ``"auto"`` (cos latitude when a spatial dim is lat/latitude) or
            ``"none"``; the bound is weighted the same way.
        wasserstein_bins: histogram bins of the Wasserstein-1 distance.
        spectral_max_wavenumber: highest shell of the spectral error and the shell correlation (None: Nyquist).
        atoms: ``"auto"`` (3-D fields in number-density units, ``*-3``), ``"on"`` or ``"off"``.
        atom_threshold, atom_min_distance: peak finding of the atom counts (density units, voxels).
        true_loglik_variable: a per-sample variable of the data store holding the exact
            log-density of each sample (dims = the sample dims, nats, physical units, the
            density of exactly the fields the model is evaluated on), e.g. the GRF store's
            ``log_likelihood``; when present, the true NLL and the gap (bound - true) of
            every bound and of the ODE NLL are reported (see
            :func:`~scidiff.evaluation.data.true_log_likelihood`). None: never; a store
            without it is evaluated without.
    """

    area_weights: Literal["auto", "none"] = "auto"
    wasserstein_bins: int = 1000
    spectral_max_wavenumber: float | None = None
    atoms: Literal["auto", "on", "off"] = "auto"
    atom_threshold: float = 0.1
    atom_min_distance: int = 1
    true_loglik_variable: str | None = "log_likelihood"

    def __post_init__(self) -> None:
        check_choice("metrics.area_weights", self.area_weights, AREA_WEIGHTS)
        check_integer("metrics.wasserstein_bins", self.wasserstein_bins, 1)
        if self.spectral_max_wavenumber is not None:
            check_number("metrics.spectral_max_wavenumber", self.spectral_max_wavenumber, 0.0, strict=True)
        check_choice("metrics.atoms", self.atoms, ATOMS)
        check_number("metrics.atom_threshold", self.atom_threshold)
        check_integer("metrics.atom_min_distance", self.atom_min_distance, 1)
        if self.true_loglik_variable is not None:
            check_instance("metrics.true_loglik_variable", self.true_loglik_variable, str,
                           "the name of a store variable or null")

    def build(self, pretrained, members: int, device: torch.device) -> SampleMetrics:
        """The metrics of ensembles of ``members`` for ``pretrained``'s fields, on ``device``."""
        return SampleMetrics(pretrained, members, self, device)


MetricSettings = FieldMetricSuite  # its name before the suite was chosen by ``_target_``


def suite_class(target: str | None) -> type[FieldMetricSuite]:
    """The suite a ``metrics._target_`` names (None: :class:`FieldMetricSuite`)."""
    if target is None:
        return FieldMetricSuite
    return target_class(target, FieldMetricSuite, "metrics", "scidiff.evaluation.FieldMetricSuite")


def as_suite(node: FieldMetricSuite | Mapping[str, Any] | None) -> FieldMetricSuite:
    """A metric suite from a config node ``{_target_: scidiff.evaluation.FieldMetricSuite,
    wasserstein_bins: 200, ...}`` (without ``_target_``: a :class:`FieldMetricSuite`), or a suite.

    >>> as_suite({"_target_": "scidiff.evaluation.FieldMetricSuite", "atoms": "off"}).atoms
    'off'
    """
    if node is None or isinstance(node, FieldMetricSuite):
        return node or FieldMetricSuite()
    if not isinstance(node, Mapping):
        raise ValueError(f"metrics: expected {{_target_: scidiff.evaluation.FieldMetricSuite, ...}}, got {node!r}")
    spec = dict(node)
    cls = suite_class(spec.pop("_target_", None))
    return cls(**settings_of(cls, spec, "metrics"))


class SampleMetrics:
    """The metrics of one :meth:`FieldMetricSuite.build`: ensembles ``[B, M, C, *S]`` against
    data ``[B, C, *S]`` in physical units (energy score: normalised units); every metric a
    torchmetrics ``Metric`` with sum states. :meth:`update` per batch, :meth:`results` once."""

    def __init__(self, pretrained, members: int, settings: FieldMetricSuite, device: torch.device) -> None:
        meta = pretrained.metadata
        c, shape = meta.num_channels, tuple(meta.spatial_shape)
        spacing = grid_spacing(meta)
        self.members = members
        self.names = [metric_name(n) for n in meta.channel_names]
        self.m: dict[str, Any] = {
            "crps": CRPS(c), "crps_map": CRPS(c, spatial_shape=shape), "spread_skill": SpreadSkillRatio(c),
            "energy": EnergyScore(), "rank": RankHistogram(c, members), "maps": BiasStdMaps(c, shape),
            "domain_mean": DomainMeanStdRatio(c),
            "w1": Wasserstein1(c, _value_ranges(pretrained), num_bins=settings.wasserstein_bins),
            "spectral": SpectralError(c, shape, spacing=spacing, max_wavenumber=settings.spectral_max_wavenumber),
        }
        if members > 1:  # the shell correlation is within ensembles
            try:
                self.m["shells"] = ShellCorrelation(c, shape, spacing=spacing,
                                                    max_wavenumber=settings.spectral_max_wavenumber)
            except ValueError:  # fewer than two shells to correlate: the metric does not apply
                pass
        if atoms_enabled(meta, settings.atoms):
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
        m["domain_mean"].update(ens_phys, x_phys, mask, w)
        m["w1"].update(ens_phys, x_phys, mask, w)
        if mask is None:
            m["spectral"].update(ens_phys, x_phys)
        else:  # masks may differ between samples: each sample's members with its own mask
            for i in range(x_phys.shape[0]):
                m["spectral"].update(ens_phys[i], x_phys[i:i + 1], mask[i:i + 1])
        if "shells" in m:
            m["shells"].update(ens_phys, mask)
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
            "ensemble_mean_rmse": m["spread_skill"].skill(),
            "spectral_error": m["spectral"].compute(), "w1": m["w1"].compute(),
            "bias_rms": _nanrms(moments.bias), "std_ratio": _nanmean(moments.std_ratio),
            # total variation distance of the rank histogram from the flat one (0 = calibrated)
            "rank_deviation": torch.from_numpy(0.5 * np.abs(rank_hist - 1.0 / (members + 1)).sum(axis=1)),
        }
        scalars = {"members": float(members), "energy_score": float(m["energy"].compute())}
        for key, values in per_channel.items():
            for name, value in zip(names, values.reshape(-1).tolist()):
                scalars[f"{key}/{name}"] = float(value)
        for name, value in zip(names, m["domain_mean"].compute().reshape(-1).tolist()):
            if math.isfinite(value):  # NaN: the data's domain means are constant, the ratio means nothing
                scalars[f"domain_mean_std_ratio/{name}"] = float(value)
        if "shells" in m:
            se = float(m["shells"].standard_error())
            for name, value in zip(names, m["shells"].compute().reshape(-1).tolist()):
                if math.isfinite(value):  # NaN: a shell of constant power (constant fields)
                    scalars[f"shell_correlation/{name}"] = float(value)
                    scalars[f"shell_correlation_se/{name}"] = se
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


def metric_name(name: str) -> str:
    """An MLflow-safe metric name part (letters, digits, _ - . space)."""
    return "".join(ch if ch.isalnum() or ch in "_-. " else "_" for ch in str(name))


def _nanrms(maps: Tensor) -> Tensor:
    flat = maps.reshape(maps.shape[0], -1)
    return torch.sqrt(torch.nanmean(flat**2, dim=1))


def _nanmean(maps: Tensor) -> Tensor:
    return torch.nanmean(maps.reshape(maps.shape[0], -1), dim=1)


def atoms_enabled(metadata, mode: str) -> bool:
    """Whether the atom counts apply: ``on`` (3-D fields only), ``off``, or ``auto``: 3-D number densities."""
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


__all__ = ["FieldMetricSuite", "MetricSettings", "SampleMetrics", "as_suite", "atoms_enabled", "metric_name",
           "suite_class"]
