"""Every config composes and instantiates (data, denoiser, diffusion, module, trainer, logger)."""

from __future__ import annotations

from pathlib import Path

import hydra.utils as hu
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from scidiff.cli.config_check import check_train_config
from scidiff.cli.train import CONFIG_DIR
from scidiff.diffusion import GaussianDiffusion
from scidiff.training import DiffusionModule


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _compose(overrides: list[str], run_dir: Path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.run_dir = str(run_dir)
    return cfg


# the two stages of latent diffusion: test_autoencoder_and_latent_experiments_compose below; the contrastive
# stage: test_contrastive_experiment_composes; a fine-tuning or a ControlNet needs a trained base
# (tests/cli/test_finetune_cli.py)
FIELD_EXPERIMENTS = [e for e in _options("experiment")
                     if not e.endswith(("_autoencoder", "_latent", "_finetune", "_controlnet", "_contrastive"))]
CASES = (
    [[f"experiment={e}"] for e in FIELD_EXPERIMENTS]
    + [[f"diffusion={d}", "experiment=quickstart"] for d in _options("diffusion")]
    + [[f"trainer={t}", "experiment=quickstart"] for t in _options("trainer")]
    + [[f"logger={g}", "experiment=quickstart"] for g in _options("logger")]
    + [[f"callbacks={c}", "experiment=quickstart"] for c in _options("callbacks")]
    + [[f"denoiser={d}", "experiment=quickstart"] for d in ("unet_tiny", "dit_tiny")]
    + [[f"experiment={e}", "denoiser=dit"] for e in FIELD_EXPERIMENTS]   # boundary is the UNet's only
)


@pytest.mark.parametrize("overrides", CASES, ids=lambda o: o[0])
def test_config_composes_checks_and_instantiates(overrides, tmp_path, data_dir, monkeypatch):
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    cfg = _compose(overrides, tmp_path / "run")
    check_train_config(cfg)
    # instantiate everything that needs no data store and no process group
    if cfg.diffusion.get("sigma_data") == "auto":  # scidiff-train resolves it from the data (test_train_cli)
        with open_dict(cfg):
            cfg.diffusion.sigma_data = 1.0
    diffusion = hu.instantiate(cfg.diffusion)
    assert isinstance(diffusion, GaussianDiffusion) and diffusion.num_timesteps == 1000
    denoiser = hu.instantiate(cfg.denoiser, in_channels=1, dims=2, num_params=0, field_channels=0)
    module = hu.instantiate(cfg.module)(denoiser=denoiser, diffusion=diffusion,
                                        optimizer=hu.instantiate(cfg.optimizer),
                                        lr_scheduler=hu.instantiate(cfg.lr_scheduler))
    assert isinstance(module, DiffusionModule)
    for c in (cfg.callbacks or {}).values():
        if c is not None:
            hu.instantiate(c)
    if cfg.logger is not None:
        assert "_target_" in cfg.logger
    if "strategy" not in cfg.trainer or isinstance(cfg.trainer.strategy, str):
        if cfg.trainer.accelerator in ("cpu", "auto") and torch.get_num_threads() > 0:
            trainer = hu.instantiate(cfg.trainer, logger=False, callbacks=[])
            assert trainer.max_steps == cfg.trainer.max_steps


def test_contrastive_experiment_composes(tmp_path, data_dir, monkeypatch):
    """experiment=quickstart_contrastive checks and instantiates its encoders and module; the
    ControlNet experiments ask, in one line, for their base."""
    from scidiff.cli.errors import ConfigError
    from scidiff.nets.contrastive import ContrastiveEncoder
    from scidiff.training import ContrastiveModule

    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    cfg = _compose(["experiment=quickstart_contrastive"], tmp_path / "c")
    check_train_config(cfg)
    assert cfg.stage == "contrastive" and cfg.get("denoiser") is None
    encoder = ContrastiveEncoder(hu.instantiate(cfg.contrastive.field, in_channels=1, dims=2),
                                 hu.instantiate(cfg.contrastive.condition, num_params=2, embedding_dim=0))
    module = hu.instantiate(cfg.module)(encoder=encoder, optimizer=hu.instantiate(cfg.optimizer),
                                        lr_scheduler=hu.instantiate(cfg.lr_scheduler))
    assert isinstance(module, ContrastiveModule)
    for experiment in ("quickstart_controlnet", "climate_controlnet"):
        with pytest.raises(ConfigError, match="finetune.base: required"):
            check_train_config(_compose([f"experiment={experiment}"], tmp_path / experiment))
    descriptors = _compose(["experiment=voxels_descriptors"], tmp_path / "v")   # voxels given an embedding
    assert descriptors.data.params == [] and descriptors.data.embedding.name == "descriptors"


def test_ddp_config_composes_with_dit(tmp_path, data_dir, monkeypatch):
    """The issue's example composes: experiment=quickstart denoiser=dit trainer=ddp trainer.devices=2."""
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    cfg = _compose(["experiment=quickstart", "denoiser=dit", "trainer=ddp", "trainer.devices=2"], tmp_path)
    check_train_config(cfg)
    assert cfg.trainer.devices == 2 and cfg.denoiser._target_ == "scidiff.nets.DiT"
    assert cfg.trainer.strategy._target_.endswith("DDPStrategy")


@pytest.mark.parametrize("base", sorted(e[: -len("_latent")] for e in _options("experiment") if e.endswith("_latent")))
def test_autoencoder_and_latent_experiments_compose(base, tmp_path, data_dir, monkeypatch):
    """<base>_autoencoder checks and instantiates its autoencoder, module and callbacks;
    <base>_latent composes with its denoiser and asks, in one line, for its autoencoder run
    (scidiff-train runs both stages: tests/cli/test_train_cli.py, tests/cli/test_latent_cli.py)."""
    from scidiff.cli.errors import ConfigError
    from scidiff.training import AutoencoderModule

    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    monkeypatch.chdir(tmp_path)
    cfg = _compose([f"experiment={base}_autoencoder"], tmp_path / "ae")
    check_train_config(cfg)
    assert cfg.stage == "autoencoder" and cfg.get("denoiser") is None and cfg.get("diffusion") is None
    autoencoder = hu.instantiate(cfg.autoencoder, in_channels=2, dims=len(cfg.data.spatial_dims))
    module = hu.instantiate(cfg.module)(autoencoder=autoencoder, optimizer=hu.instantiate(cfg.optimizer),
                                        lr_scheduler=hu.instantiate(cfg.lr_scheduler))
    assert isinstance(module, AutoencoderModule)
    for c in cfg.callbacks.values():
        if c is not None:
            hu.instantiate(c)
    latent = _compose([f"experiment={base}_latent"], tmp_path / "lat")
    with pytest.raises(ConfigError, match="latent.autoencoder: required"):
        check_train_config(latent)
    assert latent.stage == "diffusion" and latent.task_name == f"{base}_latent"
    denoiser = hu.instantiate(latent.denoiser, in_channels=autoencoder.latent_channels,
                              dims=len(latent.data.spatial_dims), num_params=0, field_channels=0)
    assert isinstance(hu.instantiate(latent.module)(denoiser=denoiser, diffusion=hu.instantiate(latent.diffusion),
                                                    optimizer=hu.instantiate(latent.optimizer)), DiffusionModule)


@pytest.mark.parametrize(("overrides", "match"), [
    (["trainer.precision=bf16-true"], r"trainer\.precision: bf16-true stores the weights and their EMA in half "
                                      r"precision.*use trainer\.precision=bf16-mixed"),
    (["module.compile=fastest"], r"module\.compile: expected true, false or a torch.compile mode"),
    (["module.channels_last=true", "denoiser.dims=1"], r"module\.channels_last: fields of spatial rank 1"),
    (["trainer=fsdp", "module.channels_last=true"], r"module\.channels_last: FSDP2 cannot change the memory format"),
    (["trainer=fsdp", "trainer.devices=auto"], r"trainer\.strategy\.devices: expected int, got str 'auto'"),
])
def test_fast_path_settings_are_checked_before_training(overrides, match, tmp_path, data_dir, monkeypatch):
    from scidiff.cli.errors import ConfigError

    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    with pytest.raises(ConfigError, match=match):
        check_train_config(_compose(["experiment=quickstart", *overrides], tmp_path))


def test_gpu_fast_paths_compose(tmp_path, data_dir, monkeypatch):
    """The GPU recipe of the training guide composes, checks and builds its module."""
    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    cfg = _compose(["experiment=quickstart", "trainer=gpu", "module.compile=max-autotune", "module.channels_last=true",
                    "denoiser.checkpoint=true"], tmp_path)
    check_train_config(cfg)
    assert cfg.trainer.precision == "bf16-mixed"
    net = hu.instantiate(cfg.denoiser)
    module = hu.instantiate(cfg.module)(denoiser=net, diffusion=hu.instantiate(cfg.diffusion),
                                        optimizer=hu.instantiate(cfg.optimizer))
    assert module.execution.compile == "max-autotune" and module.execution.channels_last and net.checkpoint


def test_fsdp_preset_is_sharding_over_every_rank(tmp_path, data_dir, monkeypatch):
    """trainer=fsdp builds Lightning's ModelParallelStrategy as FSDP alone: one data-parallel dimension
    of devices x nodes ranks, no tensor parallelism, one checkpoint file; other stages are refused."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    from scidiff.cli.errors import ConfigError

    monkeypatch.setenv("SCIDIFF_DATA_DIR", str(data_dir))
    cfg = _compose(["experiment=quickstart", "trainer=fsdp", "trainer.devices=4", "trainer.num_nodes=2"], tmp_path)
    check_train_config(cfg)
    strategy = hu.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (8, 1)
    assert not strategy._save_distributed_checkpoint
    with pytest.raises(ConfigError, match=r"trainer: trainer=fsdp shards a diffusion model's denoiser; "
                                          r"stage=autoencoder trains with trainer=ddp"):
        check_train_config(_compose(["experiment=quickstart_autoencoder", "trainer=fsdp"], tmp_path / "ae"))
