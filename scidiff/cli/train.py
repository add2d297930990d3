"""``scidiff-train``: train a diffusion model from the Hydra config tree in ``configs/``.

    scidiff-train experiment=quickstart
    scidiff-train experiment=grf denoiser=dit trainer=ddp trainer.devices=4
    scidiff-train experiment=quickstart run_name=qs resume=auto    # continue run "qs"

The composed config is checked first (unknown keys, wrong types, missing files ->
one line naming the key, exit status 2); then Hydra creates the run directory
``<output_root>/<task_name>/<run_name>`` and training starts. At the end one line
says where the run, its checkpoint and the MLflow store are.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from scidiff.cli.compose import CONFIG_DIR, config_dir  # noqa: F401 - re-exported
from scidiff.cli.compose import compose_config as compose



def compose_config(argv: list[str]):
    """The config Hydra will run with (for checking it first), errors as ``ConfigError``."""
    return compose("train", argv, return_hydra_config=True)


def precheck(argv: list[str]) -> None:
    from omegaconf import open_dict

    from scidiff.cli.config_check import check_train_config

    cfg = compose_config(argv)
    with open_dict(cfg):
        cfg.run_dir = str(Path(cfg.hydra.run.dir))
    check_train_config(cfg)


def _process_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def ensure_data(cfg) -> None:
    """Generate ``data.path`` with the bundled generator when it is absent and
    ``generate_data`` says how (rank 0 writes; the others wait for the store)."""
    from scidiff.cli.config_check import generates
    from scidiff.cli.errors import ConfigError

    path = Path(cfg.data.path)
    gen = cfg.get("generate_data")
    if path.exists():
        return
    if not generates(cfg):
        raise ConfigError(f"data.path: dataset {path} does not exist (generate it with scidiff-make-dataset)")
    if _process_rank() != 0:
        deadline = time.monotonic() + 600
        while not path.exists():
            if time.monotonic() > deadline:
                raise ConfigError(f"data.path: {path} was not created by rank 0 within 10 minutes")
            time.sleep(1.0)
        return
    from scidiff_datasets.cli import main as make_dataset

    args = [gen.kind, "--out", str(path), "--size", gen.size, "--seed", str(gen.seed)]
    if gen.get("dims") is not None:
        args += ["--dims", str(gen.dims)]
    for key, flag in (("num_samples", "--num-samples"), ("shape", "--shape")):
        value = gen.get(key)
        if value is None:
            continue
        if gen.kind != "grf":
            raise ConfigError(f"generate_data.{key}: only the grf generator takes it (kind is {gen.kind})")
        args += [flag, *(str(v) for v in (value if key == "shape" else [value]))]
    print(f"scidiff-train: generating {path} (scidiff-make-dataset {' '.join(args)})", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    status = make_dataset(args)
    if status not in (0, None) or not path.exists():
        raise ConfigError(f"generate_data: scidiff-make-dataset {' '.join(args)} failed (status {status})")


def resume_checkpoint(cfg, run_dir: Path) -> Path | None:
    from scidiff.training import newest_checkpoint

    if cfg.resume is None:
        return None
    if cfg.resume == "auto":
        ckpt = newest_checkpoint(run_dir / "checkpoints")
        if ckpt is None:
            print(f"scidiff-train: resume=auto: no checkpoint in {run_dir / 'checkpoints'}, starting afresh", flush=True)
        return ckpt
    return Path(cfg.resume)


def build(cfg, ckpt: Path | None) -> dict[str, Any]:
    """Instantiate data, model, logger, callbacks and trainer from a composed config."""
    import hydra.utils as hu
    from lightning.pytorch.loggers import MLFlowLogger
    from omegaconf import OmegaConf, open_dict

    from scidiff.training import AtomicCheckpointIO, ResumableDataModule, safe_torch_load
    from scidiff.training.callbacks import RunArtifacts
    from scidiff.inference.tracking import store_lock

    inner = hu.instantiate(cfg.data)
    datamodule = ResumableDataModule(inner)
    meta = inner.metadata
    if cfg.diffusion.get("sigma_data") == "auto":  # EDM's sigma_data from the training statistics
        inner.setup("fit")
        with open_dict(cfg):
            cfg.diffusion.sigma_data = round(inner.statistics.normalised_rms(), 6)
    denoiser = hu.instantiate(
        cfg.denoiser,
        in_channels=meta.num_channels,
        dims=len(meta.spatial_dims),
        num_params=len(meta.param_names),
        field_channels=len(meta.field_names),
    )
    diffusion = hu.instantiate(cfg.diffusion)
    optimizer = hu.instantiate(cfg.optimizer)
    lr_scheduler = hu.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") is not None else None
    module = hu.instantiate(cfg.module)(denoiser=denoiser, diffusion=diffusion, optimizer=optimizer,
                                        lr_scheduler=lr_scheduler)
    config = OmegaConf.to_container(cfg, resolve=True)
    module.run_info = {"config": config}

    previous: dict[str, Any] = {}
    if ckpt is not None:
        previous = dict(safe_torch_load(ckpt).get("scidiff", {}))
    logger = None
    if cfg.get("logger") is not None:
        kwargs = {}
        if issubclass(hu.get_class(cfg.logger._target_), MLFlowLogger) and previous.get("mlflow_run_id"):
            kwargs["run_id"] = previous["mlflow_run_id"]
        with store_lock(cfg.logger.get("tracking_uri")):  # ranks of torchrun/srun open it together
            logger = hu.instantiate(cfg.logger, **kwargs)
    callbacks = []
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if "_target_" not in node:  # e.g. callbacks=minimal disables samples, an experiment still tunes it
            import warnings

            warnings.warn(f"callbacks.{name}: no _target_ (the chosen callbacks config disables it), so its settings "
                          f"{OmegaConf.to_container(node, resolve=True)} are ignored", stacklevel=2)
            continue
        callbacks.append(hu.instantiate(node))
    if logger is None:  # nothing to log the learning rate to (logger=none): Lightning would refuse to start
        from lightning.pytorch.callbacks import LearningRateMonitor

        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    callbacks.append(RunArtifacts(config=config, config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
                                  resumed=ckpt is not None))
    trainer = hu.instantiate(cfg.trainer, logger=logger if logger is not None else False,
                             callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "logger": logger}


def train(cfg) -> dict[str, Any]:
    """Run one training from a composed config whose ``run_dir`` is set; returns the summary."""
    import lightning as L
    import torch

    from scidiff.inference.tracking import store_description
    from scidiff.training.tracking import mlflow_logger

    run_dir = Path(cfg.run_dir)
    t0 = time.perf_counter()
    # the EMA copy is frozen in eval mode on purpose (no dropout in the average)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    ensure_data(cfg)
    ckpt = resume_checkpoint(cfg, run_dir)
    parts = build(cfg, ckpt)
    trainer: L.Trainer = parts["trainer"]
    trainer.fit(parts["module"], datamodule=parts["datamodule"], ckpt_path=ckpt, weights_only=True)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir.resolve()),
        "global_step": trainer.global_step,
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "resumed_from": str(ckpt) if ckpt else None,
        "world_size": trainer.world_size,
        "rank_weight_checksums": getattr(parts["module"], "rank_checksums", None),
    }
    last = run_dir / "checkpoints" / "last.ckpt"
    summary["checkpoint"] = str(last.resolve()) if last.exists() else None
    ml = mlflow_logger(parts["logger"])
    if trainer.is_global_zero:
        line = f"scidiff-train: {trainer.global_step} steps in {summary['wall_time_s']:.0f} s | run {run_dir}"
        line += f" | checkpoint {summary['checkpoint'] or 'none written'}"
        if ml is not None and ml.run_id is not None:
            store, ui = store_description(ml._tracking_uri)
            summary.update(mlflow_run_id=ml.run_id, mlflow_store=store, mlflow_ui=ui)
            line += f" | MLflow run {ml.run_id} in {store} | view: {ui}"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(line, flush=True)
    return summary


def _hydra_app() -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig, open_dict

    from scidiff.cli.runner import guarded

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
        guarded(lambda: train(cfg), log_dir=lambda: run_dir)  # the traceback goes to the run dir

    app()


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.errors import ConfigError, one_line_warnings, report_and_exit

    argv = sys.argv[1:] if argv is None else list(argv)
    one_line_warnings()
    if not any(a in ("--help", "-h", "--hydra-help", "--info") or a.startswith("--cfg") for a in argv):
        try:
            precheck(argv)
        except ConfigError as exc:
            report_and_exit(exc, status=2)
    sys.argv = [sys.argv[0], *argv]
    _hydra_app()


if __name__ == "__main__":
    main()
