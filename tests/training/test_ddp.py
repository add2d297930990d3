"""Two-process DDP and FSDP on CPU (gloo) through the CLI: identical weights on both DDP ranks,
one MLflow run, one output directory; FSDP taking DDP's steps, resuming and sampling."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.conftest import QUIET, run_train


TWO_RANKS = ["experiment=quickstart", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=4",
             "trainer.val_check_interval=2", "callbacks.periodic_checkpoint.every_n_train_steps=2", *QUIET]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data_dir):
    """Four steps of the quickstart on two gloo processes (trainer=ddp): its directory and output."""
    root = tmp_path_factory.mktemp("ddp")
    proc = run_train(["trainer=ddp", "run_name=ddp", *TWO_RANKS], root, data_dir, timeout=300,
                     extra_env={"OMP_NUM_THREADS": "1"})
    return root, proc


def test_two_process_ddp_on_cpu(ddp_run):
    tmp_path, proc = ddp_run
    assert proc.stdout.count("scidiff-train: 4 steps") == 1          # rank 0 alone reports
    run_dirs = [p for p in (tmp_path / "outputs" / "quickstart").iterdir()]
    assert [p.name for p in run_dirs] == ["ddp"]                     # no per-rank directories
    summary = json.loads((run_dirs[0] / "summary.json").read_text())
    assert summary["world_size"] == 2
    sums = summary["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]                     # replicas agree exactly
    ckpt = torch.load(run_dirs[0] / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    flat = torch.cat([v.reshape(-1).double() for k, v in ckpt["state_dict"].items()
                      if k.startswith("denoiser.") and v.is_floating_point()])
    assert torch.isclose(flat.sum(), torch.tensor(sums[0][0], dtype=torch.float64), rtol=1e-9, atol=1e-9)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 1 and runs[0].info.run_id == ckpt["scidiff"]["mlflow_run_id"]
    assert len(client.get_metric_history(runs[0].info.run_id, "val/loss")) == 2   # logged once per validation


def test_two_process_fsdp_shards_trains_like_ddp_resumes_and_samples(ddp_run, tmp_path, data_dir):
    """trainer=fsdp on two gloo processes: the denoiser and its EMA sharded (FSDP2), the same steps as
    DDP (weights, EMA and validation losses to float32 rounding), one full checkpoint that resumes
    and samples like any other."""
    from mlflow.tracking import MlflowClient

    from scidiff.inference import DDIM, generate, load_pretrained, member_seeds

    env = {"OMP_NUM_THREADS": "1"}
    proc = run_train(["trainer=fsdp", "run_name=fsdp", *TWO_RANKS], tmp_path, data_dir, timeout=300, extra_env=env)
    assert proc.stdout.count("scidiff-train: 4 steps") == 1
    run_dir = tmp_path / "outputs" / "quickstart" / "fsdp"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["rank_weight_checksums"] is None   # shards, not replicas
    sharded = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    replicated = torch.load(ddp_run[0] / "outputs/quickstart/ddp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    assert set(sharded) == set(replicated)
    for key, value in replicated.items():   # full tensors, gathered on rank 0
        assert sharded[key].shape == value.shape, key
    # reduce-scatter sums the gradients in another order than all-reduce, and Adam's normalised steps turn
    # that rounding into differences of up to one step where a gradient is near zero:
    # compared over all the weights, the two runs agree to float32 rounding
    flat = [torch.cat([d[k].double().reshape(-1) for k in sorted(replicated) if d[k].is_floating_point()])
            for d in (sharded, replicated)]
    assert float((flat[0] - flat[1]).abs().max()) < 3e-5
    assert float((flat[0] - flat[1]).norm() / flat[1].norm()) < 1e-5   # measured 1.5e-6
    losses = {}
    for name, root in (("fsdp", tmp_path), ("ddp", ddp_run[0])):
        client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
        (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        losses[name] = [m.value for m in client.get_metric_history(run.info.run_id, "val/loss")]
    assert len(losses["fsdp"]) == 2
    torch.testing.assert_close(torch.tensor(losses["fsdp"]), torch.tensor(losses["ddp"]), rtol=1e-5, atol=0)

    again = run_train(["trainer=fsdp", "run_name=fsdp", "resume=auto", *TWO_RANKS, "trainer.max_steps=6"],
                      tmp_path, data_dir, timeout=300, extra_env=env)
    assert "steps 4 -> 6" in again.stdout
    pre = load_pretrained(run_dir)
    assert pre.global_step == 6 and pre.weights == "ema"
    members = generate(pre, torch.tensor([[2.2, 1.0], [2.2, 1.0]]), member_seeds(0, 1, 2)[0].tolist(),
                       sampler=DDIM(steps=4))
    assert members.shape == (2, 1, 16, 16) and torch.isfinite(members).all() and members.std() > 0.1


STAGES = {  # experiment: (its overrides, a validation metric logged once per validation)
    "quickstart_autoencoder": (["autoencoder.model_channels=8", "callbacks.reconstructions=null"], "val/rmse_field"),
    "quickstart_contrastive": (["data.batch_size=16", "contrastive.field.width=4"], "val/top1"),
}


@pytest.mark.parametrize("experiment", list(STAGES))
def test_two_process_ddp_trains_the_other_stages(experiment, tmp_path, data_dir):
    """The autoencoder and contrastive stages under DDP: one run directory and one MLflow run, the
    validation metrics over both ranks' samples (the latent stage is a DiffusionModule, whose DDP
    the test above checks)."""
    from mlflow.tracking import MlflowClient

    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_steps=2",
           "trainer.val_check_interval=1", "trainer.limit_val_batches=2", "callbacks.periodic_checkpoint.every_n_train_steps=2",
           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]
    extra, metric = STAGES[experiment]
    proc = run_train([f"experiment={experiment}", "run_name=r", *extra, *ddp], tmp_path, data_dir, timeout=300,
                     extra_env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.count("scidiff-train: 2 steps") == 1
    assert [p.name for p in (tmp_path / "outputs" / experiment).iterdir()] == ["r"]
    summary = json.loads((tmp_path / f"outputs/{experiment}/r/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_step"] == 2
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
    assert len(runs) == 1 and runs[0].data.params.get("stage") == experiment.split("_")[1]
    assert len(client.get_metric_history(runs[0].info.run_id, metric)) == 2
    if experiment == "quickstart_contrastive":  # retrieval among both ranks' validation samples: 2 x 2 batches of 16
        assert runs[0].data.metrics["val/candidates"] == 64
