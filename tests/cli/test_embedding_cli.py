"""Conditioning on an embedding (a vector per sample) end to end, as a user runs it: a store with a
``(sample, component)`` variable, ``scidiff-train data.embedding=...``, then ``scidiff-sample`` with
the embedding from a condition store, ``scidiff-evaluate`` and ``scidiff-invert``, in subprocesses;
the bad inputs (a wrong width, a missing embedding, one given to a model without) are one line each."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from tests.cli.test_bad_inputs import assert_refused
from tests.training.conftest import QUIET, Command, run_commands, run_train

EMBEDDING = "data.embedding={name: summary, transform: zscore}"


def _store(ds: xr.Dataset, path: Path) -> Path:
    for v in ds.variables.values():
        v.encoding = {}
    ds.to_zarr(path, mode="w")
    return path


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, data_dir) -> Path:
    """The quickstart store's first 512 fields with ``summary`` (sample, component): the spectral
    index, log amplitude and a constant, and a model conditioned on it alone (no parameters)."""
    d = tmp_path_factory.mktemp("embedding")
    ds = xr.open_zarr(data_dir / "grf_quickstart.zarr").isel(sample=slice(0, 512)).load()
    summary = np.stack([ds["spectral_index"].values, np.log(ds["amplitude"].values),
                        np.full(ds.sizes["sample"], 3.0)], axis=1).astype(np.float32)
    ds["summary"] = (("sample", "component"), summary, {"long_name": "summary vector of the field"})
    ds = ds.assign_coords(component=["n", "log_amplitude", "constant"])
    _store(ds, d / "grf_summary.zarr")
    run_train(["experiment=quickstart", f"data.path={d / 'grf_summary.zarr'}", "data.params=[]", EMBEDDING,
               "run_name=emb", "module.cond_dropout=0.2", "trainer.max_steps=20", "trainer.val_check_interval=10",
               "trainer.limit_val_batches=2", "callbacks.periodic_checkpoint.every_n_train_steps=10",
               "optimizer.lr=5e-3", *QUIET], d, data_dir)
    return d


def test_the_checkpoint_takes_the_normalised_embedding(embedded):
    from scidiff.inference.checkpoint import load_pretrained

    model = load_pretrained(embedded / "outputs/quickstart/emb")
    meta, stats = model.metadata, model.statistics
    assert meta.embedding_names == ("summary[component=n]", "summary[component=log_amplitude]",
                                    "summary[component=constant]") and meta.param_names == ()
    assert model.denoiser.cond_embed.embedding_dim == 3
    n, log_a, const = stats.embedding
    ds = xr.open_zarr(embedded / "grf_summary.zarr")
    train = np.asarray(model.split_indices["train"])
    assert n.scaling == "zscore" and n.mean == pytest.approx(float(ds["spectral_index"].values[train].mean()), rel=1e-5)
    assert (const.scaling, const.fixed_shift, const.fixed_scale) == ("fixed", 3.0, 1.0)  # constant: only centred
    # the embedding steers the samples: the same seeds at two embeddings differ, at the same one they agree
    from scidiff.inference.generation import DDIM, generate

    e = stats.embedding_transform()(torch.tensor([[1.5, 0.0, 3.0], [3.2, 0.5, 3.0]]))
    a = generate(model, None, [0, 1], sampler=DDIM(steps=4), embedding=e)
    b = generate(model, None, [0, 1], sampler=DDIM(steps=4), embedding=e.flip(0))
    assert (a - b).abs().max() > 1e-4
    torch.testing.assert_close(generate(model, None, [0, 1], sampler=DDIM(steps=4), embedding=e), a)


def test_sample_evaluate_and_invert_read_the_embedding(embedded, data_dir):
    run = "outputs/quickstart/emb"
    ds = xr.open_zarr(embedded / "grf_summary.zarr").isel(sample=slice(0, 3))
    _store(ds[["field", "summary"]], embedded / "invert_in.zarr")
    _store(ds[["field"]], embedded / "invert_without.zarr")
    sampled, evaluated, inverted, refused = run_commands([
        Command("sample", [f"checkpoint={run}", "conditions.path=grf_summary.zarr",
                           "conditions.isel={sample: [0, 1, 2]}", "members=2", "sampler.steps=3", "out=emb.zarr",
                           "progress=false"], embedded),
        Command("evaluate", [f"checkpoint={run}", "split=val", "max_samples=3", "batch_size=3",
                             "bound.estimator=importance", "bound.num_terms=4", "sampler.steps=3", "sampling.members=3",
                             "progress=false", "logger.enabled=false"], embedded),
        Command("invert", [f"checkpoint={run}", "input=invert_in.zarr", "out=inv.zarr", "sampler.steps=3",
                           "progress=false"], embedded),
        Command("invert", [f"checkpoint={run}", "input=invert_without.zarr", "out=inv2.zarr"], embedded),
    ], data_dir, check=False)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with xr.open_zarr(embedded / "emb.zarr") as ens:
        assert ens["field"].shape == (3, 2, 16, 16) and np.isfinite(ens["field"].values).all()
        assert "conditions" in json.loads(ens.attrs["identity"])
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (embedded / run / "eval/val/evaluation.nc").is_file() and "CRPS field" in evaluated.stdout.splitlines()[-1]
    assert inverted.returncode == 0, inverted.stderr[-2000:]
    assert refused.returncode == 2 and "lacks the variable 'summary'" in refused.stderr


def test_bad_embeddings_are_refused_in_one_line(embedded, trained_run, data_dir, capsys, monkeypatch):
    from scidiff.cli.sample import main as sample
    from scidiff.cli.train import main as train

    ds = xr.open_zarr(embedded / "grf_summary.zarr").isel(sample=slice(0, 4), component=[0, 1]).load()
    _store(ds[["summary"]], embedded / "narrow.zarr")
    monkeypatch.chdir(embedded)
    run = embedded / "outputs/quickstart/emb"
    base = ["members=1", "out=bad.zarr"]
    assert_refused(sample, [f"checkpoint={run}", "conditions.path=narrow.zarr", *base],
                   "summary (the checkpoint's embedding) has 2 components along 'component'; the checkpoint takes 3",
                   capsys, monkeypatch, embedded)
    assert_refused(sample, [f"checkpoint={run}", *base], "conditions.path: the checkpoint", capsys, monkeypatch, embedded)
    assert_refused(sample, [f"checkpoint={run}", *base], "is conditioned on an embedding of 3 components",
                   capsys, monkeypatch, embedded)
    assert_refused(sample, [f"checkpoint={trained_run / 'outputs/quickstart/tiny'}", "conditions.path=narrow.zarr",
                            "conditions.embedding=summary", *base],
                   "conditions.embedding: the checkpoint", capsys, monkeypatch, embedded)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    assert_refused(train, ["experiment=quickstart", "run_name=bad", "data.embedding=field", "trainer.max_steps=1"],
                   "embedding 'field' has dims ('sample', 'y', 'x'): an embedding needs the sample dims", capsys,
                   monkeypatch, embedded / "outputs")
