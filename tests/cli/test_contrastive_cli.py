"""The contrastive encoder as a user trains and uses it: ``scidiff-train
experiment=quickstart_contrastive`` in a subprocess (its MLflow metrics: the InfoNCE loss falls,
retrieval accuracy among the validation split's conditions), then ``scidiff-evaluate
fidelity.encoder=<run>`` on a trained model; an encoder of other conditions is refused in one line."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from tests.cli.test_evaluate_cli import TINY, run_evaluate
from tests.training.conftest import QUIET, Command, run_commands, run_train


@pytest.fixture(scope="module")
def encoder_run(tmp_path_factory, data_dir) -> Path:
    """An encoder trained 60 steps in its own directory (the shared trained run stays as it is)."""
    cwd = tmp_path_factory.mktemp("contrastive")
    run_train(["experiment=quickstart_contrastive", "run_name=clip", "trainer.max_steps=60",
               "trainer.val_check_interval=30", "trainer.limit_val_batches=4", "trainer.log_every_n_steps=10",
               "callbacks.periodic_checkpoint.every_n_train_steps=30", "data.batch_size=64", *QUIET],
              cwd, data_dir)
    return cwd / "outputs/quickstart_contrastive/clip"


def test_the_encoder_learns_and_logs_retrieval(encoder_run):
    from mlflow.tracking import MlflowClient

    from scidiff.inference.checkpoint import load_contrastive

    summary = json.loads((encoder_run / "summary.json").read_text())
    assert summary["global_step"] == 60
    client = MlflowClient(f"sqlite:///{encoder_run.parents[2] / 'mlflow.db'}")
    metrics = client.get_run(summary["mlflow_run_id"]).data.metrics
    loss = {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], "train/loss")}
    assert loss[max(loss)] < 0.95 * math.log(64)          # below chance, log(batch)
    assert metrics["val/candidates"] > 100 and 0 <= metrics["val/top1"] <= metrics["val/top5"] <= 1
    enc = load_contrastive(encoder_run)
    assert enc.metadata.param_names == ("spectral_index", "amplitude")


def test_evaluate_reports_the_conditional_fidelity_beside_the_real_fields(encoder_run, trained_run, data_dir, tmp_path):
    model = trained_run / "outputs/quickstart/tiny"
    proc = run_evaluate([f"checkpoint={model}", f"fidelity.encoder={encoder_run}", f"out={tmp_path / 'ev'}",
                         "logger.enabled=false", *TINY], tmp_path, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    # 3 samples: chance 1/3, and each score with its standard error over them
    assert re.search(r"fidelity top-1 [\d.]+ ± [\d.]+ \(real fields [\d.]+ ± [\d.]+, chance 0.333\)", line), line
    # an encoder is refused when the model's conditions differ: here a diffusion checkpoint is no encoder
    proc = run_evaluate([f"checkpoint={model}", f"fidelity.encoder={model}", f"out={tmp_path / 'bad'}",
                         "logger.enabled=false", *TINY],
                        tmp_path, data_dir)
    assert proc.returncode == 2 and "fidelity.encoder: " in proc.stderr and "is not a contrastive encoder" in proc.stderr
    assert not (tmp_path / "bad" / "evaluation.nc").exists()


def test_fidelity_guidance_script_scores_the_model_beside_real_fields_and_exact_draws(encoder_run, trained_run,
                                                                                     data_dir, tmp_path):
    """``workflows/fidelity_guidance.py`` (the conditional-fidelity benchmark page) with the encoder
    already trained (it is not retrained) at its cheapest settings: every score with its standard
    error, the generator's exact draws as the precise floor."""
    import os

    from tests.forked import run_forked

    root = Path(__file__).resolve().parents[2]
    page = tmp_path / "fidelity.md"
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONWARNINGS": "ignore"}
    proc = run_forked(root / "workflows/fidelity_guidance.py", [
        str(trained_run / "outputs/quickstart/tiny"), "--data-path", str(data_dir / "grf_quickstart.zarr"),
        "--out", str(encoder_run.parents[2]), "--samples", "4", "--members", "2", "--scales", "0", "1",
        "--candidates", "4", "--page", str(page)], tmp_path, env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert json.loads((encoder_run / "summary.json").read_text())["global_step"] == 60   # not retrained
    text = page.read_text()
    assert re.search(r"\| real held-out fields \(1 per condition, 4 conditions\) \| [\d.]+ ± [\d.]+ \|", text), text
    assert re.search(r"\| exact draws of the generator \(2 per condition\) \| [\d.]+ ± [\d.]+ \|", text), text
    for scale in (0, 1):
        assert re.search(rf"\| model, guidance {scale} \| [\d.]+ ± [\d.]+ \| [\d.]+ ± [\d.]+ \| -?[\d.]+ ± [\d.]+ \| "
                         r"[\d.]+ \| [\d.]+ \|", text), text


def test_embeddings_of_the_encoder_condition_a_diffusion_model(encoder_run, data_dir, tmp_path):
    """scidiff-embed writes the encoder's field embeddings into a copy of the store; a diffusion
    model trains on them (data.embedding) and samples from a condition store holding them."""
    import numpy as np
    import xarray as xr

    out = tmp_path / "grf_clip.zarr"
    embed = [f"encoder={encoder_run}", f"input={data_dir / 'grf_quickstart.zarr'}", f"out={out}"]
    first, again, trained, sampled = run_commands([
        Command("embed", embed, tmp_path),
        Command("embed", embed, tmp_path),   # once more: refused, the store is there
        Command("train", ["experiment=quickstart", f"data.path={out}", "data.params=[]",
                          "data.embedding={name: clip_embedding, transform: none}", "run_name=unclip",
                          "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
                          "callbacks.periodic_checkpoint.every_n_train_steps=4", *QUIET], tmp_path),
        Command("sample", ["checkpoint=outputs/quickstart/unclip", f"conditions.path={out}",
                           "conditions.isel={sample: [0, 1]}", "members=2", "sampler.steps=3", "out=v.zarr",
                           "progress=false"], tmp_path),
    ], data_dir, check=False)
    assert first.returncode == 0, first.stderr[-2000:]
    with xr.open_zarr(out) as ds, xr.open_zarr(data_dir / "grf_quickstart.zarr") as source:
        emb = ds["clip_embedding"]
        assert emb.dims == ("sample", "clip_embedding_component") and emb.shape == (4096, 64)
        np.testing.assert_allclose(np.linalg.norm(emb.values, axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(ds["field"].values, source["field"].values)   # the input, copied
        assert emb.attrs["encoder_sha256"] and emb.attrs["embedded"] == "fields"
    assert again.returncode == 2 and "out: " in again.stderr and "already exists" in again.stderr
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    with xr.open_zarr(tmp_path / "v.zarr") as members:
        assert members["field"].shape == (2, 2, 16, 16) and np.isfinite(members["field"].values).all()
