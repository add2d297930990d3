"""Two-process DDP on CPU (gloo) through the CLI: identical weights on both ranks, one
MLflow run, one output directory."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.conftest import QUIET, run_train


def test_two_process_ddp_on_cpu(tmp_path, data_dir):
    args = ["experiment=quickstart", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "run_name=ddp",
            "callbacks.periodic_checkpoint.every_n_train_steps=2", *QUIET]
    proc = run_train(args, tmp_path, data_dir, timeout=300, extra_env={"OMP_NUM_THREADS": "1"})
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
