"""The evaluation's settings check their own values when constructed, naming the key.

What can be wrong and is pinned here: a bad value that is accepted (and fails, or
silently does something else, deep in the loop), a message that does not start with
the key's path in ``configs/evaluate.yaml``, the reverse variances drifting from the
diffusion's own vocabulary, the config's defaults drifting from the dataclasses', and
the metric suite not being the class the config names with ``_target_``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import xarray as xr

from scidiff.cli.compose import compose_config
from scidiff.cli.errors import ConfigError
from scidiff.cli.evaluate import check_config
from scidiff.diffusion.process import VARIANCES
from scidiff.evaluation import (
    BoundSettings,
    EvaluationError,
    EvaluationSettings,
    FieldMetricSuite,
    FloorSettings,
    MetricSettings,
    ODESettings,
    SamplingSettings,
    VerdictSettings,
    as_suite,
)
from scidiff.evaluation.members import EnsembleSource
from scidiff.evaluation.settings import VARIANCE_CHOICES
from scidiff.inference import DDIM, GuidanceSpec


@pytest.mark.parametrize(("make", "message"), [
    (lambda: BoundSettings(estimator="exactly"), "bound.estimator: expected one of ['exact', 'importance']"),
    (lambda: BoundSettings(num_terms=1), "bound.num_terms: must be >= 2 (for a standard error), got 1"),
    (lambda: BoundSettings(num_terms=4.0), "bound.num_terms: expected an integer, got 4.0"),
    (lambda: BoundSettings(timestep_batch=0), "bound.timestep_batch: must be >= 1, got 0"),
    (lambda: BoundSettings(variance="fixed_large"), "bound.variance: expected a list of names, got 'fixed_large'"),
    (lambda: BoundSettings(variance=("fixed_huge",)), "bound.variance: unknown variance 'fixed_huge'"),
    (lambda: BoundSettings(optimal_samples=0), "bound.optimal_samples: must be >= 1, got 0"),
    (lambda: BoundSettings(enabled="yes"), "bound.enabled: expected true or false, got 'yes'"),
    (lambda: ODESettings(num_probes=1), "ode.num_probes: must be >= 2 (for a standard error), got 1"),
    (lambda: ODESettings(num_steps=0), "ode.num_steps: must be >= 1, got 0"),
    (lambda: SamplingSettings(members=1), "sampling.members: must be >= 2 (CRPS, spread-skill), got 1"),
    (lambda: SamplingSettings(enabled=False, members=1), "sampling.members: must be >= 2"),
    (lambda: FieldMetricSuite(area_weights="cos"), "metrics.area_weights: expected one of ['auto', 'none'], got 'cos'"),
    (lambda: FieldMetricSuite(atoms="maybe"), "metrics.atoms: expected one of ['auto', 'on', 'off'], got 'maybe'"),
    (lambda: FieldMetricSuite(wasserstein_bins=0), "metrics.wasserstein_bins: must be >= 1, got 0"),
    (lambda: FieldMetricSuite(spectral_max_wavenumber=0.0),
     "metrics.spectral_max_wavenumber: must be a finite number > 0"),
    (lambda: FieldMetricSuite(atom_min_distance=0), "metrics.atom_min_distance: must be >= 1, got 0"),
    (lambda: FieldMetricSuite(atom_threshold=float("nan")), "metrics.atom_threshold: must be a finite number, got nan"),
    (lambda: FloorSettings(pool="bogus"), "floor.pool: expected one of ['all', 'train', 'val', 'test'], got 'bogus'"),
    (lambda: FloorSettings(enabled=1), "floor.enabled: expected true or false, got 1"),
    (lambda: VerdictSettings(factor=0.0), "verdict.factor: must be a finite number > 0, got 0.0"),
    (lambda: VerdictSettings(score_tolerance=-0.5), "verdict.score_tolerance: must be a finite number >= 0, got -0.5"),
    (lambda: VerdictSettings(fail_on_unfaithful="maybe"), "verdict.fail_on_unfaithful: expected true or false"),
    (lambda: EvaluationSettings(split="validation"),
     "split: expected one of ['train', 'val', 'test'], got 'validation'"),
    (lambda: EvaluationSettings(batch_size=0), "batch_size: must be >= 1, got 0"),
    (lambda: EvaluationSettings(max_samples=0), "max_samples: must be >= 1, got 0"),
    (lambda: EvaluationSettings(num_panels=0), "num_panels: must be >= 1, got 0"),
    (lambda: EvaluationSettings(seed=-1), "seed: must be >= 0, got -1"),
    (lambda: EvaluationSettings(bound={"num_terms": 4}), "bound: expected BoundSettings(...), got {'num_terms': 4}"),
    (lambda: EvaluationSettings(sampler="ddim"), "sampler: expected a sampler"),
    (lambda: EvaluationSettings(metrics={"atoms": "off"}), "metrics: expected a metric suite"),
])
def test_a_bad_value_cannot_be_constructed_and_names_its_key(make, message):
    with pytest.raises(ValueError) as err:
        make()
    assert str(err.value).startswith(message), str(err.value)


def test_settings_are_frozen_and_normalised():
    """Constructing is the only check, so settings cannot change afterwards; numpy integers count as integers."""
    bound = BoundSettings(variance=["fixed_large", "optimal"], num_terms=np.int64(4))
    assert bound.variance == ("fixed_large", "optimal")
    with pytest.raises(dataclasses.FrozenInstanceError):
        bound.num_terms = 1  # type: ignore[misc]
    for cls in (ODESettings, SamplingSettings, EvaluationSettings, FieldMetricSuite, FloorSettings, VerdictSettings):
        assert cls.__dataclass_params__.frozen, cls


def test_variances_are_the_diffusions_and_the_optimal_one():
    assert VARIANCE_CHOICES == (*VARIANCES, "optimal")
    for name in VARIANCE_CHOICES:
        assert BoundSettings(variance=(name,)).variance == (name,)


class MySuite(FieldMetricSuite):
    """A suite of one's own, named by ``metrics._target_``."""


def test_the_metric_suite_is_named_by_target():
    assert MetricSettings is FieldMetricSuite
    suite = as_suite({"_target_": "scidiff.evaluation.FieldMetricSuite", "atoms": "off", "wasserstein_bins": 200})
    assert suite == FieldMetricSuite(atoms="off", wasserstein_bins=200)
    assert as_suite({"atoms": "off"}) == FieldMetricSuite(atoms="off") and as_suite(None) == FieldMetricSuite()
    assert as_suite(suite) is suite
    mine = as_suite({"_target_": f"{__name__}.MySuite", "atoms": "on"})  # a suite of one's own
    assert type(mine) is MySuite and mine.atoms == "on"
    with pytest.raises(ValueError, match=r"^metrics.bins: not a setting of FieldMetricSuite \(its settings: area_w"):
        as_suite({"_target_": "scidiff.evaluation.FieldMetricSuite", "bins": 10})
    with pytest.raises(ValueError, match=r"^metrics._target_: scidiff.evaluation.CRPS is not a FieldMetricSuite"):
        as_suite({"_target_": "scidiff.evaluation.CRPS"})
    with pytest.raises(ValueError, match=r"^metrics._target_: no.such.Suite is not a FieldMetricSuite"):
        as_suite({"_target_": "no.such.Suite"})


def test_the_configs_defaults_are_the_dataclasses(tmp_path):
    """configs/evaluate.yaml and the dataclasses agree: the composed config constructs the
    default settings (a drift would change what the CLI computes against the Python API)."""
    plain = check_config(compose_config("evaluate", [f"checkpoint={tmp_path}"]))
    assert plain["settings"] == EvaluationSettings()
    assert plain["settings"].sampler == DDIM() and plain["settings"].guidance == GuidanceSpec()
    over = check_config(compose_config("evaluate", [f"checkpoint={tmp_path}", "bound.variance=[fixed_large]",
                                                    "metrics.atoms=off", "sampler=ddpm", "floor.pool=train"]))
    s = over["settings"]
    assert s.bound.variance == ("fixed_large",) and s.metrics.atoms == "off" and s.floor.pool == "train"
    assert s.sampler.name == "ddpm"
    with pytest.raises(ConfigError, match=r"^bound.num_terms: must be >= 2 \(for a standard error\), got 1$"):
        check_config(compose_config("evaluate", [f"checkpoint={tmp_path}", "bound.num_terms=1"]))
    with pytest.raises(ConfigError, match=r"^metrics._target_: os.path is not a FieldMetricSuite"):
        check_config(compose_config("evaluate", [f"checkpoint={tmp_path}", "metrics._target_=os.path"]))


def test_from_config_names_unknown_keys():
    with pytest.raises(ValueError, match=r"^ode.steps: not a setting of ODESettings \(its settings: enabled, num_st"):
        EvaluationSettings.from_config({"ode": {"steps": 3}})
    s = EvaluationSettings.from_config({"split": "val", "bound": {"num_terms": 4}, "checkpoint": "ignored"})
    assert s == EvaluationSettings(split="val", bound=BoundSettings(num_terms=4))


def test_an_ensemble_store_needs_two_members(tmp_path):
    class Meta:
        channel_names, spatial_dims, param_names = ("tas",), ("y", "x"), ()

    one = xr.Dataset({"tas": (("sample", "member", "y", "x"), np.zeros((2, 1, 3, 4)))})
    one.to_zarr(tmp_path / "one.zarr", zarr_format=2)
    with pytest.raises(EvaluationError, match=r"^ensemble: .*one.zarr has 1 member\(s\); CRPS and the spread-skill"):
        EnsembleSource(tmp_path / "one.zarr", Meta)
    three = xr.Dataset({"tas": (("sample", "member", "y", "x"), np.zeros((2, 3, 3, 4)))})
    three.to_zarr(tmp_path / "three.zarr", zarr_format=2)
    assert EnsembleSource(tmp_path / "three.zarr", Meta).num_members == 3
    with pytest.raises(EvaluationError, match="has 1 member"):
        EnsembleSource(tmp_path / "three.zarr", Meta, members=1)
