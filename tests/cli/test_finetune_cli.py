"""Fine-tuning a trained model as a user runs it: ``scidiff-train experiment=quickstart_finetune
finetune.base=<run>`` with LoRA adapters and in full, in subprocesses; the adapter file, the MLflow
link to the base run, the fine-tuned checkpoint used by ``scidiff-sample``, the base + adapter
path from Python, and the bad inputs (one line each, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.cli.test_bad_inputs import assert_refused
from tests.training.conftest import QUIET, run_train

pytest.importorskip("peft")

BASE = "outputs/quickstart/tiny"           # the tiny conditional run of the `trained_run` fixture
SHORT = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
         "callbacks.periodic_checkpoint.every_n_train_steps=3", *QUIET]


@pytest.fixture(scope="module")
def finetuned(trained_run, data_dir) -> Path:
    """LoRA and full fine-tunings of the tiny quickstart run, in its directory (one MLflow store)."""
    base = trained_run / BASE
    run_train(["experiment=quickstart_finetune", f"finetune.base={base}", "run_name=lora", *SHORT,
               "finetune.lora.train=[param_embedding]"], trained_run, data_dir)
    run_train(["experiment=quickstart_finetune", f"finetune.base={base}", "run_name=full", "finetune.method=full",
               *SHORT], trained_run, data_dir)
    run_train(["experiment=quickstart_finetune", f"finetune.base={base}", "run_name=prior", "finetune.prior.count=12",
               "finetune.prior.steps=3", "finetune.prior.weight=0.5", *SHORT], trained_run, data_dir)
    return trained_run


def test_prior_preservation_generates_cached_base_fields_and_adds_their_loss(finetuned):
    """The prior fields are the base model's samples at conditions of its training split, cached
    in the run; the logged loss is instance + weight * prior."""
    from mlflow.tracking import MlflowClient

    from scidiff.inference.checkpoint import load_pretrained

    run = finetuned / "outputs/quickstart_finetune/prior"
    prior = torch.load(run / "prior_fields.pt", weights_only=True)
    assert prior["x"].shape == (12, 1, 16, 16) and prior["params"].shape == (12, 2)
    assert torch.isfinite(prior["x"]).all() and 0.05 < float(prior["x"].std()) < 3.0  # a 30-step base: not degenerate
    base = load_pretrained(finetuned / BASE)
    n = base.statistics.param_transform().inverse(prior["params"].double())[:, 0]   # spectral index
    assert ((n < 2.0) | (n > 2.5)).all()                  # the base's training regime, not the new one
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finetune"]["prior"] == {"count": 12, "weight": 0.5}
    client = MlflowClient(f"sqlite:///{finetuned / 'mlflow.db'}")
    history = {k: {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], k)}
               for k in ("train/loss", "train/instance_loss", "train/prior_loss")}
    step = max(history["train/loss"])
    assert history["train/loss"][step] == pytest.approx(
        history["train/instance_loss"][step] + 0.5 * history["train/prior_loss"][step], rel=1e-5)


def test_lora_writes_a_small_adapter_and_links_the_base_run(finetuned):
    from mlflow.tracking import MlflowClient

    from scidiff.inference.checkpoint import file_sha256, read_adapter

    run = finetuned / "outputs/quickstart_finetune/lora"
    summary = json.loads((run / "summary.json").read_text())
    f = summary["finetune"]
    base_ckpt = finetuned / BASE / "checkpoints/last.ckpt"
    assert f["method"] == "lora" and f["base"]["sha256"] == file_sha256(base_ckpt)
    assert 0 < f["trainable_parameters"] < f["base_parameters"] / 2
    assert f["adapter"]["bytes"] == (run / "adapter.safetensors").stat().st_size
    assert f["adapter"]["fraction_of_base"] < 0.5
    weights, meta = read_adapter(run / "adapter.safetensors")
    assert meta["base_sha256"] == f["base"]["sha256"] and meta["lora"]["train"] == ["param_embedding"]
    assert any("lora_A" in k for k in weights) and any(k.startswith("cond_embed.params") for k in weights)
    client = MlflowClient(f"sqlite:///{finetuned / 'mlflow.db'}")
    tags = client.get_run(summary["mlflow_run_id"]).data.tags
    base_run = json.loads((finetuned / BASE / "summary.json").read_text())["mlflow_run_id"]
    assert tags["scidiff.base_run_id"] == base_run and tags["scidiff.base_checkpoint_sha256"] == f["base"]["sha256"]
    assert "adapter.safetensors" in {a.path for a in client.list_artifacts(summary["mlflow_run_id"])}
    full = json.loads((finetuned / "outputs/quickstart_finetune/full/summary.json").read_text())["finetune"]
    assert full["trainable_parameters"] == full["base_parameters"] and "adapter" not in full


def test_the_finetuned_model_samples_like_base_plus_adapter_and_differs_from_the_base(finetuned, data_dir):
    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.inference.generation import DDIM, generate

    run = finetuned / "outputs/quickstart_finetune/lora"
    params = torch.tensor([[2.25, 1.0], [2.25, 1.5]])
    merged = load_pretrained(run)
    stacked = load_pretrained(finetuned / BASE, adapter=run / "adapter.safetensors")
    base = load_pretrained(finetuned / BASE)
    assert merged.config["denoiser"] == base.config["denoiser"]
    for part in ("x", "params", "fields"):  # normalised exactly as the base model
        assert getattr(merged.statistics, part) == getattr(base.statistics, part)
    a, b, c = (generate(m, params, [0, 1], sampler=DDIM(steps=5)) for m in (merged, stacked, base))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-4
    env = {**os.environ, "SCIDIFF_DATA_DIR": str(data_dir), "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "scidiff.cli.sample", "checkpoint=outputs/quickstart_finetune/lora",
                           "out=ft.zarr", "members=2", "params.grid={spectral_index: [2.25], amplitude: [1.0]}",
                           "sampler.steps=4"], cwd=finetuned, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_an_adapter_of_another_base_is_refused_naming_both(finetuned, trained_run):
    from scidiff.inference.checkpoint import CheckpointError, load_pretrained

    other = trained_run / "outputs/quickstart_finetune/full"        # not the base the adapter was trained on
    with pytest.raises(CheckpointError, match=r"adapter: .*adapter.safetensors was trained on the base checkpoint "
                                              r"[0-9a-f]{12}\.\.\., not .*full"):
        load_pretrained(other, adapter=finetuned / "outputs/quickstart_finetune/lora/adapter.safetensors")
    with pytest.raises(CheckpointError, match="adapter: .*missing.safetensors does not exist"):
        load_pretrained(other, adapter=trained_run / "missing.safetensors")


CASES = [
    ([], "finetune.base: required"),
    (["finetune.base=/nonexistent/run"], "finetune.base: /nonexistent/run does not exist"),
    (["finetune.base={base}", "finetune.lora.targets=[mlp]"], "finetune.lora.targets: ['mlp'] match no layer of the "
                                                              "UNet"),
    (["finetune.base={base}", "finetune.lora.rank=0"], "finetune.lora.rank: expected a positive integer"),
    (["finetune.base={base}", "+finetune.lora.ranks=4"], "finetune.lora.ranks: unknown key"),
    (["finetune.base={base}", "finetune.prior.count=-1"], "finetune.prior.count: expected a positive integer"),
    (["finetune.base={base}", "finetune.prior.count=4", "finetune.prior.data_path=/nonexistent.zarr"],
     "finetune.prior.data_path: the base model's data store /nonexistent.zarr does not exist"),
]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_finetuning_refuses_bad_input(args, expected, finetuned, data_dir, capsys, monkeypatch):
    from scidiff.cli.train import main
    from tests.cli.test_bad_inputs import fill

    args = fill(args, base=finetuned / BASE)
    monkeypatch.chdir(finetuned)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    assert_refused(main, ["experiment=quickstart_finetune", "run_name=bad", "trainer.max_steps=2", *args], expected,
                   capsys, monkeypatch, finetuned / "outputs", finetuned / "mlflow.db")


def test_finetuning_on_another_grid_is_refused(finetuned, data_dir, capsys, monkeypatch):
    from scidiff.cli.train import main

    monkeypatch.chdir(finetuned)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    assert_refused(main, ["experiment=grf", "run_name=bad", "data.path=${oc.env:SCIDIFF_DATA_DIR}/grf_tiny.zarr",
                          f"finetune={{base: {finetuned / BASE}, method: full}}", "trainer.max_steps=2"],
                   "was trained on the grid {'y': 16, 'x': 16}, the data's is {'y': 32, 'x': 32}", capsys, monkeypatch,
                   finetuned / "outputs", finetuned / "mlflow.db")
