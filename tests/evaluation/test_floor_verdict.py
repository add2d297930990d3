"""The noise floor of the sample metrics and the verdict, on Gaussian random fields where
the answer is known.

A store of 256 periodic GRFs (16 x 16, P(k) = A k^-n with n and A drawn per sample) and
"models" given as ensemble stores: a second, independent floor (other real fields with
near conditions) and exact draws from each sample's true conditional distribution must
be judged faithful; the same draws scaled by 2, or smoothed, or with each member's scales
varied together, must not, with the failing metric named. The neighbours are checked
against a brute-force search on the data module's normalised parameters (they exclude the sample itself, do not depend on the
batch size, and come from the configured pool); an unconditional model's floor is
random distinct samples keyed by (seed, sample).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from scidiff.data import FieldDataModule, FractionSplit
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule
from scidiff.evaluation import BoundSettings, EvaluationSettings, SamplingSettings, evaluate
from scidiff.evaluation.data import build_datamodule
from scidiff.evaluation.floor import FloorEnsemble, FloorSettings, nearest_neighbours, pool_indices
from scidiff.evaluation.report import verdict_lines, write_evaluation_file
from scidiff.evaluation.verdict import RULES, VerdictSettings, judge, passes
from scidiff.inference import DDIM, GuidanceSpec, Pretrained
from scidiff_datasets import grf

N, SHAPE, M = 256, (16, 16), 4


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    index = rng.uniform(1.0, 3.5, N).astype(np.float32)
    amplitude = np.exp(rng.uniform(np.log(0.5), np.log(2.0), N)).astype(np.float32)
    fields = grf.sample_fields(rng.standard_normal((N, *SHAPE)), amplitude, index).astype(np.float32)
    path = tmp_path_factory.mktemp("grf") / "grf.zarr"
    xr.Dataset({"field": (("sample", "y", "x"), fields, {"units": "1"}),
                "spectral_index": ("sample", index), "amplitude": ("sample", amplitude)},
               coords={"sample": np.arange(N)}).to_zarr(path)
    return path


class Zero(nn.Module):
    def forward(self, x, t, cond=None):
        return torch.zeros_like(x)


def data_config(path: Path, conditional: bool) -> dict:
    cfg = {"_target_": "scidiff.data.FieldDataModule", "_convert_": "all", "path": str(path),
           "variables": [{"name": "field", "transform": "zscore"}], "spatial_dims": ["y", "x"],
           "sample_dims": "sample", "batch_size": 8, "mask": "never", "num_workers": 0,
           "split": {"_target_": "scidiff.data.FractionSplit", "train": 0.5, "val": 0.25, "test": 0.25}}
    if conditional:
        cfg["params"] = [{"name": "spectral_index", "transform": "zscore"}, {"name": "amplitude", "transform": "log"}]
    return cfg


def make_pretrained(path: Path, conditional: bool) -> Pretrained:
    cfg = data_config(path, conditional)
    dm = FieldDataModule(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "split"},
                         split=FractionSplit(0.5, 0.25, 0.25))
    dm.setup()
    return Pretrained(
        denoiser=Zero(), diffusion=GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=40)),
        metadata=dm.metadata, statistics=dm.statistics, config={"data": cfg}, checkpoint=path.parent / "x.ckpt",
        sha256="0" * 64, global_step=3, weights="raw", split_indices={k: v.tolist() for k, v in dm.split_indices.items()},
    )


@pytest.fixture(scope="module")
def cond(store) -> Pretrained:
    return make_pretrained(store, True)


@pytest.fixture(scope="module")
def uncond(store) -> Pretrained:
    return make_pretrained(store, False)


def settings(**kw) -> EvaluationSettings:
    base = dict(split="test", batch_size=16, bound=BoundSettings(enabled=False),
                sampling=SamplingSettings(members=M), sampler=DDIM(steps=2))
    base.update(kw)
    return EvaluationSettings(**base)


def write_ensemble(path: Path, members: np.ndarray, index: np.ndarray) -> Path:
    xr.Dataset({"field": (("sample", "member", "y", "x"), members.astype(np.float32))},
               coords={"data_index": ("sample", np.asarray(index, np.int64))}).to_zarr(path)
    return path


def smooth(fields: np.ndarray, scale: float = 0.15) -> np.ndarray:
    k = np.fft.fftfreq(SHAPE[0])
    kk = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    return np.fft.ifft2(np.fft.fft2(fields) * np.exp(-(kk / scale) ** 2)).real


# ---------------------------------------------------------------------------- the rules
def test_rules_of_the_table():
    """One example each side of every rule, with the defaults (factor 3, ratio_factor 1.5,
    tolerances 0.1, correlations 5 standard errors or 0.02); a metric that is not finite fails; the
    table covers every metric."""
    s = VerdictSettings()
    assert (s.factor, s.ratio_factor, s.ratio_tolerance, s.score_tolerance) == (3.0, 1.5, 0.1, 0.1)
    assert set(RULES) == {"spectral_error", "rank_deviation", "w1", "bias_rms", "std_ratio", "spread_skill",
                          "domain_mean_std_ratio", "crps", "energy_score", "shell_correlation"}
    assert (s.match_tolerance, s.correlation_factor, s.correlation_tolerance) == (0.5, 5.0, 0.02)
    # correlations: at most 5 standard errors of the difference above the floor, always 0.02; below it passes
    assert passes("correlation", 0.13, 0.03, s, se=0.02) and not passes("correlation", 0.14, 0.03, s, se=0.02)
    assert passes("correlation", -0.5, 0.03, s, se=0.02)
    assert passes("correlation", 0.019, 0.0, s, se=0.001) and not passes("correlation", 0.021, 0.0, s, se=0.001)
    assert not passes("correlation", 0.0, 0.0, s)  # no standard error: cannot be judged, fails
    v = judge({"shell_correlation/a": 0.11, "shell_correlation_se/a": 0.012, "floor/shell_correlation/a": 0.0,
               "floor/shell_correlation_se/a": 0.016}, s)
    assert v.failing == ["shell_correlation/a"] and v.metrics[0].rule.endswith("= 0.1")  # se 0.02
    assert passes("zero", 0.30, 0.1, s) and not passes("zero", 0.31, 0.1, s)
    # ratios: the absolute allowance ln 1.1 when the floor is near 1, else 1.5 x |ln floor|
    assert passes("ratio", 1.09, 1.02, s) and passes("ratio", 1 / 1.09, 1.02, s)
    assert not passes("ratio", 1.12, 1.02, s) and not passes("ratio", 2.4, 1.02, s)
    assert passes("ratio", 1.45, 1.3, s) and not passes("ratio", 1.5, 1.3, s)  # 1.5 x ln 1.3 = ln 1.48
    # the domain mean's spread: within a factor 1.5 of the floor's, either way, whatever the floor
    assert passes("match", 1.8, 1.25, s) and passes("match", 0.84, 1.25, s) and not passes("match", 0.83, 1.25, s)
    assert passes("match", 0.67, 1.0, s) and not passes("match", 0.66, 1.0, s) and not passes("match", 1.0, 0.0, s)
    assert not passes("match", 1.51, 1.0, s)
    assert passes("score", 1.1, 1.0, s) and not passes("score", 1.11, 1.0, s)
    assert not passes("zero", math.nan, 1.0, s) and not passes("ratio", 1.0, math.nan, s)
    assert not passes("ratio", 0.0, 1.0, s)
    scalars = {"crps/a": 1.0, "floor/crps/a": 1.0, "std_ratio/a": 2.0, "floor/std_ratio/a": 1.0, "w1/a": 5.0,
               "energy_score": 3.0, "floor/energy_score": 2.0}
    v = judge(scalars, s)
    assert [m.key for m in v.metrics] == ["std_ratio/a", "crps/a", "energy_score"]  # w1 has no floor: not judged
    assert v.failing == ["std_ratio/a", "energy_score"] and not v.faithful and v.label == "not faithful"
    assert v.summary().startswith("NOT faithful: std_ratio/a, energy_score")
    assert judge({"crps/a": 1.0}, s) is None
    # bad settings never reach judge: constructing them is the check, naming the key
    for bad, message in ((dict(factor=-1.0), "verdict.factor: must be a finite number > 0, got -1.0"),
                         (dict(ratio_tolerance=-0.1),
                          "verdict.ratio_tolerance: must be a finite number >= 0, got -0.1")):
        with pytest.raises(ValueError, match=message):
            VerdictSettings(**bad)


# ---------------------------------------------------------------------- the neighbours
def test_neighbours_are_the_nearest_conditions_and_never_the_sample(cond):
    """Against a brute-force search on the normalised parameters that read_batch returns
    (the floor reads only the parameters): the same M nearest, the sample itself excluded;
    a pool restricted to one split draws from it only."""
    dm = build_datamodule(cond)
    reader = dm.datasets["test"]
    test = np.asarray(dm.split_indices["test"])
    fl = FloorEnsemble(dm, reader, cond.metadata, test, M, FloorSettings(), seed=0)
    params = reader.read_batch(np.arange(N))["params"].double().numpy()
    assert fl.indices.shape == (test.size, M)
    for row, j in zip(fl.indices, test):
        d = ((params - params[j]) ** 2).sum(1)
        d[j] = np.inf
        want = np.argsort(d, kind="stable")[:M]
        assert sorted(row.tolist()) == sorted(want.tolist()), j
        assert j not in row
    # the pool is every split: neighbours come from train, val and test alike
    assert {s for s, idx in dm.split_indices.items() if np.isin(fl.indices, idx).any()} == {"train", "val", "test"}
    for pool in ("train", "test"):
        only = FloorEnsemble(dm, reader, cond.metadata, test, M, FloorSettings(pool=pool), seed=0)
        assert np.isin(only.indices, dm.split_indices[pool]).all()
        assert not (only.indices == test[:, None]).any()
    # chunked streaming over the pool gives the same answer
    pool = pool_indices(dm, "all")
    feats = params[pool]
    np.testing.assert_array_equal(nearest_neighbours(test, params[test], pool, feats, M, 0, chunk=7),
                                  nearest_neighbours(test, params[test], pool, feats, M, 0, chunk=4096))
    with pytest.raises(ValueError, match="floor.pool: the 'val' pool has 64 samples"):
        FloorEnsemble(dm, reader, cond.metadata, test, 64, FloorSettings(pool="val"), seed=0)


def test_conditioning_fields_count_as_rms_differences(store):
    """A downscaling model (a coarsened copy of the target as conditioning field, plus the
    parameters): the distance adds each field channel's mean squared difference over
    the grid to the parameters' squared differences."""
    cfg = data_config(store, True)
    cfg["fields"] = [{"coarsen": {"y": 4, "x": 4}}]
    dm = FieldDataModule(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "split"},
                         split=FractionSplit(0.5, 0.25, 0.25))
    dm.setup()
    reader = dm.datasets["test"]
    test = np.asarray(dm.split_indices["test"])[:6]
    fl = FloorEnsemble(dm, reader, dm.metadata, test, M, FloorSettings(), seed=0)
    batch = reader.read_batch(np.arange(N))
    params, fields = batch["params"].double().numpy(), batch["fields"].double().flatten(1).numpy()
    d_fields = ((fields[:, None] - fields[None, test]) ** 2).mean(-1)  # [N, 6]
    d = ((params[:, None] - params[None, test]) ** 2).sum(-1) + d_fields
    d[test, np.arange(test.size)] = np.inf
    for r in range(test.size):
        assert sorted(fl.indices[r].tolist()) == sorted(np.argsort(d[:, r], kind="stable")[:M].tolist())
    params_only = dataclasses.replace(dm.metadata, field_names=())
    by_params = FloorEnsemble(dm, reader, params_only, test, M, FloorSettings(), seed=0)
    assert (np.sort(by_params.indices, 1) != np.sort(fl.indices, 1)).any()  # the fields matter


def test_unconditional_floor_is_random_distinct_and_keyed_by_sample(uncond):
    """No conditions: M distinct random samples != j, the same for j whatever else is
    evaluated, another draw for another seed."""
    dm = build_datamodule(uncond)
    reader = dm.datasets["test"]
    test = np.asarray(dm.split_indices["test"])
    a = FloorEnsemble(dm, reader, uncond.metadata, test, M, FloorSettings(), seed=0)
    assert not a.conditional
    assert all(len(set(r.tolist())) == M for r in a.indices)
    assert not (a.indices == test[:, None]).any()
    part = FloorEnsemble(dm, reader, uncond.metadata, test[5:9], M, FloorSettings(), seed=0)
    np.testing.assert_array_equal(part.indices, a.indices[5:9])
    other = FloorEnsemble(dm, reader, uncond.metadata, test, M, FloorSettings(), seed=1)
    assert (other.indices != a.indices).mean() > 0.9
    # spread over the whole store, not the nearest store indices
    assert np.ptp(a.indices) > N // 2


def test_floor_does_not_depend_on_batch_size(cond):
    """Batch size 1 and 8: the same neighbours and the same floor/* numbers."""
    kw = dict(max_samples=8, sampling=SamplingSettings(members=3), sampler=DDIM(steps=2))
    one = evaluate(cond, settings(batch_size=1, **kw), device="cpu", progress=False)
    eight = evaluate(cond, settings(batch_size=8, **kw), device="cpu", progress=False)
    np.testing.assert_array_equal(one.floor_indices, eight.floor_indices)
    assert one.floor_indices.shape == (8, 3)
    floors = {k for k in one.scalars if k.startswith("floor/")}
    assert {"floor/crps/field", "floor/std_ratio/field", "floor/spectral_error/field", "floor/energy_score",
            "floor/rank_deviation/field", "floor/w1/field", "floor/bias_rms/field", "floor/spread_skill/field",
            "floor/domain_mean_std_ratio/field"} <= floors
    for k in floors:
        assert one.scalars[k] == pytest.approx(eight.scalars[k], rel=1e-9), k
    np.testing.assert_allclose(one.power_floor, eight.power_floor, rtol=1e-9)
    np.testing.assert_allclose(one.rank_histogram_floor, eight.rank_histogram_floor, rtol=1e-12)


def test_floor_skipped_without_sampling_and_bad_settings(cond):
    ev = evaluate(cond, settings(max_samples=2, bound=BoundSettings(timestep_batch=40),
                                 sampling=SamplingSettings(enabled=False)), device="cpu", progress=False)
    assert ev.verdict is None and ev.power_floor is None and not any(k.startswith("floor/") for k in ev.scalars)
    assert ev.info["floor"] == "none: sampling is off"
    assert verdict_lines(ev) == ["verdict: none (no floor: sampling is off)"]
    # bad settings cannot be made, so they never reach evaluate
    for make, message in ((lambda: FloorSettings(pool="bogus"), r"floor.pool: expected one of \['all', 'train', "),
                          (lambda: VerdictSettings(factor=-1.0), "verdict.factor: must be a finite number > 0")):
        with pytest.raises(ValueError, match=message):
            make()


# --------------------------------------------------------------------------- the verdict
@pytest.fixture(scope="module")
def verdicts(cond, store, tmp_path_factory):
    """Evaluations of four ensemble stores on the 64 test samples, 4 members each."""
    d = tmp_path_factory.mktemp("ensembles")
    dm = build_datamodule(cond)
    test = np.asarray(dm.split_indices["test"])
    data = xr.open_zarr(store)
    field = data["field"].values.astype(np.float64)
    # a second floor: the next M nearest real fields (independent of the floor's own M)
    twice = FloorEnsemble(dm, dm.datasets["test"], cond.metadata, test, 2 * M, FloorSettings(), seed=0)
    rng = np.random.default_rng(1)
    exact = grf.sample_fields(rng.standard_normal((test.size * M, *SHAPE)),
                              np.repeat(data["amplitude"].values[test], M),
                              np.repeat(data["spectral_index"].values[test], M)).reshape(test.size, M, *SHAPE)
    # members whose domain mean follows a quarter of its spread, every k != 0 exact: what a
    # denoiser blind to the mean makes (the fault that single-channel norm groups made)
    blind = exact - 0.75 * exact.mean(axis=(-2, -1), keepdims=True)
    # members whose scales vary together: each member rescaled by its own exp(0.1 z), ~10 %
    coupled = exact * np.exp(0.1 * rng.standard_normal((test.size, M, 1, 1)))
    sources = {"second_floor": field[twice.indices[:, M:]], "exact": exact, "scaled": 2.0 * exact,
               "smoothed": smooth(exact), "blind_to_mean": blind, "coupled": coupled}
    out = {}
    for name, members in sources.items():
        path = write_ensemble(d / f"{name}.zarr", members, test)
        out[name] = evaluate(cond, settings(), ensemble=path, device="cpu", progress=False)
    out["_first"] = twice.indices[:, :M]
    return out


def test_real_fields_and_exact_draws_are_faithful(verdicts):
    """The floor against a second independent floor, and exact conditional draws: every
    metric within its floor by the default rules."""
    first = verdicts["_first"]
    for name in ("second_floor", "exact"):
        ev = verdicts[name]
        np.testing.assert_array_equal(ev.floor_indices, first)  # the floor is the M nearest
        assert ev.verdict is not None and len(ev.verdict.metrics) == 10, name
        table = "\n".join(ev.verdict.table())
        assert ev.verdict.faithful, f"{name}:\n{table}"
        assert ev.verdict.summary() == "faithful (10/10 metrics within their floor)"
        s = ev.scalars
        # what "at the floor" looks like here: ratios near 1, scores within a few percent
        assert abs(math.log(s["std_ratio/field"])) < 0.1 and abs(math.log(s["floor/std_ratio/field"])) < 0.1
        assert s["crps/field"] == pytest.approx(s["floor/crps/field"], rel=0.08)


def test_broken_members_fail_with_the_metric_named(verdicts, tmp_path):
    scaled, smoothed = verdicts["scaled"], verdicts["smoothed"]
    assert not scaled.verdict.faithful
    failing = set(scaled.verdict.failing)
    assert {"std_ratio/field", "spectral_error/field", "rank_deviation/field", "w1/field"} <= failing
    assert scaled.scalars["std_ratio/field"] == pytest.approx(2.0 * verdicts["exact"].scalars["std_ratio/field"],
                                                              rel=1e-3)
    # spectral error in ln units: power 4x too high on every shell is ln 4
    assert scaled.scalars["spectral_error/field"] == pytest.approx(math.log(4.0), abs=0.2)
    lines = verdict_lines(scaled)
    assert lines[-1].startswith("verdict: NOT faithful: ") and "std_ratio/field" in lines[-1]
    assert any(line.split()[:2] == ["std_ratio", "field"] and "FAIL" in line for line in lines)
    assert not smoothed.verdict.faithful and "spectral_error/field" in smoothed.verdict.failing
    assert smoothed.scalars["spectral_error/field"] > 10 * smoothed.scalars["floor/spectral_error/field"]

    # the evaluation file holds the floor and the verdict
    path = write_evaluation_file(scaled, tmp_path / "evaluation.nc")
    with xr.open_dataset(path) as ds:
        assert ds.attrs["verdict"] == "not faithful"
        keys = [str(k) for k in ds["verdict_metric"].values]
        passed = dict(zip(keys, ds["verdict_passed"].values.tolist()))
        assert passed["std_ratio/field"] == 0 and len(keys) == 10
        table = json.loads(ds.attrs["verdict_table"])
        assert table["settings"]["factor"] == 3.0 and "std_ratio/field" in table["failing"]
        assert ds["power_floor"].dims == ("channel", "wavenumber")
        assert ds["rank_histogram_floor"].shape == (1, M + 1)
        np.testing.assert_array_equal(ds["floor_index"].values, scaled.floor_indices)
        metrics = dict(zip([str(m) for m in ds["metric"].values], ds["metric_value"].values.tolist()))
        assert metrics["floor/std_ratio/field"] == pytest.approx(scaled.scalars["floor/std_ratio/field"])


def test_a_model_blind_to_the_domain_mean_fails_on_it_alone(verdicts):
    """Members exact at every k != 0 whose domain means have a quarter of their spread: the
    per-point metrics and the spectra (each field's mean removed) pass, the domain mean's
    spread does not; the ratio is the one built in, against the exact draws'."""
    blind, exact = verdicts["blind_to_mean"], verdicts["exact"]
    assert blind.verdict.failing == ["domain_mean_std_ratio/field"], "\n".join(blind.verdict.table())
    assert blind.scalars["domain_mean_std_ratio/field"] == pytest.approx(
        0.25 * exact.scalars["domain_mean_std_ratio/field"], rel=1e-6)
    assert blind.scalars["spectral_error/field"] == pytest.approx(exact.scalars["spectral_error/field"], rel=1e-6)


def test_members_whose_scales_vary_together_fail_on_the_shell_correlation(verdicts):
    """Each member of the exact draws rescaled by its own exp(0.1 z): every shell's power
    moves with the member's scale. The shell correlation sees it (> 0.15 against ~0 for the
    exact draws and the floor); a common scale (the members x 2) leaves it exactly as the
    exact draws'."""
    coupled, exact, scaled = verdicts["coupled"], verdicts["exact"], verdicts["scaled"]
    assert "shell_correlation/field" in coupled.verdict.failing, "\n".join(coupled.verdict.table())
    assert coupled.scalars["shell_correlation/field"] > 0.15
    for ev in (exact, verdicts["second_floor"]):
        assert abs(ev.scalars["shell_correlation/field"] - ev.scalars["floor/shell_correlation/field"]) < 0.08
    assert scaled.scalars["shell_correlation/field"] == pytest.approx(exact.scalars["shell_correlation/field"],
                                                                      abs=1e-9)
    # its standard error: 64 samples x 3 centred members x 28 pairs of the 8 shells up to Nyquist
    assert exact.scalars["shell_correlation_se/field"] == pytest.approx(1 / math.sqrt(64 * 3 * 28))


def test_figures_show_the_floor(verdicts, tmp_path):
    from scidiff.evaluation.plots import evaluation_figures, spectrum_ylabel

    ev = verdicts["exact"]
    assert ev.grid_units == ("grid spacing", "grid spacing")
    assert spectrum_ylabel("1", ev.grid_units, 2) == "power spectral density P(k) [(grid spacing)^2]"
    assert spectrum_ylabel("K", ("km", "km"), 2) == "power spectral density P(k) [K^2 · km^2]"
    names = {p.name for p in evaluation_figures(ev, tmp_path)}
    assert {"power_spectra.png", "rank_histogram.png"} <= names
