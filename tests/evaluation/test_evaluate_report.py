"""The evaluation loop and its report, on a tiny store with physical units far from the
model's (a temperature-like field, 280 K +- 50 K) and a tiny deterministic denoiser.

What can be wrong and is pinned here: the bound in physical units differs from the
model's by exactly the log-determinant of the checkpoint's normalisation (computed
here from the store with numpy, and from statistics the data module must *not*
recompute); per-sample numbers do not depend on the batch size or the rank sharding;
ensembles read from a store give the CRPS of an independent formula; the evaluation
file holds the numbers of the result and is replaced atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn

from scidiff.data import FieldDataModule, FractionSplit
from scidiff.diffusion import GaussianDiffusion, NoiseSchedule
from scidiff.evaluation import (
    BoundSettings,
    Evaluation,
    EvaluationError,
    EvaluationSettings,
    ODESettings,
    SamplingSettings,
    evaluate,
)
from scidiff.evaluation import run as evrun
from scidiff.evaluation.data import area_weights
from scidiff.evaluation.plots import evaluation_figures
from scidiff.evaluation.report import log_to_mlflow, read_evaluation_metrics, to_dataset, write_evaluation_file
from scidiff.inference import DDIM, DistContext, GuidanceSpec, Pretrained

N, H, W = 16, 8, 12  # non-square on purpose
MEAN, STD = 280.0, 50.0  # kelvin


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    white = rng.standard_normal((N, H, W))
    smooth = (white + np.roll(white, 1, axis=1) + np.roll(white, 1, axis=2)) / math.sqrt(3.0)
    smooth[:4] *= 0.6  # the first samples are calmer: statistics of samples 0-3 and 0-7 differ
    ds = xr.Dataset(
        {"tas": (("sample", "y", "x"), MEAN + STD * smooth, {"units": "K"}),
         "forcing": (("sample",), rng.uniform(1.0, 4.0, N), {"units": "W m-2"})},
        coords={"sample": np.arange(N), "y": np.arange(H) * 2.0, "x": np.arange(W) * 2.0},
    )
    path = tmp_path_factory.mktemp("store") / "tas.zarr"
    ds.to_zarr(path)
    return path


def data_config(path: Path) -> dict:
    return {
        "_target_": "scidiff.data.FieldDataModule", "_convert_": "all", "path": str(path),
        "variables": [{"name": "tas", "transform": "zscore"}], "spatial_dims": ["y", "x"],
        "sample_dims": "sample", "params": [{"name": "forcing", "transform": "zscore"}],
        "split": {"_target_": "scidiff.data.FractionSplit", "train": 0.5, "val": 0.25, "test": 0.25},
        "batch_size": 4, "mask": "never", "num_workers": 0,
    }


class TinyDenoiser(nn.Module):
    """Deterministic eps-predictor: a periodic 3x3 convolution plus a parameter shift."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular")
        self.lin = nn.Linear(1, 1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, cond=None):
        out = self.conv(x)
        if cond is not None and cond.params is not None:
            shift = self.lin(cond.params).reshape(-1, 1, 1, 1)
            if cond.drop is not None:  # the null condition (classifier-free guidance)
                shift = shift * (~cond.drop).reshape(-1, 1, 1, 1)
            out = out + shift
        return out


@pytest.fixture(scope="module")
def pretrained(store, tmp_path_factory) -> Pretrained:
    return make_pretrained(store, tmp_path_factory.mktemp("ckpt"))


def make_pretrained(store: Path, ckpt_dir: Path) -> Pretrained:
    """Statistics of the first 4 samples only: the data config's split (train = 8 samples)
    would give other ones, so a recomputation would show in the log-determinant."""
    cfg = {k: v for k, v in data_config(store).items() if not k.startswith("_") and k != "split"}
    stats_dm = FieldDataModule(**cfg, split=FractionSplit(0.25, 0.25, 0.5))
    stats_dm.setup()
    split_dm = FieldDataModule(**cfg, split=FractionSplit(0.5, 0.25, 0.25))
    split_dm.setup()
    diffusion = GaussianDiffusion(NoiseSchedule.from_name("linear", num_timesteps=40))
    return Pretrained(
        denoiser=TinyDenoiser().eval().requires_grad_(False), diffusion=diffusion, metadata=stats_dm.metadata,
        statistics=stats_dm.statistics, config={"data": data_config(store)},
        checkpoint=ckpt_dir / "fake.ckpt", sha256="0" * 64, global_step=7, weights="raw",
        split_indices={k: v.tolist() for k, v in split_dm.split_indices.items()},
    )


def settings(**kw) -> EvaluationSettings:
    base = dict(split="val", batch_size=4, bound=BoundSettings(estimator="exact", timestep_batch=40),
                sampling=SamplingSettings(members=3), sampler=DDIM(steps=4))
    base.update(kw)
    return EvaluationSettings(**base)


@pytest.fixture(scope="module")
def exact(pretrained) -> Evaluation:
    return evaluate(pretrained, settings(), device="cpu", progress=False)


def test_physical_bits_differ_by_the_checkpoints_log_det(exact, store):
    """zscore with the std s of the checkpoint's training samples (0..3): log|det dT/dx| per
    dimension is -ln s, so bits/dim in kelvin = bits/dim normalised + log2 s, per sample."""
    values = xr.open_zarr(store)["tas"].values
    s = values[:4].std()  # population std, as the statistics
    assert abs(s - values[:8].std()) > 0.01 * s  # a recomputation on the config's split would differ
    shift = math.log2(s)
    ps = exact.per_sample
    np.testing.assert_allclose(ps["bpd"] - ps["bpd_model"], shift, rtol=0, atol=1e-9)
    np.testing.assert_allclose(exact.scalars["bpd"] - exact.scalars["bpd_model"], shift, atol=1e-9)
    np.testing.assert_allclose(exact.scalars["log_det_bpd"], -shift, atol=1e-9)
    assert shift > 4  # a 30 K spread: physical and normalised bits/dim are far apart
    # the exact bound is the sum of its terms: prior + sum_t L_t (model units), per sample mean
    assert exact.terms.shape == (40,)
    np.testing.assert_allclose(exact.terms.sum() + exact.scalars["prior_bpd"], ps["bpd_model"].mean(), rtol=1e-6)
    np.testing.assert_array_equal(exact.indices, [8, 9, 10, 11])


class _OneRankOfTwo(DistContext):
    """Rank ``rank`` of a 2-rank job whose collectives see this rank only."""

    def gather(self, obj):
        return [obj]


def test_per_sample_numbers_do_not_depend_on_batches_or_ranks(pretrained, exact, monkeypatch):
    """Noise is keyed by (seed, store index, member): batch size 1 and a 2-rank sharding
    (each rank's rows) reproduce the one-batch numbers."""
    ones = evaluate(pretrained, settings(batch_size=1), device="cpu", progress=False)
    for key in ("bpd", "bpd_model", "prior_bpd", "reconstruction_bpd"):
        np.testing.assert_allclose(ones.per_sample[key], exact.per_sample[key], rtol=1e-6, atol=1e-9)
    for key in ("crps/tas", "spread_skill/tas", "energy_score", "spectral_error/tas"):
        assert ones.scalars[key] == pytest.approx(exact.scalars[key], rel=1e-6)
    rows = {}
    for rank in (0, 1):
        monkeypatch.setattr(evrun, "current_context", lambda rank=rank: _OneRankOfTwo(rank, 2))  # its rows only
        part = evaluate(pretrained, settings(sampling=SamplingSettings(enabled=False)), device="cpu", progress=False)
        rows.update(dict(zip(part.indices.tolist(), part.per_sample["bpd"].tolist())))
    assert sorted(rows) == exact.indices.tolist()
    np.testing.assert_allclose([rows[i] for i in exact.indices.tolist()], exact.per_sample["bpd"], rtol=1e-6)


def test_importance_estimate_and_variances(pretrained, exact):
    """The importance estimate is within a few standard errors of the exact bound of
    the same samples; fixed_large gives another, finite bound."""
    est = evaluate(pretrained, settings(bound=BoundSettings(estimator="importance", num_terms=200,
                                                           variance=("fixed_large",)),
                                        sampling=SamplingSettings(enabled=False)), device="cpu", progress=False)
    diff = est.per_sample["bpd"] - exact.per_sample["bpd"]
    assert np.all(np.abs(diff) <= 5 * est.per_sample["bpd_se"] + 1e-6)
    assert np.all(est.per_sample["bpd_se"] > 0)
    # the per-timestep figure comes from the sampled terms (unbiased per-timestep estimates):
    # they sum, with the prior, to the estimated bound in model units
    assert est.terms.shape == (40,) and est.info["terms"].startswith("importance")
    np.testing.assert_allclose(est.terms.sum() + est.scalars["prior_bpd"], est.per_sample["bpd_model"].mean(),
                               rtol=1e-6)
    assert math.isfinite(est.scalars["bpd/fixed_large"]) and est.scalars["bpd/fixed_large"] != est.scalars["bpd"]
    # the Analytic-DPM variance (from training samples) and the ODE NLL run through the same loop
    more = evaluate(pretrained, settings(bound=BoundSettings(variance=("optimal",), optimal_samples=4,
                                                            optimal_timesteps=10, timestep_batch=40),
                                         ode=ODESettings(enabled=True, num_steps=4, num_probes=2),
                                         sampling=SamplingSettings(enabled=False)), device="cpu", progress=False)
    assert math.isfinite(more.scalars["bpd/optimal"]) and more.scalars["bpd/optimal"] != more.scalars["bpd"]
    assert np.all(np.isfinite(more.per_sample["ode_bpd"])) and np.all(more.per_sample["ode_bpd_se"] > 0)
    assert more.scalars["ode_bpd"] == pytest.approx(more.per_sample["ode_bpd"].mean(), rel=1e-9)
    with pytest.raises(ValueError, match="bound.variance: unknown variance 'fixed_huge'"):  # the settings check it
        BoundSettings(variance=("fixed_huge",))


def test_ensemble_store_replaces_generation(pretrained, store, tmp_path):
    """Members from a zarr store (dims sample, member, y, x): the CRPS equals the fair
    CRPS by its pairwise definition, computed here with numpy."""
    data = xr.open_zarr(store)
    idx = np.arange(8, 12)
    obs = data["tas"].values[idx]
    rng = np.random.default_rng(1)
    members = obs[:, None] + rng.normal(0.0, 20.0, (4, 5, H, W))
    ens = xr.Dataset({"tas": (("sample", "member", "y", "x"), members)},
                     coords={"forcing": ("sample", data["forcing"].values[idx]), "member": np.arange(5)})
    ens.to_zarr(tmp_path / "ens.zarr")
    out = evaluate(pretrained, settings(bound=BoundSettings(enabled=False)), ensemble=tmp_path / "ens.zarr",
                   device="cpu", progress=False)
    m = members.shape[1]
    skill = np.abs(members - obs[:, None]).mean(axis=1)
    spread = np.abs(members[:, :, None] - members[:, None, :]).sum(axis=(1, 2)) / (2 * m * (m - 1))
    # rel 1e-6: the data pass through float32 normalised units
    assert out.scalars["crps/tas"] == pytest.approx((skill - spread).mean(), rel=1e-6)
    assert out.rank_histogram.shape == (1, m + 1) and out.scalars["members"] == m
    # members whose parameters are not the data's: named, refused
    ens.assign_coords(forcing=("sample", data["forcing"].values[idx] + 1.0)).to_zarr(tmp_path / "bad.zarr")
    with pytest.raises(EvaluationError, match=r"ensemble: sample 0 of .*bad.zarr has forcing="):
        evaluate(pretrained, settings(bound=BoundSettings(enabled=False)), ensemble=tmp_path / "bad.zarr",
                 device="cpu", progress=False)


def test_evaluation_file_holds_the_numbers_and_is_replaced_atomically(exact, tmp_path):
    path = write_evaluation_file(exact, tmp_path / "evaluation.nc", {"mlflow_run_id": "abc"})
    metrics = read_evaluation_metrics(path)
    assert metrics.keys() == exact.scalars.keys()
    for k, v in exact.scalars.items():
        assert metrics[k] == pytest.approx(v, rel=1e-12, nan_ok=True), k
    with xr.open_dataset(path) as ds:
        np.testing.assert_array_equal(ds["index"].values, exact.indices)
        np.testing.assert_allclose(ds["bpd"].values, exact.per_sample["bpd"])
        np.testing.assert_allclose(ds["bound_terms"].values, exact.terms)
        assert ds["crps_map"].dims == ("channel", "y", "x") and ds.attrs["mlflow_run_id"] == "abc"
        assert ds["power_data"].shape == ds["power_samples"].shape
    first = path.stat().st_ino
    write_evaluation_file(exact, path)
    assert path.stat().st_ino != first  # a new file renamed over the old one
    assert [p.name for p in tmp_path.iterdir()] == ["evaluation.nc"]  # no temporary left behind


def test_figures_and_area_weights(exact, tmp_path):
    paths = evaluation_figures(exact, tmp_path)
    assert {p.name for p in paths} == {"samples.png", "power_spectra.png", "bound_terms.png",
                                      "rank_histogram.png", "maps.png"}
    assert all(p.stat().st_size > 5000 for p in paths)
    assert "bound_terms" in to_dataset(exact)

    class Meta:
        spatial_dims = ("lat", "lon")
        spatial_shape = (3, 4)
        coords = {"lat": np.array([-60.0, 0.0, 60.0]), "lon": np.arange(4) * 90.0}

    w = area_weights(Meta, "auto")
    np.testing.assert_allclose(w[:, 0].numpy(), [0.5, 1.0, 0.5], atol=1e-12)
    assert w.shape == (3, 4) and area_weights(Meta, "none") is None


def _ddp_worker(rank: int, world: int, rendezvous: str, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        ev = evaluate(make_pretrained(Path(store), Path(out_dir)), settings(), device="cpu", progress=False)
        torch.save({"scalars": ev.scalars, "per_sample": ev.per_sample, "indices": ev.indices, "terms": ev.terms,
                    "rank_histogram": ev.rank_histogram, "power_samples": ev.power_samples, "crps": ev.maps["crps"],
                    "floor_indices": ev.floor_indices, "power_floor": ev.power_floor},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_equals_one_process(exact, store, tmp_path):
    """Two gloo ranks, each with half the samples: every rank returns the one-process
    result (per-sample rows gathered in split order, metric states summed)."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "rendezvous"), str(store), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        np.testing.assert_array_equal(got["indices"], exact.indices)
        for key, values in exact.per_sample.items():
            np.testing.assert_allclose(got["per_sample"][key], values, rtol=1e-6, atol=1e-9, err_msg=key)
        assert got["scalars"].keys() == exact.scalars.keys()
        for key, value in exact.scalars.items():
            if "seconds" not in key:
                assert got["scalars"][key] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), key
        np.testing.assert_allclose(got["terms"], exact.terms, rtol=1e-6)
        np.testing.assert_allclose(got["rank_histogram"], exact.rank_histogram, rtol=1e-9)
        np.testing.assert_allclose(got["power_samples"], exact.power_samples, rtol=1e-6)
        np.testing.assert_allclose(got["crps"], exact.maps["crps"], rtol=1e-6)
        # the floor: each sample's neighbours the same on every rank, its metrics summed over ranks
        np.testing.assert_array_equal(got["floor_indices"], exact.floor_indices)
        np.testing.assert_allclose(got["power_floor"], exact.power_floor, rtol=1e-9)
        assert any(k.startswith("floor/") for k in got["scalars"])


def test_mlflow_new_run_and_missing_store(exact, tmp_path):
    """A new run is tagged with the run it evaluates and holds eval/<split>/ metrics at the
    checkpoint's step; a store that does not exist is refused, not created empty."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'new.db'}"
    fig = tmp_path / "note.txt"
    fig.write_text("figure")
    run_id = log_to_mlflow(exact, tracking_uri=uri, run_id="f" * 32, new_run=True, experiment_name="evals",
                           step=7, artifacts=[fig], params={"split": "val"})
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.data.tags["scidiff.evaluated_run"] == "f" * 32 and run.info.status == "FINISHED"
    assert run.data.params["split"] == "val"
    assert run.data.metrics["eval/val/bpd"] == exact.scalars["bpd"]
    assert [m.step for m in client.get_metric_history(run_id, "eval/val/crps/tas")] == [7]
    assert [a.path for a in client.list_artifacts(run_id, "eval/val")] == ["eval/val/note.txt",
                                                                           "eval/val/verdict.json"]
    # the noise floor and the verdict: eval/<split>/floor/... metrics, a tag, the table
    assert run.data.metrics["eval/val/floor/crps/tas"] == exact.scalars["floor/crps/tas"]
    assert run.data.tags["verdict"] == exact.verdict.label == run.data.tags["eval/val/verdict"]
    table = json.loads(Path(client.download_artifacts(run_id, "eval/val/verdict.json", str(tmp_path))).read_text())
    assert table["verdict"] == exact.verdict.label and len(table["metrics"]) == len(exact.verdict.metrics) == 10
    missing = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(EvaluationError, match="logger.tracking_uri: the MLflow store .*elsewhere/mlflow.db does not exist"):
        log_to_mlflow(exact, tracking_uri=f"sqlite:///{missing}", run_id="f" * 32, new_run=False,
                      experiment_name="evals", step=7, artifacts=[])
    assert not missing.parent.exists()


class ConvDenoiser(nn.Module):
    """Deterministic eps-predictor for fields of any rank (1-3 spatial dims)."""

    def __init__(self, channels: int, rank: int) -> None:
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[rank]
        self.conv = conv(channels, channels, 3, padding=1)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.1 * torch.randn(p.shape, generator=g))

    def forward(self, x, t, cond=None):
        return self.conv(x)


LAYOUTS = {
    # name: (spatial dims and sizes, variables and units, NaN points)
    "profile_1d": ({"z": 24}, {"theta": "K"}, False),
    "lat_lon_masked": ({"lat": 6, "lon": 10}, {"sst": "degC"}, True),
    "voxels_3d": ({"z": 6, "y": 5, "x": 4}, {"density_C": "angstrom-3", "density_O": "angstrom-3"}, False),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_any_rank_masks_and_area_weights(layout, tmp_path):
    """1-D profiles, a lat/lon grid with missing points (masked, cos-latitude weights) and
    3-D voxels (atom counts): the bound keeps its exact physical-units shift per variable
    and every metric is finite."""
    dims, variables, holes = LAYOUTS[layout]
    rng = np.random.default_rng(2)
    n = 8
    shape = tuple(dims.values())
    coords = {d: np.linspace(-60.0, 60.0, k) if d == "lat" else np.arange(k) * 0.5 for d, k in dims.items()}
    data = {}
    for v, unit in variables.items():
        values = 10.0 + 3.0 * rng.standard_normal((n, *shape))
        if unit == "angstrom-3":
            values = np.abs(values) / 30.0
        if holes:
            values[:, :2, :3] = np.nan  # "land": missing in every sample
        data[v] = (("sample", *dims), values, {"units": unit})
    xr.Dataset(data, coords={"sample": np.arange(n), **coords}).to_zarr(tmp_path / "store.zarr")
    cfg = {"_target_": "scidiff.data.FieldDataModule", "_convert_": "all", "path": str(tmp_path / "store.zarr"),
           "variables": [{"name": v, "transform": "zscore"} for v in variables], "spatial_dims": list(dims),
           "split": {"_target_": "scidiff.data.FractionSplit", "train": 0.5, "val": 0.5, "test": 0.0},
           "mask": "always" if holes else "never", "num_workers": 0}
    dm = FieldDataModule(**{k: v for k, v in cfg.items() if not k.startswith("_") and k != "split"},
                         split=FractionSplit(0.5, 0.5, 0.0))
    dm.setup()
    pre = Pretrained(
        denoiser=ConvDenoiser(len(variables), len(dims)).eval().requires_grad_(False),
        diffusion=GaussianDiffusion(NoiseSchedule.from_name("cosine", num_timesteps=20)), metadata=dm.metadata,
        statistics=dm.statistics, config={"data": cfg}, checkpoint=tmp_path / "x.ckpt", sha256="0" * 64,
        global_step=1, weights="raw", split_indices={k: v.tolist() for k, v in dm.split_indices.items()},
    )
    ev = evaluate(pre, settings(bound=BoundSettings(timestep_batch=20), sampling=SamplingSettings(members=2), sampler=DDIM(steps=2)),
                  device="cpu", progress=False)
    # per dimension, the log-determinant is the mean over variables of -ln(std) over valid points
    train = [xr.open_zarr(tmp_path / "store.zarr")[v].values[:4].astype(np.float64) for v in variables]
    valid = [np.isfinite(t[0]).sum() for t in train]
    shift = sum(k * math.log2(np.nanstd(t)) for k, t in zip(valid, train)) / sum(valid)
    np.testing.assert_allclose(ev.per_sample["bpd"] - ev.per_sample["bpd_model"], shift, atol=1e-9)
    assert ev.info["area_weights"] == ("cos(latitude)" if layout == "lat_lon_masked" else "none")
    assert all(math.isfinite(v) for k, v in ev.scalars.items()), ev.scalars
    assert ev.maps["crps"].shape == (len(variables), *shape)
    if layout == "voxels_3d":
        assert {f"atoms/{v}/peaks_data" for v in variables} <= set(ev.scalars)
    if holes:  # the missing points carry no score
        assert np.isnan(ev.maps["crps"][0, :2, :3]).all() and np.isfinite(ev.maps["crps"][0, 2:]).all()
    figures = {p.name for p in evaluation_figures(ev, tmp_path / "figures")}
    assert {"samples.png", "power_spectra.png", "bound_terms.png", "rank_histogram.png"} <= figures
    assert ("maps.png" in figures) == (len(dims) == 2)


def test_guidance_scale_changes_the_members(pretrained, exact):
    """w = 1 is the conditional model (the default numbers); w = 3 extrapolates away from
    the null condition, so the members and their scores change."""
    only_samples = dict(bound=BoundSettings(enabled=False))
    plain = evaluate(pretrained, settings(**only_samples, sampling=SamplingSettings(members=3), sampler=DDIM(steps=4), guidance=GuidanceSpec(scale=1.0)),
                     device="cpu", progress=False)
    guided = evaluate(pretrained, settings(**only_samples, sampling=SamplingSettings(members=3), sampler=DDIM(steps=4), guidance=GuidanceSpec(scale=3.0)),
                      device="cpu", progress=False)
    assert plain.scalars["crps/tas"] == exact.scalars["crps/tas"]
    assert guided.scalars["crps/tas"] != pytest.approx(plain.scalars["crps/tas"], rel=1e-3)
