"""The true NLL and the gap (bound - true) in scidiff-evaluate.

The store holds fields x_j ~ N(m_j, s_j^2 I) (i.i.d. points) whose exact log-density
is written, like the GRF generator's, as a per-sample ``log_likelihood`` (nats,
physical units); m_j and s_j come from the sample's parameter ``forcing``. What can
be wrong and is pinned here: the conversion to bits/dim (per valid point, ln 2), the
sign and pairing of the gap for every bound variant and the ODE NLL, its standard
error (over the per-sample differences), the evaluation file's variables, the
one-line summary, and the conditional-vs-marginal rule for a model that is not
given the parameters.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from scidiff.data import FieldDataModule, FractionSplit
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule
from scidiff.evaluation.report import read_evaluation_metrics, summary_line, write_evaluation_file
from scidiff.evaluation import (
    BoundSettings,
    EvaluationError,
    EvaluationSettings,
    FieldMetricSuite,
    ODESettings,
    SamplingSettings,
    evaluate,
)
from scidiff.inference import Pretrained

N, H, W = 16, 6, 10
LN2 = math.log(2.0)


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_store(path: Path, units: str = "nat") -> Path:
    rng = np.random.default_rng(3)
    forcing = rng.uniform(1.0, 4.0, N)
    mean, std = 10.0 * forcing, 0.5 * forcing  # physical units far from the normalised ones
    x = (mean[:, None, None] + std[:, None, None] * rng.standard_normal((N, H, W))).astype(np.float32)
    xd = x.astype(np.float64)
    ll = (-0.5 * ((xd - mean[:, None, None]) / std[:, None, None]) ** 2
          - np.log(std[:, None, None]) - 0.5 * math.log(2 * math.pi)).sum(axis=(1, 2))
    ds = xr.Dataset(
        {"field": (("sample", "y", "x"), x, {"units": "K"}),
         "forcing": (("sample",), forcing.astype(np.float32), {"units": "1"}),
         "log_likelihood": (("sample",), ll, {"units": units})},
        coords={"y": np.arange(H, dtype=np.float64), "x": np.arange(W, dtype=np.float64)},
        attrs={"parameters": "forcing", "fields": "field"},
    )
    ds.to_zarr(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("store") / "gauss.zarr")


def data_config(path: Path, params: bool) -> dict:
    return {
        "_target_": "scidiff.data.FieldDataModule", "_convert_": "all", "path": str(path),
        "variables": [{"name": "field", "transform": "zscore"}], "spatial_dims": ["y", "x"],
        "sample_dims": "sample", "params": [{"name": "forcing", "transform": "zscore"}] if params else [],
        "split": {"_target_": "scidiff.data.FractionSplit", "train": 0.5, "val": 0.25, "test": 0.25},
        "batch_size": 4, "mask": "never", "num_workers": 0,
    }


class ParamDenoiser(nn.Module):
    """A deterministic eps-predictor: a periodic 3x3 convolution plus a parameter shift."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, cond=None):
        out = self.conv(x)
        if cond is not None and cond.params is not None:
            out = out + self.lin(cond.params).reshape(-1, 1, 1, 1)
        return out


def make_pretrained(store: Path, params: bool = True) -> Pretrained:
    cfg = data_config(store, params)
    dm = FieldDataModule(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "split"},
                         split=FractionSplit(0.5, 0.25, 0.25))
    dm.setup()
    return Pretrained(
        denoiser=ParamDenoiser().eval().requires_grad_(False),
        diffusion=GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=25)),
        metadata=dm.metadata, statistics=dm.statistics, config={"data": cfg},
        checkpoint=store.parent / "fake.ckpt", sha256="0" * 64, global_step=3, weights="raw",
        split_indices={k: v.tolist() for k, v in dm.split_indices.items()},
    )


def settings(**kw) -> EvaluationSettings:
    base = dict(split="val", batch_size=3, sampling=SamplingSettings(enabled=False),
                bound=BoundSettings(estimator="exact", timestep_batch=25, variance=("fixed_large",)))
    base.update(kw)
    return EvaluationSettings(**base)


@pytest.fixture(scope="module")
def conditional(store) -> tuple:
    pre = make_pretrained(store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ev = evaluate(pre, settings(ode=ODESettings(enabled=True, num_steps=3, num_probes=2)), device="cpu",
                      progress=False)
    assert not [w for w in caught if "true_loglik" in str(w.message)]  # a conditional model: no warning
    return pre, ev


def test_true_nll_is_the_stored_log_likelihood_in_bits_per_dim(conditional, store):
    _, ev = conditional
    ll = xr.open_zarr(store)["log_likelihood"].values
    want = -ll[ev.indices] / (H * W * LN2)
    np.testing.assert_array_equal(ev.indices, [8, 9, 10, 11])
    np.testing.assert_allclose(ev.per_sample["true_nll_bpd"], want, rtol=1e-12)
    assert ev.scalars["true_nll_bpd"] == pytest.approx(want.mean(), rel=1e-12)
    assert ev.scalars["true_nll_bpd_se"] == pytest.approx(want.std(ddof=1) / 2.0, rel=1e-9)
    # the physical units matter: fields of std 0.5 forcing .. 2 in kelvin, not the normalised ones
    assert abs(ev.scalars["true_nll_bpd"] - ev.scalars["bpd_model"]) > 1.0


def test_gap_is_bound_minus_true_for_every_variant_and_the_ode(conditional):
    _, ev = conditional
    ps, sc = ev.per_sample, ev.scalars
    for name, bound in (("fixed_small", "bpd"), ("fixed_large", "bpd/fixed_large"), ("ode", "ode_bpd")):
        gap = ps[bound] - ps["true_nll_bpd"]
        np.testing.assert_allclose(ps[f"gap/{name}"], gap, rtol=0, atol=1e-9)
        assert sc[f"gap/{name}"] == pytest.approx(sc[bound] - sc["true_nll_bpd"], abs=1e-9)
        # paired: the SE of the per-sample differences, not of either number
        assert sc[f"gap_se/{name}"] == pytest.approx(gap.std(ddof=1) / math.sqrt(gap.size), rel=1e-6)
    # a bound is above the true NLL of the data it was evaluated on (an untrained model: by far)
    assert sc["gap/fixed_small"] > 0 and sc["gap/fixed_large"] > 0
    assert "conditional_nll_bpd" not in sc and "log_likelihood" in ev.info["true_nll"]


def test_importance_gap_and_its_per_timestep_terms(store):
    pre = make_pretrained(store)
    ev = evaluate(pre, settings(bound=BoundSettings(estimator="importance", num_terms=8, variance=("fixed_large",))),
                  device="cpu", progress=False)
    ps, sc = ev.per_sample, ev.scalars
    np.testing.assert_allclose(ps["gap/fixed_small"], ps["bpd"] - ps["true_nll_bpd"], atol=1e-9)
    np.testing.assert_allclose(ps["gap/fixed_large"], ps["bpd/fixed_large"] - ps["true_nll_bpd"], atol=1e-9)
    assert sc["bpd_mc_se/fixed_large"] > 0
    # the per-timestep estimates sum (with the prior) to the estimated bound, normalised units
    assert ev.terms is not None and ev.terms.shape == (25,)
    assert ev.terms.sum() + sc["prior_bpd"] == pytest.approx(ps["bpd_model"].mean(), rel=1e-6)  # float32 terms
    assert (ev.terms[1:] == 0).any() and (ev.terms[1:] > 0).any()  # 4 x 8 draws over 24 timesteps
    assert ev.info["terms"].startswith("importance")


def test_file_and_summary_line_hold_the_gap(conditional, tmp_path):
    _, ev = conditional
    path = write_evaluation_file(ev, tmp_path / "evaluation.nc")
    metrics = read_evaluation_metrics(path)
    assert metrics["true_nll_bpd"] == pytest.approx(ev.scalars["true_nll_bpd"], rel=1e-12)
    assert metrics["gap/fixed_large"] == pytest.approx(ev.scalars["gap/fixed_large"], rel=1e-12)
    with xr.open_dataset(path) as ds:
        np.testing.assert_allclose(ds["gap__ode"].values, ev.per_sample["gap/ode"])
        np.testing.assert_allclose(ds["true_nll_bpd"].values, ev.per_sample["true_nll_bpd"])
    line = summary_line(ev, path, None, None)
    assert f"true NLL {ev.scalars['true_nll_bpd']:.4f} bits/dim" in line
    assert f"fixed_large {ev.scalars['gap/fixed_large']:.4f} ± {ev.scalars['gap_se/fixed_large']:.4f}" in line


def test_unconditional_model_on_a_mixture_reports_a_conditional_nll(store):
    """The stored density is conditioned on ``forcing``, which varies; a model without it
    bounds the marginal NLL: the numbers come under other names, with a warning."""
    pre = make_pretrained(store, params=False)
    with pytest.warns(UserWarning, match="conditional NLL .*forcing"):
        ev = evaluate(pre, settings(), device="cpu", progress=False)
    assert "true_nll_bpd" not in ev.scalars and not any(k.startswith("gap/") for k in ev.scalars)
    np.testing.assert_allclose(ev.per_sample["gap_conditional/fixed_small"],
                               ev.per_sample["bpd"] - ev.per_sample["conditional_nll_bpd"], atol=1e-9)
    assert "conditional NLL (not the marginal)" in summary_line(ev, None, None, None)


def test_disabled_absent_or_wrong_units(store, tmp_path):
    pre = make_pretrained(store)
    off = evaluate(pre, settings(metrics=FieldMetricSuite(true_loglik_variable=None)), device="cpu", progress=False)
    assert not any("nll" in k or k.startswith("gap") for k in off.scalars) and off.info["true_nll"] == "none"
    other = evaluate(pre, settings(metrics=FieldMetricSuite(true_loglik_variable="no_such_variable")), device="cpu",
                     progress=False)
    assert "true_nll_bpd" not in other.scalars
    bits = make_pretrained(make_store(tmp_path / "bits.zarr", units="bit"))
    with pytest.raises(EvaluationError, match="metrics.true_loglik_variable: 'log_likelihood' .* units 'bit'"):
        evaluate(bits, settings(), device="cpu", progress=False)
