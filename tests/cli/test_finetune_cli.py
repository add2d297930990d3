"""Fine-tuning a trained model as a user runs it: ``scidiff-train experiment=quickstart_finetune
finetune.base=<run>`` with LoRA adapters and in full, and ``experiment=quickstart_controlnet``, in
subprocesses; the adapter file, the MLflow link to the base run, the fine-tuned checkpoint used by
``scidiff-sample``, the base + adapter path from Python and from ``scidiff-sample adapter=`` /
``scidiff-evaluate adapter=``, the ControlNet's frozen base and its ``control_scale``, and the bad
inputs (one line each, nothing written)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.cli.test_bad_inputs import assert_refused
from tests.training.conftest import QUIET, Command, run_commands

pytest.importorskip("peft")

BASE = "outputs/quickstart/tiny"           # the tiny conditional run of the `trained_run` fixture
SHORT = ["trainer.max_steps=6", "trainer.val_check_interval=3", "trainer.limit_val_batches=2",
         "callbacks.periodic_checkpoint.every_n_train_steps=3", *QUIET]


@pytest.fixture(scope="module")
def finetuned(trained_run, data_dir) -> Path:
    """LoRA and full fine-tunings of the tiny quickstart run, in its directory (one MLflow store)."""
    base = trained_run / BASE
    runs = [
        ["experiment=quickstart_finetune", "run_name=lora", "finetune.lora.train=[param_embedding]"],
        ["experiment=quickstart_finetune", "run_name=full", "finetune.method=full"],
        ["experiment=quickstart_finetune", "run_name=prior", "finetune.prior.count=12", "finetune.prior.steps=3",
         "finetune.prior.weight=0.5"],
        ["experiment=quickstart_controlnet", "run_name=control"],
    ]
    run_commands([Command("train", [*args, f"finetune.base={base}", *SHORT], trained_run) for args in runs], data_dir)
    return trained_run


def sample_cli(runs: list[list[str]], cwd: Path, data_dir: Path) -> list[subprocess.CompletedProcess]:
    """``scidiff-sample`` with each argument list (2 members, 4 steps), in one process."""
    fixed = ["members=2", "sampler.steps=4", "progress=false"]
    return run_commands([Command("sample", [*fixed, *args], cwd) for args in runs], data_dir, check=False)


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
    from scidiff.inference.checkpoint import file_sha256, load_pretrained
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
    grid = "params.grid={spectral_index: [2.25], amplitude: [1.0]}"
    # the same model as the base checkpoint with the adapter file: the same members, another identity
    adapter = run / "adapter.safetensors"
    runs = [["checkpoint=outputs/quickstart_finetune/lora", "out=ft.zarr", grid],
            [f"checkpoint={BASE}", f"adapter={adapter}", "out=stacked.zarr", grid]]
    for proc in sample_cli(runs, finetuned, data_dir):
        assert proc.returncode == 0, proc.stderr[-2000:]
    import xarray as xr

    with xr.open_zarr(finetuned / "ft.zarr") as a, xr.open_zarr(finetuned / "stacked.zarr") as b:
        np.testing.assert_allclose(a["field"].values, b["field"].values, rtol=1e-4, atol=1e-4)
        assert json.loads(b.attrs["identity"])["adapter_sha256"] == file_sha256(adapter)
        assert "adapter_sha256" not in json.loads(a.attrs["identity"])


def test_evaluating_base_plus_adapter_never_takes_the_place_of_the_base_evaluation(finetuned, data_dir):
    from mlflow.tracking import MlflowClient

    from scidiff.inference.checkpoint import file_sha256
    from tests.cli.test_evaluate_cli import TINY, run_evaluate

    adapter = finetuned / "outputs/quickstart_finetune/lora/adapter.safetensors"
    client = MlflowClient(f"sqlite:///{finetuned / 'mlflow.db'}")
    base_run = json.loads((finetuned / BASE / "summary.json").read_text())["mlflow_run_id"]
    own = finetuned / BASE / "eval" / "val"      # the base's own evaluation, if another test made one
    before = (client.get_run(base_run).data.metrics, sorted(own.rglob("*")) if own.exists() else None)
    proc = run_evaluate([f"checkpoint={finetuned / BASE}", f"adapter={adapter}", *TINY], finetuned, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = finetuned / BASE / "eval" / f"val-adapter-{file_sha256(adapter)[:8]}"
    assert (out / "evaluation.nc").is_file()
    assert (client.get_run(base_run).data.metrics, sorted(own.rglob("*")) if own.exists() else None) == before
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`scidiff.evaluated_run` = '{base_run}'")   # other tests' too
    mine = [r for r in runs if r.data.params.get("adapter_sha256") == file_sha256(adapter)]
    assert len(mine) == 1 and mine[0].data.metrics   # a new run, tagged with the base's, holding the metrics


def test_controlnet_keeps_the_base_frozen_and_scale_zero_samples_the_base(finetuned, data_dir):
    """The ControlNet run trains only its branch (the base's weights in its checkpoint are the
    base's, bit for bit), samples from the CLI with the new field from a store, and
    ``control_scale=0`` generates exactly the base model's members."""
    import xarray as xr

    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.inference.generation import DDIM, generate
    from scidiff.sampling.conditions import coarsen_factors

    run = finetuned / "outputs/quickstart_controlnet/control"
    summary = json.loads((run / "summary.json").read_text())
    f = summary["finetune"]
    assert f["method"] == "controlnet" and f["controlnet"]["fields"] == ["field@coarse4x4"]
    assert f["controlnet"]["control_channels"] == 1 and 0 < f["trainable_parameters"] < f["base_parameters"]
    ckpt = torch.load(run / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    base_ckpt = torch.load(finetuned / BASE / "checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for prefix in ("denoiser.base.", "ema.model.base."):
        frozen = {k[len(prefix):]: v for k, v in ckpt.items() if k.startswith(prefix)}
        assert frozen and all(torch.equal(v, base_ckpt["ema.model." + k]) for k, v in frozen.items())
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in ckpt.items() if k.startswith("denoiser.zero."))

    model, base = load_pretrained(run), load_pretrained(finetuned / BASE)
    assert model.control_scale == 1.0 and coarsen_factors(model.metadata.field_names[0]) == ("field", (4, 4))
    params, fields = torch.tensor([[2.25, 1.0], [1.5, 1.0]]), torch.randn(2, 1, 16, 16)
    off = load_pretrained(run, control_scale=0.0)
    a, b, c = (generate(m, params, [0, 1], sampler=DDIM(steps=4), fields=fields if m is not base else None)
               for m in (off, base, model))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (c - a).abs().max() > 1e-5

    store = data_dir / "grf_quickstart.zarr"
    args = [f"checkpoint={run}", f"conditions.path={store}", "conditions.isel={sample: [0, 1]}"]
    *ok, bad = sample_cli([[*args, "out=cn.zarr"], [*args, "out=cn0.zarr", "control_scale=0"],
                           [f"checkpoint={BASE}", "control_scale=0.5", "out=bad.zarr",
                            "params.grid={spectral_index: [2.25], amplitude: [1.0]}"]], finetuned, data_dir)
    for proc in ok:
        assert proc.returncode == 0, proc.stderr[-2000:]
    with xr.open_zarr(finetuned / "cn.zarr") as one, xr.open_zarr(finetuned / "cn0.zarr") as zero:
        assert one["field"].shape == (2, 2, 16, 16) and np.isfinite(one["field"].values).all()
        assert json.loads(one.attrs["identity"])["control_scale"] == 1.0
        assert json.loads(zero.attrs["identity"])["control_scale"] == 0.0
        assert np.abs(one["field"].values - zero["field"].values).max() > 1e-5
    assert bad.returncode == 2 and "control_scale: " in bad.stderr and "is not a ControlNet" in bad.stderr
    assert not (finetuned / "bad.zarr").exists()


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
    (["finetune.base={base}", "finetune.method=controlnet"],
     "data.fields: a ControlNet adds condition fields after the base model's"),
    (["experiment=quickstart_controlnet", "finetune.base={base}", "finetune.controlnet.hint_channels=0"],
     "finetune.controlnet.hint_channels: expected a positive integer, got 0"),
    (["experiment=quickstart_controlnet", "finetune.base={base}", "finetune.controlnet.blocks=2"],
     "finetune.controlnet.blocks: only for a DiT"),
    (["experiment=quickstart_controlnet", "finetune.base={base}", "finetune.prior.count=4"],
     "finetune.prior.count: prior preservation is for method=full|lora"),
]


@pytest.mark.parametrize(("args", "expected"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_finetuning_refuses_bad_input(args, expected, finetuned, data_dir, capsys, monkeypatch):
    from scidiff.cli.train import main
    from tests.cli.test_bad_inputs import fill

    args = fill(args, base=finetuned / BASE)
    monkeypatch.chdir(finetuned)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    experiment = [] if any(a.startswith("experiment=") for a in args) else ["experiment=quickstart_finetune"]
    assert_refused(main, [*experiment, "run_name=bad", "trainer.max_steps=2", *args], expected,
                   capsys, monkeypatch, finetuned / "outputs", finetuned / "mlflow.db")


def test_finetuning_on_another_grid_is_refused(finetuned, data_dir, capsys, monkeypatch):
    from scidiff.cli.train import main

    monkeypatch.chdir(finetuned)
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    assert_refused(main, ["experiment=grf", "run_name=bad", "data.path=${oc.env:SCIDIFF_DATA_DIR}/grf_tiny.zarr",
                          f"finetune={{base: {finetuned / BASE}, method: full}}", "trainer.max_steps=2"],
                   "was trained on the grid {'y': 16, 'x': 16}, the data's is {'y': 32, 'x': 32}", capsys, monkeypatch,
                   finetuned / "outputs", finetuned / "mlflow.db")


def test_a_dit_is_finetuned_through_lora_from_the_cli(tmp_path, data_dir):
    """The DiT path end to end: a tiny DiT quickstart run and LoRA on its attention and MLP layers;
    the fine-tuned model loads like any checkpoint, differs from the base and equals base + adapter
    (the DiT's ControlNet is checked bit for bit in tests/nets/test_controlnet.py; its CLI path is the
    UNet's, above)."""
    from scidiff.inference.checkpoint import load_pretrained
    from scidiff.inference.generation import DDIM, generate

    steps = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
             "callbacks.periodic_checkpoint.every_n_train_steps=2", "logger=none", *QUIET]
    base_dir = tmp_path / "outputs/quickstart/dit"
    runs = [["experiment=quickstart", "denoiser=dit_tiny", "run_name=dit", "module.cond_dropout=0.2", *steps],
            ["experiment=quickstart_finetune", f"finetune.base={base_dir}", "run_name=dit_lora",
             "finetune.lora.targets=[attention,mlp]", "optimizer.lr=0.05", *steps]]
    run_commands([Command("train", args, tmp_path) for args in runs], data_dir)
    lora_dir = tmp_path / "outputs/quickstart_finetune/dit_lora"
    f = json.loads((lora_dir / "summary.json").read_text())["finetune"]
    assert f["lora"]["targets"] == ["attention", "mlp"] and f["trainable_parameters"] < f["base_parameters"] / 4
    base, lora = load_pretrained(base_dir), load_pretrained(lora_dir)
    stacked = load_pretrained(base_dir, adapter=lora_dir / "adapter.safetensors")
    params = torch.tensor([[2.25, 1.0]])
    a, b, c = (generate(m, params, [0], sampler=DDIM(steps=3)) for m in (base, lora, stacked))
    assert (a - b).abs().max() > 1e-5
    torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-4)
