"""Evaluation of generative models of scientific fields.

Every metric is a :class:`torchmetrics.Metric` whose states are float64 sums
(``dist_reduce_fx="sum"``), so it gives the same number on one process or
under DDP. Fields are ``[B, C, *S]`` with 1-3 spatial dims of any shape;
ensembles are ``[B, M, C, *S]``. Means over grid points take an optional
``mask`` (1 = valid) and area ``weights`` (e.g. cos latitude). Results are in
the units of the field unless stated otherwise, per channel by default.

The modules:

* :mod:`~scidiff.evaluation.ensemble` -- CRPS (fair/ensemble), SpreadSkillRatio, EnergyScore, RankHistogram
* :mod:`~scidiff.evaluation.spectra` -- radial power spectra of 1-D/2-D/3-D fields; PowerSpectrum, SpectralError,
  ShellCorrelation (how much a member's scales co-vary)
* :mod:`~scidiff.evaluation.fields` -- BiasStdMaps (per-point moments), DomainMeanStdRatio
  (the spread of the domain mean), Wasserstein1 (value distributions)
* :mod:`~scidiff.evaluation.likelihood` -- BitsPerDim, BoundTerms (per-timestep variational bound terms)
* :mod:`~scidiff.evaluation.molecules` -- AtomCounts of voxel densities (integrated density and peak finding)
* :mod:`~scidiff.evaluation.weighting` -- point weights (mask x area weights) and the point-mean base class
* :mod:`~scidiff.evaluation.run` -- ``evaluate``: the loop, the bound and the sample metrics of a trained model on a split
* :mod:`~scidiff.evaluation.settings` -- ``EvaluationSettings`` and its sections, each checking its own values
* :mod:`~scidiff.evaluation.data` -- the checkpoint's data module rebuilt, the split, grid spacing/units/area weights, the store's true log-likelihood
* :mod:`~scidiff.evaluation.members` -- the members: generated through the inference layer, or read from a scidiff-sample store
* :mod:`~scidiff.evaluation.bound` -- the variational bound of every sample, its variants, the ODE NLL, the gap to the true NLL
* :mod:`~scidiff.evaluation.suite` -- the sample metrics: ``FieldMetricSuite`` (``metrics._target_`` in the config)
* :mod:`~scidiff.evaluation.floor` -- the noise floor: the sample metrics of ensembles of real fields (nearest conditions)
* :mod:`~scidiff.evaluation.verdict` -- each sample metric against its floor: pass/fail by the rules of one table
* :mod:`~scidiff.evaluation.result` -- ``Evaluation`` (what ``evaluate`` returns) and ``EvaluationError``
* :mod:`~scidiff.evaluation.checks` -- the value checks of the settings (one line naming the key)
* :mod:`~scidiff.evaluation.report` -- the evaluation file (netCDF), MLflow logging, the summary line
* :mod:`~scidiff.evaluation.plots` -- figures of an evaluation (import ``scidiff.evaluation.plots``; matplotlib)
"""

from scidiff.evaluation.ensemble import (
    CRPS,
    EnergyScore,
    RankHistogram,
    SpreadSkillRatio,
    crps_ensemble,
    energy_score,
    gaussian_crps,
)
from scidiff.evaluation.fields import BiasStdMaps, DomainMeanStdRatio, MomentMaps, Wasserstein1
from scidiff.evaluation.floor import FloorEnsemble, FloorSettings
from scidiff.evaluation.likelihood import BitsPerDim, BoundTerms
from scidiff.evaluation.molecules import (
    AtomCounts,
    AtomCountSummary,
    count_peaks,
    find_peaks,
    integrated_density,
)
from scidiff.evaluation.spectra import (
    PowerSpectrum,
    RadialSpectrum,
    ShellCorrelation,
    SpectralError,
    radial_bins,
    radial_power_spectrum,
)
from scidiff.evaluation.report import log_to_mlflow, read_evaluation_metrics, write_evaluation_file
from scidiff.evaluation.result import Evaluation, EvaluationError
from scidiff.evaluation.run import evaluate
from scidiff.evaluation.settings import BoundSettings, EvaluationSettings, ODESettings, SamplingSettings
from scidiff.evaluation.suite import FieldMetricSuite, MetricSettings, as_suite
from scidiff.evaluation.verdict import RULES, MetricVerdict, Verdict, VerdictSettings, judge
from scidiff.evaluation.weighting import point_weights

__all__ = [
    "CRPS",
    "RULES",
    "AtomCountSummary",
    "AtomCounts",
    "BiasStdMaps",
    "BitsPerDim",
    "BoundSettings",
    "BoundTerms",
    "DomainMeanStdRatio",
    "EnergyScore",
    "Evaluation",
    "EvaluationError",
    "EvaluationSettings",
    "FieldMetricSuite",
    "FloorEnsemble",
    "FloorSettings",
    "MetricSettings",
    "MetricVerdict",
    "MomentMaps",
    "ODESettings",
    "PowerSpectrum",
    "RadialSpectrum",
    "RankHistogram",
    "SamplingSettings",
    "ShellCorrelation",
    "SpectralError",
    "SpreadSkillRatio",
    "Verdict",
    "VerdictSettings",
    "Wasserstein1",
    "as_suite",
    "count_peaks",
    "crps_ensemble",
    "energy_score",
    "evaluate",
    "find_peaks",
    "gaussian_crps",
    "integrated_density",
    "judge",
    "log_to_mlflow",
    "point_weights",
    "radial_bins",
    "radial_power_spectrum",
    "read_evaluation_metrics",
    "write_evaluation_file",
]
