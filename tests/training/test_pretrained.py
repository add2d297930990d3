"""load_pretrained: a checkpoint (path, run dir or MLflow run id) -> model in physical units."""

from __future__ import annotations

import json

import pytest
import torch

from scidiff.inference.checkpoint import CheckpointError, load_pretrained


def test_load_by_path_dir_and_run_id(trained_run):
    run = trained_run / "outputs" / "quickstart" / "tiny"
    by_dir = load_pretrained(run)
    assert by_dir.weights == "ema"
    assert by_dir.param_names == ("spectral_index", "amplitude")
    assert by_dir.sample_shape == (1, 16, 16)
    lo, hi = by_dir.param_ranges()["amplitude"]
    assert 0.4 < lo < hi < 2.1  # log-uniform in [0.5, 2] in physical units
    summary = json.loads((run / "summary.json").read_text())
    by_id = load_pretrained(summary["mlflow_run_id"], tracking_uri=f"sqlite:///{trained_run / 'mlflow.db'}")
    assert by_id.sha256 == by_dir.sha256
    x = torch.randn(2, 1, 16, 16)
    t = torch.tensor([0, 999])
    cond = None
    assert torch.equal(by_dir.denoiser(x, t, cond), by_id.denoiser(x, t, cond))
    # units round trip
    phys = by_dir.to_physical(x)
    torch.testing.assert_close(by_dir.to_model(phys), x, atol=1e-5, rtol=1e-5)


def test_unknown_store_is_not_created(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(CheckpointError, match="no MLflow store mlflow.db"):
        load_pretrained("runs:/0123456789abcdef0123456789abcdef")
    assert not (tmp_path / "mlflow.db").exists()


def test_bad_checkpoints_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        load_pretrained(tmp_path / "missing.ckpt")
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.ckpt is not a readable"):
        load_pretrained(junk)
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, plain)
    with pytest.raises(CheckpointError, match="plain.ckpt was not written by scidiff-train"):
        load_pretrained(plain)


def test_a_checkpoint_from_before_norm_group_channels_loads_and_resumes_as_trained(data_dir, tmp_path):
    """A checkpoint whose config has neither ``denoiser.norm_group_channels`` nor ``denoiser.norm``
    (written before the keys existed) was trained with GroupNorm's old rule, gcd(channels, 32)
    groups: it loads with ``norm_group_channels: 1`` (which rebuilds that rule), and a run resumed
    from it keeps it whatever today's config says; today's GroupNorm checkpoints keep their 4."""
    import math

    from omegaconf import OmegaConf

    from scidiff.cli.train import keep_trained_networks
    from scidiff.training import safe_torch_load
    from tests.training.conftest import TINY_CONDITIONAL, run_train

    # the quickstart's UNet has no normalisation since 2026-12-01: a GroupNorm run, as they all were
    run_train([*TINY_CONDITIONAL, "denoiser.norm=group", "run_name=gn", "trainer.max_steps=2",
               "trainer.val_check_interval=2", "callbacks.periodic_checkpoint.every_n_train_steps=2"],
              tmp_path, data_dir)
    run = tmp_path / "outputs/quickstart/gn"
    ckpt = safe_torch_load(run / "checkpoints/last.ckpt")
    assert ckpt["scidiff"]["config"]["denoiser"]["norm_group_channels"] == 4
    old = tmp_path / "old.ckpt"
    del ckpt["scidiff"]["config"]["denoiser"]["norm_group_channels"]
    del ckpt["scidiff"]["config"]["denoiser"]["norm"]
    torch.save(ckpt, old)
    model = load_pretrained(old)
    assert model.config["denoiser"]["norm_group_channels"] == 1
    norms = [m for m in model.denoiser.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_groups == math.gcd(m.num_channels, 32) for m in norms)
    assert load_pretrained(run).denoiser.out_norm.num_groups == 4

    cfg = OmegaConf.create({"denoiser": {"_target_": "scidiff.nets.UNet", "norm_group_channels": 4},
                            "autoencoder": None})
    keep_trained_networks(cfg, ckpt)
    assert cfg.denoiser.norm_group_channels == 1
    keep_trained_networks(cfg, {})   # no checkpoint (a new run): the config is left as it is
    assert cfg.denoiser.norm_group_channels == 1
    # the UNet's norm (a checkpoint without the key was trained with GroupNorm): kept on resume
    cfg = OmegaConf.create({"denoiser": {"_target_": "scidiff.nets.UNet", "norm_group_channels": 4, "norm": "none"},
                            "autoencoder": None})
    keep_trained_networks(cfg, ckpt)
    assert cfg.denoiser.norm == "group"
    ckpt["scidiff"]["config"]["denoiser"]["norm"] = "none"
    cfg.denoiser.norm = "group"
    keep_trained_networks(cfg, ckpt)
    assert cfg.denoiser.norm == "none"
