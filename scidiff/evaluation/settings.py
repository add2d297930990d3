"""What an evaluation computes: :class:`EvaluationSettings` and its sections.

The sections are the keys of ``configs/evaluate.yaml``: ``bound`` (:class:`BoundSettings`),
``ode`` (:class:`ODESettings`), ``sampling`` (:class:`SamplingSettings`), ``sampler`` and
``guidance`` (:mod:`scidiff.inference.generation`), ``metrics`` (the metric suite,
:class:`~scidiff.evaluation.suite.FieldMetricSuite`), ``floor``
(:class:`~scidiff.evaluation.floor.FloorSettings`) and ``verdict``
(:class:`~scidiff.evaluation.verdict.VerdictSettings`), beside a few top-level keys.

Every settings dataclass is frozen and checks its own values when it is constructed
(:mod:`~scidiff.evaluation.checks`): a bad value raises ``ValueError`` naming its key
(``bound.num_terms: must be >= 2 ...``), so settings that exist are valid. What can only
be judged against the model or the data (``learned_range`` on a model without a learned
variance, an empty split) is checked when :func:`~scidiff.evaluation.run.evaluate` runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from scidiff.data.splits import SPLIT_NAMES
from scidiff.diffusion.process import VARIANCES
from scidiff.evaluation.checks import check_bool, check_choice, check_instance, check_integer
from scidiff.evaluation.fidelity import FidelitySettings
from scidiff.evaluation.floor import FloorSettings
from scidiff.evaluation.suite import FieldMetricSuite, as_suite
from scidiff.evaluation.verdict import VerdictSettings
from scidiff.inference.generation import DDIM, GuidanceSpec, Sampler, as_guidance, as_sampler
from scidiff.inference.specs import settings_of

SPLITS = SPLIT_NAMES  # the data layer's one split vocabulary
ESTIMATORS = ("exact", "importance")
# the reverse variances of the diffusion, and the Analytic-DPM optimum estimated here
VARIANCE_CHOICES = (*VARIANCES, "optimal")


@dataclass(frozen=True)
class BoundSettings:
    """Args:
    enabled: compute the bound at all.
    estimator: ``"exact"`` (all T terms, per-timestep terms kept) or ``"importance"``
        (K = ``num_terms`` sampled denoising terms, unbiased, with a standard error).
    num_terms: K of the importance estimator (>= 2, for a standard error).
    timestep_batch: (sample, timestep) pairs per denoiser call of the exact bound.
    variance: reverse variances evaluated besides the model's own (those of
        :data:`scidiff.diffusion.process.VARIANCES`, and ``"optimal"``: the Analytic-DPM
        variance estimated from ``optimal_samples`` training samples at
        ``optimal_timesteps`` timesteps, interpolated in between).
    """

    enabled: bool = True
    estimator: Literal["exact", "importance"] = "exact"
    num_terms: int = 16
    timestep_batch: int = 50
    variance: Sequence[str] = ()
    optimal_samples: int = 64
    optimal_timesteps: int = 100

    def __post_init__(self) -> None:
        check_bool("bound.enabled", self.enabled)
        check_choice("bound.estimator", self.estimator, ESTIMATORS)
        check_integer("bound.num_terms", self.num_terms, 2, " (for a standard error)")
        check_integer("bound.timestep_batch", self.timestep_batch, 1)
        if isinstance(self.variance, str) or not isinstance(self.variance, Sequence) \
                or not all(isinstance(v, str) for v in self.variance):
            raise ValueError(f"bound.variance: expected a list of names, got {self.variance!r}")
        for v in self.variance:
            if v not in VARIANCE_CHOICES:
                raise ValueError(f"bound.variance: unknown variance {v!r}; expected some of {list(VARIANCE_CHOICES)}")
        object.__setattr__(self, "variance", tuple(self.variance))
        check_integer("bound.optimal_samples", self.optimal_samples, 1)
        check_integer("bound.optimal_timesteps", self.optimal_timesteps, 1)


@dataclass(frozen=True)
class ODESettings:
    """Args: enabled (the exact NLL through the probability-flow ODE, Hutchinson trace);
    num_steps (Heun steps on a fixed grid: every rank does the same work); num_probes (>= 2)."""

    enabled: bool = False
    num_steps: int = 100
    num_probes: int = 4

    def __post_init__(self) -> None:
        check_bool("ode.enabled", self.enabled)
        check_integer("ode.num_steps", self.num_steps, 1)
        check_integer("ode.num_probes", self.num_probes, 2, " (for a standard error)")


@dataclass(frozen=True)
class SamplingSettings:
    """Args: enabled (generate members and score them); members per data sample (>= 2).
    Which sampler and guidance: :attr:`EvaluationSettings.sampler` and ``guidance``."""

    enabled: bool = True
    members: int = 4

    def __post_init__(self) -> None:
        check_bool("sampling.enabled", self.enabled)
        check_integer("sampling.members", self.members, 2, " (CRPS, spread-skill)")


SECTIONS: dict[str, type] = {"bound": BoundSettings, "ode": ODESettings, "sampling": SamplingSettings,
                             "floor": FloorSettings, "verdict": VerdictSettings, "fidelity": FidelitySettings}


@dataclass(frozen=True)
class EvaluationSettings:
    """Args:
    split: ``"train"``, ``"val"`` or ``"test"`` (the checkpoint's split indices).
    max_samples: the first N samples of the split (None: all).
    batch_size: data samples per step.
    seed: the noise of the bound and of the members, keyed by (seed, store index, member).
    num_panels: data/sample pairs kept for the sample figure.
    bound, ode, sampling, sampler, guidance, metrics, floor, verdict, fidelity: the sections.
    """

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
    metrics: FieldMetricSuite = field(default_factory=FieldMetricSuite)
    floor: FloorSettings = field(default_factory=FloorSettings)
    verdict: VerdictSettings = field(default_factory=VerdictSettings)
    fidelity: FidelitySettings = field(default_factory=FidelitySettings)

    def __post_init__(self) -> None:
        check_choice("split", self.split, SPLITS)
        if self.max_samples is not None:
            check_integer("max_samples", self.max_samples, 1)
        check_integer("batch_size", self.batch_size, 1)
        check_integer("seed", self.seed, 0)
        check_integer("num_panels", self.num_panels, 1)
        for key, cls in SECTIONS.items():
            check_instance(key, getattr(self, key), cls, f"{cls.__name__}(...)")
        check_instance("sampler", self.sampler, Sampler, "a sampler (scidiff.inference.DDIM(...) or DDPM())")
        check_instance("guidance", self.guidance, GuidanceSpec, "GuidanceSpec(...)")
        check_instance("metrics", self.metrics, FieldMetricSuite, "a metric suite (FieldMetricSuite(...))")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EvaluationSettings:
        """The settings of a plain ``configs/evaluate.yaml`` (sections as mappings, the sampler
        and the metric suite named by ``_target_``); its other keys (``checkpoint``, ``out``,
        ...) are not settings and are ignored. Raises ``ValueError`` naming the key."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in config:
                continue
            value = config[f.name]
            if f.name in SECTIONS:
                section = SECTIONS[f.name]
                value = section(**settings_of(section, value or {}, f.name))
            elif f.name == "sampler":
                value = as_sampler(value or {})
            elif f.name == "guidance":
                value = as_guidance(value)
            elif f.name == "metrics":
                value = as_suite(value)
            kwargs[f.name] = value
        return cls(**kwargs)


__all__ = [
    "ESTIMATORS",
    "SECTIONS",
    "SPLITS",
    "VARIANCE_CHOICES",
    "BoundSettings",
    "EvaluationSettings",
    "ODESettings",
    "SamplingSettings",
]
