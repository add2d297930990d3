"""``scidiff-train``: train a diffusion model from the Hydra config tree in ``configs/``.

    scidiff-train experiment=quickstart
    scidiff-train experiment=grf denoiser=dit trainer=ddp trainer.devices=4
    scidiff-train experiment=quickstart run_name=qs resume=auto    # continue run "qs"
    scidiff-train -m experiment=quickstart seed=0,1,2 run_name=seeds  # a sweep: one run per seed

The composed config is checked first (unknown keys, wrong types, missing files ->
one line naming the key, exit status 2); then Hydra creates the run directory
``<output_root>/<task_name>/<run_name>`` and training starts. At the end one line
says where the run, its checkpoint and the MLflow store are.

A sweep (``-m``/``--multirun``, Hydra's basic sweeper: the product of the comma-separated
values) checks every job's config before the first starts, runs job ``i`` in
``<output_root>/multirun/<run_name>/<i>``, runs the other jobs when one fails, and exits
with status 1 at the end if any failed. ``hydra/launcher=slurm`` submits the jobs to SLURM
(``configs/hydra/launcher/``, the ``cluster`` extra).
"""

from __future__ import annotations

import itertools
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


def precheck(argv: list[str], job: int | None = None) -> Path:
    """Check the composed config before Hydra creates anything; returns the run directory (of
    the sweep's job number ``job``, when given)."""
    from omegaconf import open_dict

    from scidiff.cli.config_check import check_train_config

    cfg = compose_config(argv)
    with open_dict(cfg):
        if job is None:
            cfg.run_dir = str(Path(cfg.hydra.run.dir))
        else:
            cfg.hydra.job.num = job
            cfg.run_dir = str(Path(cfg.hydra.sweep.dir) / str(cfg.hydra.sweep.subdir))
    check_train_config(cfg)
    check_run_dir(cfg)
    return Path(cfg.run_dir)


MULTIRUN_FLAGS = ("-m", "--multirun")


def is_sweep(argv: list[str]) -> bool:
    """Whether the command line asks Hydra for a sweep (``-m``, ``--multirun``, ``hydra.mode=MULTIRUN``)."""
    return any(a in MULTIRUN_FLAGS or a == "hydra.mode=MULTIRUN" for a in argv)


def sweep_jobs(argv: list[str]) -> tuple[list[str], list[list[str]], set[str]]:
    """A sweep's command line as Hydra's basic sweeper reads it: the overrides of the sweep's own
    config (its directory, its launcher), which are the command line's without the swept ones; the
    jobs, each its list of overrides, numbered as Hydra numbers them (job ``i`` of the list is
    ``hydra.job.num = i``): the product of the swept values (``a,b``, ``range(0,4)``,
    ``choice(...)``) in the order of the command line, a key given twice taking its place at its
    first mention and its value from its last; and the swept keys."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from scidiff.cli.compose import overrides
    from scidiff.cli.errors import ConfigError, from_hydra

    try:
        parsed = OverridesParser.create().parse_overrides(overrides(argv))
    except Exception as exc:  # hydra.errors.OverrideParseException: several lines
        raise from_hydra(exc) from None
    axes: dict[str, list[str]] = {}
    for o in parsed:
        key = o.get_key_element()
        if not o.is_sweep_override():
            axes[key] = [f"{key}={o.get_value_element_as_str()}"]
        elif o.is_discrete_sweep() or o.is_range_sweep():
            axes[key] = [f"{key}={value}" for value in o.sweep_string_iterator()]
        else:
            raise ConfigError(f"{key}: {o.input_line} is not a sweep Hydra's basic sweeper runs "
                              "(give the values as a,b,c, range(start,stop[,step]) or choice(a,b))")
    unswept = [o.input_line for o in parsed if not o.is_sweep_override()]
    swept = {o.get_key_element() for o in parsed if o.is_sweep_override()}
    return unswept, [list(job) for job in itertools.product(*axes.values())], swept


def precheck_sweep(argv: list[str]) -> tuple[list[str], int, Path | None]:
    """Check every job of a sweep as :func:`precheck` checks one run, before Hydra starts the first
    (the error names the job), and the sweep's own config. Returns the command line to run (with
    ``run_name`` fixed when it is the default timestamp, so that every job, on any node, and this
    check agree on the sweep's directory), the number of jobs and the sweep's directory (``None``
    when ``run_name`` is swept: one per name)."""
    from omegaconf import OmegaConf

    from scidiff.cli.errors import ConfigError

    unswept, jobs, swept = sweep_jobs(argv)
    try:
        sweep = compose_config(unswept)
    except ConfigError as exc:
        compose_config(jobs[0])  # fails as well: that error, which is not the sweep's
        raise ConfigError(f"{exc} (a sweep's config is composed without the swept overrides first: "
                          "every override that is not swept must apply to it)") from None
    if not any(o.split("=", 1)[0].lstrip("+~") == "run_name" for o in jobs[0]) and \
            OmegaConf.is_interpolation(sweep, "run_name"):
        pinned = f"run_name={sweep.run_name}"
        argv, jobs = [*argv, pinned], [[*job, pinned] for job in jobs]
    for num, job in enumerate(jobs):
        try:
            precheck(job, num)
        except ConfigError as exc:
            values = " ".join(o for o in job if o.split("=", 1)[0] in swept)
            raise ConfigError(f"{exc} (sweep job {num}: {values})") from None
    return argv, len(jobs), None if "run_name" in swept else Path(sweep.hydra.sweep.dir)


def check_run_dir(cfg) -> None:
    """The run directory can be created, and a new run does not write over another run's
    checkpoints (``resume`` continues one)."""
    from scidiff.cli.errors import ConfigError
    from scidiff.training import newest_checkpoint

    run_dir = Path(cfg.run_dir)
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        what = "is not a directory" if not existing.is_dir() else "is not writable"
        raise ConfigError(f"output_root: cannot create the run directory {run_dir} ({existing} {what})")
    if cfg.resume is None and _process_rank() == 0 and newest_checkpoint(run_dir / "checkpoints") is not None:
        raise ConfigError(f"run_name: {run_dir} already holds a run's checkpoints; resume=auto continues it, "
                          "another run_name starts a new one")


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

    args = [gen.kind, "--out", str(path), "--size", gen.size, "--seed", str(gen.seed), "-q"]
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

    from scidiff.cli.errors import ConfigError
    from scidiff.training import AtomicCheckpointIO, ResumableDataModule, safe_torch_load
    from scidiff.training.callbacks import RunArtifacts
    from scidiff.training.tracking import open_run
    from scidiff.inference.tracking import store_lock

    checkpoint = safe_torch_load(ckpt) if ckpt is not None else {}
    keep_trained_networks(cfg, checkpoint)
    first_stage = load_first_stage(cfg)
    base = load_base(cfg)
    inner = open_data(cfg, checkpoint.get("ResumableDataModule"), first_stage, base)
    datamodule = ResumableDataModule(inner)
    meta = inner.metadata
    optimizer = hu.instantiate(cfg.optimizer)
    lr_scheduler = hu.instantiate(cfg.lr_scheduler) if cfg.get("lr_scheduler") is not None else None
    run_info: dict[str, Any] = {}
    if cfg.stage == "contrastive":
        from scidiff.nets.contrastive import ContrastiveEncoder

        try:
            encoder = ContrastiveEncoder(
                hu.instantiate(cfg.contrastive.field, in_channels=meta.num_channels, dims=len(meta.spatial_dims)),
                hu.instantiate(cfg.contrastive.condition, num_params=len(meta.param_names),
                               embedding_dim=meta.embedding_dim))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        module = hu.instantiate(cfg.module)(encoder=encoder, optimizer=optimizer, lr_scheduler=lr_scheduler)
    elif cfg.stage == "autoencoder":
        autoencoder = hu.instantiate(cfg.autoencoder, in_channels=meta.num_channels, dims=len(meta.spatial_dims))
        try:
            autoencoder.latent_shape(meta.spatial_shape)
        except ValueError as exc:
            raise ConfigError(f"autoencoder.{exc}") from None
        module = hu.instantiate(cfg.module)(autoencoder=autoencoder, optimizer=optimizer, lr_scheduler=lr_scheduler)
    else:
        latent = None
        if first_stage is not None:
            latent, cache = latent_codec(cfg, first_stage, inner, checkpoint.get("state_dict"))
            run_info["latent"] = {"checkpoint": str(first_stage.checkpoint), "sha256": first_stage.sha256,
                                  "mlflow_run_id": first_stage.mlflow_run_id, "global_step": first_stage.global_step,
                                  "posterior": latent.posterior, "net_config": first_stage.net_config}
        if cfg.diffusion.get("sigma_data") == "auto":  # EDM's sigma_data from the training statistics
            with open_dict(cfg):  # a latent is normalised per channel: its scale is 1
                cfg.diffusion.sigma_data = 1.0 if latent is not None else round(inner.statistics.normalised_rms(), 6)
        prior = None
        if base is not None:
            prior = prior_fields(cfg, base)  # from the base model, before it is adapted
            denoiser = finetuned_denoiser(cfg, base, run_info, meta)
            if prior is not None:
                run_info["finetune"]["prior"] = {"count": int(prior["x"].shape[0]),
                                                 "weight": float(cfg.finetune.prior.get("weight", 1.0))}
        else:
            denoiser = hu.instantiate(
                cfg.denoiser,
                in_channels=latent.latent_channels if latent is not None else meta.num_channels,
                dims=len(meta.spatial_dims),
                num_params=len(meta.param_names),
                field_channels=len(meta.field_names),
                embedding_dim=meta.embedding_dim,
            )
        check_grid = getattr(denoiser, "check_grid", None)
        if check_grid is not None:
            grid = latent.latent_shape(meta.spatial_shape)[1:] if latent is not None else meta.spatial_shape
            try:
                check_grid(grid)
            except ValueError as exc:
                where = "the latent grid" if latent is not None else "the data's grid"
                text = str(exc)
                raise ConfigError((f"denoiser.{text}" if text.startswith("channel_mult:") else f"denoiser: {text}")
                                  + f" ({where})") from None
        diffusion = hu.instantiate(cfg.diffusion)
        kwargs = {"latent": latent, "latent_cache": cache} if latent is not None else {}
        if prior is not None:
            kwargs.update(prior=prior, prior_weight=float(cfg.finetune.prior.get("weight", 1.0)))
        module = hu.instantiate(cfg.module)(denoiser=denoiser, diffusion=diffusion, optimizer=optimizer,
                                            lr_scheduler=lr_scheduler, **kwargs)
    config = OmegaConf.to_container(cfg, resolve=True)
    module.run_info = {"config": config, **run_info}

    previous = dict(checkpoint.get("scidiff", {}))
    logger = None
    if cfg.get("logger") is not None:
        kwargs = {}
        if issubclass(hu.get_class(cfg.logger._target_), MLFlowLogger) and previous.get("mlflow_run_id"):
            kwargs["run_id"] = previous["mlflow_run_id"]
        with store_lock(cfg.logger.get("tracking_uri")):  # ranks of torchrun/srun open it together
            logger = hu.instantiate(cfg.logger, **kwargs)
            open_run(logger, resumed="run_id" in kwargs)  # rank 0: owned, ended FAILED/KILLED if we fail
        if base is not None:
            link_base_run(logger, run_info["finetune"]["base"])
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
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        from lightning.pytorch.callbacks import ProgressBar

        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    trainer = hu.instantiate(cfg.trainer, logger=logger if logger is not None else False,
                             callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    return {"datamodule": datamodule, "module": module, "trainer": trainer, "logger": logger,
            "start_step": int(checkpoint.get("global_step", 0))}


def keep_trained_networks(cfg, checkpoint: dict[str, Any]) -> None:
    """A resumed run's networks keep the GroupNorm groups they were trained with (a checkpoint
    written before ``norm_group_channels`` existed: 1) and their ``norm``, the UNet's and the
    autoencoder's (before that key: ``group``), whatever today's config files say."""
    from omegaconf import open_dict

    from scidiff.inference.checkpoint import as_trained

    trained = (checkpoint.get("scidiff") or {}).get("config") or {}
    for key in ("denoiser", "autoencoder"):
        net = as_trained(trained.get(key))
        if cfg.get(key) is not None and isinstance(net, dict) and "norm_group_channels" in net \
                and cfg[key].get("norm_group_channels") != net["norm_group_channels"]:
            with open_dict(cfg):
                cfg[key].norm_group_channels = net["norm_group_channels"]
        if cfg.get(key) is not None and isinstance(net, dict) and cfg[key].get("norm") is not None \
                and cfg[key].get("norm") != net.get("norm", "group"):
            with open_dict(cfg):
                cfg[key].norm = net.get("norm", "group")


def load_base(cfg):
    """The trained model a fine-tuning run adapts (``finetune.base``), or ``None``."""
    from scidiff.cli.errors import ConfigError
    from scidiff.inference.checkpoint import CheckpointError, load_pretrained

    if cfg.get("finetune") is None:
        return None
    try:
        return load_pretrained(cfg.finetune.base, tracking_uri=cfg.finetune.get("tracking_uri"), key="finetune.base")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def finetuned_denoiser(cfg, base, run_info: dict[str, Any], metadata):
    """The base model's denoiser (its EMA weights), to be trained in full, through LoRA adapters,
    or frozen inside a ControlNet for the data's new condition fields (``finetune.method``); the
    run's ``denoiser`` and ``diffusion`` become the base's, and ``run_info["finetune"]`` records
    the base and the method."""
    from omegaconf import OmegaConf, open_dict

    from scidiff.cli.errors import ConfigError
    from scidiff.nets.adapters import LoraSpec, apply_lora

    with open_dict(cfg):
        cfg.denoiser = OmegaConf.create(dict(base.config["denoiser"]))
        cfg.diffusion = OmegaConf.create(dict(base.config["diffusion"]))
    denoiser = base.denoiser.train().requires_grad_(True)
    method = cfg.finetune.get("method", "lora")
    info: dict[str, Any] = {"method": method,
                            "base": {"checkpoint": str(base.checkpoint), "sha256": base.sha256,
                                     "mlflow_run_id": base.mlflow_run_id, "global_step": base.global_step,
                                     "weights": base.weights}}
    total = sum(p.numel() for p in denoiser.parameters())
    if method == "controlnet":
        from scidiff.nets.controlnet import ControlNet

        node = dict(OmegaConf.to_container(cfg.finetune.get("controlnet") or {}, resolve=True))
        new_fields = list(metadata.field_names[len(base.metadata.field_names):])
        try:
            denoiser = ControlNet(denoiser, control_channels=len(new_fields),
                                  hint_channels=int(node.get("hint_channels") or 16), blocks=node.get("blocks"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        info["controlnet"] = {**denoiser.settings(), "fields": new_fields}
        info["trainable_parameters"] = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)
        info["base_parameters"] = total
    elif method == "lora":
        spec = LoraSpec(**OmegaConf.to_container(cfg.finetune.get("lora") or {}, resolve=True))
        try:
            counts = apply_lora(denoiser, spec)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        info["lora"] = spec.to_dict()
        info["trainable_parameters"], info["base_parameters"] = counts["trainable"], total
    else:
        info["trainable_parameters"], info["base_parameters"] = total, total
    run_info["finetune"] = info
    return denoiser


PRIOR_FILE = "prior_fields.pt"


def prior_fields(cfg, base) -> dict[str, Any] | None:
    """Prior preservation's fields (``finetune.prior.count`` > 0): the base model's samples at
    parameters (and condition fields) drawn from its own training split, normalised. Generated
    once with DPM-Solver++ 2M (``finetune.prior.steps`` calls) and cached in the run directory
    (``prior_fields.pt``), so a resumed run trains on the same ones. ``None`` without a prior."""
    import hydra.utils as hu
    import numpy as np
    import torch

    from scidiff.cli.errors import ConfigError
    from scidiff.conditioning import Conditioning
    from scidiff.inference.generation import DPMSolver, initial_noise, sample_model
    from scidiff.inference.seeds import generator
    from scidiff.training import atomic_torch_save, safe_torch_load

    node = cfg.finetune.get("prior")
    count = int((node or {}).get("count", 0))
    if count <= 0:
        return None
    path = Path(cfg.run_dir) / PRIOR_FILE
    if path.is_file():
        return safe_torch_load(path)
    data = dict(base.config["data"])
    store = node.get("data_path") or data.get("path")
    if store is None or not Path(store).exists():
        raise ConfigError(f"finetune.prior.data_path: the base model's data store {store} does not exist; it is needed "
                          "for the base's training conditions (give its location)")
    dm = hu.instantiate(data, path=str(store), num_workers=0, statistics_path=None)
    dm.load_state_dict({"statistics": base.statistics.state_dict(),
                        "split_indices": {k: list(v) for k, v in base.split_indices.items()}})
    train = dm.datasets["train"]
    rng = np.random.default_rng(int(cfg.seed))
    chosen = np.sort(rng.choice(np.asarray(train.indices), size=count, replace=count > len(train)))
    cond = {k: v for k, v in train.read_batch(chosen).items() if k in ("params", "fields", "embedding")}
    sampler = DPMSolver(steps=int(node.get("steps", 20)), order=2)
    net = base.denoiser.eval()
    out = []
    with torch.no_grad():
        for i in range(0, count, 64):
            gens = [generator(int(cfg.seed), 5, j) for j in range(i, min(count, i + 64))]
            x_T = initial_noise(base.sample_shape, gens)
            c = Conditioning(**{k: v[i:i + 64] for k, v in cond.items()}) if cond else None
            out.append(sample_model(net, base.diffusion, x_T, c, sampler=sampler, generator=gens))
    prior = {"x": torch.cat(out).float(), **{k: v.float() for k, v in cond.items()}}
    if _process_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(prior, path)
    print(f"scidiff-train: prior preservation: {count} fields of the base model at its training conditions "
          f"(DPM-Solver++ 2M, {sampler.steps} calls), cached in {path}", flush=True)
    return prior


def link_base_run(logger, base: dict[str, Any]) -> None:
    """Tag the fine-tuning run with the base model's MLflow run and checkpoint hash (rank 0)."""
    from scidiff.training.tracking import mlflow_logger

    ml = mlflow_logger(logger)
    if ml is None or ml.run_id is None:
        return
    ml.experiment.set_tag(ml.run_id, "scidiff.base_checkpoint_sha256", base["sha256"])
    if base.get("mlflow_run_id"):
        ml.experiment.set_tag(ml.run_id, "scidiff.base_run_id", base["mlflow_run_id"])


def load_first_stage(cfg):
    """The autoencoder a latent diffusion run names (``latent.autoencoder``), or ``None``."""
    from scidiff.cli.errors import ConfigError
    from scidiff.inference.checkpoint import CheckpointError, load_autoencoder

    if cfg.get("latent") is None:
        return None
    try:
        return load_autoencoder(cfg.latent.autoencoder, tracking_uri=cfg.latent.get("tracking_uri"))
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def latent_codec(cfg, first_stage, inner, state: dict[str, Any] | None = None):
    """The frozen codec of a latent run and the training split's latents (or ``None``).

    The codec is ``first_stage``'s autoencoder, checked against the data, with the latent's
    per-channel statistics over (up to ``latent.statistics_samples`` fields of) the training
    split, or restored from ``state`` (a checkpoint's state dict, when resuming). With the
    posterior mean and ``latent.cache``, the whole training split is encoded once, in blocks
    of 64 in split order (the same latents in every session, so resumption stays exact)."""
    import numpy as np
    import torch

    from scidiff.cli.errors import ConfigError
    from scidiff.inference.checkpoint import CheckpointError
    from scidiff.nets.latent import LatentCodec
    from scidiff.training.module import LatentCache

    try:
        first_stage.check_data(inner.metadata)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    codec = LatentCodec(first_stage.autoencoder, posterior=cfg.latent.get("posterior", "mean"))
    train = inner.datasets["train"]
    indices = np.asarray(train.indices)
    limit = int(cfg.latent.get("statistics_samples", 4096))
    cached = codec.posterior == "mean" and bool(cfg.latent.get("cache", True))
    g = torch.Generator().manual_seed(int(cfg.seed))
    todo = indices if cached else indices[:limit]
    if state:  # the checkpoint's autoencoder and statistics, whatever became of the autoencoder run since
        codec.load_state_dict({k[len("latent."):]: v for k, v in state.items() if k.startswith("latent.")})
    raw = [codec.raw(train.read_batch(todo[i:i + 64])["x"], g) for i in range(0, todo.size, 64)]
    if not state:
        try:
            codec.fit_latents(torch.cat(raw)[:limit].split(64))
        except ValueError as exc:
            raise ConfigError(f"latent.autoencoder: {exc}") from None
    cache = LatentCache(indices, codec.normalise(torch.cat(raw))) if cached else None
    return codec, cache


def open_data(cfg, state: dict[str, Any] | None = None, first_stage=None, base=None):
    """The run's data module, set up: split, statistics (restored from ``state``, a
    checkpoint's data-module state, when resuming) and every split's values checked.
    A latent run normalises its fields with the statistics of its autoencoder
    (``first_stage``); a fine-tuning run everything with its base model's (``base``), whose
    variables, grid, parameters and condition fields the data must have. A store or a data
    config that cannot be used is a ``ConfigError`` naming ``data``, before any training."""
    import hydra.utils as hu
    from hydra.errors import InstantiationException

    from scidiff.cli.errors import ConfigError

    try:
        inner = hu.instantiate(cfg.data)
        if state:
            inner.load_state_dict(state)
        inner.setup("fit")
    except (InstantiationException, ValueError, KeyError, OSError) as exc:
        raise _data_error(cfg, exc) from exc
    if first_stage is not None and not state:
        try:
            inner.adopt_statistics(first_stage.statistics, f"latent.autoencoder: {first_stage.checkpoint}")
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if base is not None and not state:
        what = f"finetune.base: {base.checkpoint}"
        mine, theirs = inner.metadata, base.metadata
        grid, base_grid = dict(zip(mine.spatial_dims, mine.spatial_shape)), dict(zip(theirs.spatial_dims,
                                                                                        theirs.spatial_shape))
        if grid != base_grid:
            raise ConfigError(f"{what} was trained on the grid {base_grid}, the data's is {grid}")
        control = cfg.finetune.get("method") == "controlnet"
        if control:
            check_control_fields(mine.field_names, theirs.field_names, what)
        try:
            inner.adopt_statistics(base.statistics, what, parts=("x", "params", "fields", "embedding"),
                                  extra_fields=control)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    return inner


def check_control_fields(fields, base_fields, what: str) -> None:
    """A ControlNet's data has the base model's condition fields, then the new one(s)."""
    from scidiff.cli.errors import ConfigError

    fields, base_fields = list(fields), list(base_fields)
    if fields[:len(base_fields)] != base_fields or len(fields) == len(base_fields):
        raise ConfigError(f"data.fields: a ControlNet adds condition fields after the base model's: {what} takes "
                          f"{base_fields}, so data.fields must be those followed by the new one(s), got {fields} "
                          "(coarsened fields come after named ones)")


def _data_error(cfg, exc: BaseException):
    """The ``ConfigError`` naming ``data`` for an error opening or setting up the data."""
    from hydra.errors import InstantiationException

    from scidiff.cli.errors import ConfigError

    cause = exc.__cause__ if isinstance(exc, InstantiationException) and exc.__cause__ is not None else exc
    text = str(cause).strip() or type(cause).__name__
    if isinstance(cause, KeyError):
        text = f"no variable or dim {text} in the store"
    return ConfigError(f"data ({cfg.data.get('path')}): {text}")


def start_line(cfg, parts: dict[str, Any]) -> tuple[str, str | None]:
    """What the run is about to do (model size, data, steps, device, estimated cost), and a
    warning when the estimate makes it a GPU job (:mod:`scidiff.training.budget`), else ``None``."""
    import torch

    from scidiff.training.autoencoder import AsDenoiser
    from scidiff.training.budget import budget_warning, estimate_step

    trainer, module, dm = parts["trainer"], parts["module"], parts["datamodule"]
    latent = getattr(module, "latent", None)
    where = ""
    if hasattr(module, "autoencoder"):
        net, what = AsDenoiser(module.autoencoder), "FieldAutoencoder"
    elif hasattr(module, "encoder"):
        from scidiff.training.contrastive import AsStep

        net, what = AsStep(module.encoder), "ContrastiveEncoder"
    else:
        net, what = module.denoiser, type(module.denoiser).__name__
        if latent is not None:
            where = f" on the latent {'x'.join(map(str, latent.latent_shape(dm.metadata.spatial_shape)))}"
    sizes = " / ".join(f"{len(dm.datasets[s])} {s}" for s in ("train", "val", "test") if s in dm.datasets)
    device = trainer.strategy.root_device
    total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
    steps = f"steps {parts['start_step']} -> {total}" if parts["start_step"] else f"{total or '?'} steps"
    total_params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    if trainable < total_params:  # a LoRA fine-tuning
        where += f" ({trainable / 1e6:.3g} M trained)"
    line = (f"scidiff-train: run {cfg.run_dir} | {what} "
            f"{total_params / 1e6:.3g} M parameters{where} | data {cfg.data.path} "
            f"({sizes}) | {steps} on {device.type} x{trainer.world_size}")
    sample = dm.datasets["train"][0]
    batch = {k: torch.empty((dm.batch_size, *v.shape), device="meta") for k, v in sample.items()
             if k in ("x", "params", "fields", "embedding")}
    if latent is not None:  # the denoiser's input (the training latents are encoded once, at the start)
        batch["x"] = torch.empty((dm.batch_size, *latent.latent_shape(dm.metadata.spatial_shape)), device="meta")
    try:
        estimate = estimate_step(net, batch)
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run
        return line + f" | cost not estimated ({type(exc).__name__})", None
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    summary, warning = budget_warning(estimate, accelerator=device.type, device_memory=memory,
                                      steps_left=(total or 0) - parts["start_step"])
    return line + f" | {summary}", warning


def train(cfg) -> dict[str, Any]:
    """Run one training from a composed config whose ``run_dir`` is set; returns the summary."""
    import lightning as L
    import torch

    from scidiff.cli.runlog import quiet_libraries
    from scidiff.inference.tracking import store_description
    from scidiff.training.tracking import mlflow_logger

    run_dir = Path(cfg.run_dir)
    t0 = time.perf_counter()
    quiet_libraries()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")
    # checked again where the run starts: a launcher (a SLURM task of a sweep, one requeued by submitit)
    # runs this without the command's precheck
    check_run_dir(cfg)
    ensure_data(cfg)
    ckpt = resume_checkpoint(cfg, run_dir)
    parts = build(cfg, ckpt)
    trainer: L.Trainer = parts["trainer"]
    if trainer.is_global_zero:
        line, warning = start_line(cfg, parts)
        print(line, flush=True)
        if warning:
            warnings.warn(warning, stacklevel=1)
    t_fit = time.perf_counter()
    trainer.fit(parts["module"], datamodule=parts["datamodule"], ckpt_path=ckpt, weights_only=True)
    summary: dict[str, Any] = {
        "run_dir": str(run_dir.resolve()),
        "global_step": trainer.global_step,
        "start_step": parts["start_step"],
        "wall_time_s": round(time.perf_counter() - t0, 1),
        "fit_time_s": round(time.perf_counter() - t_fit, 1),
        "resumed_from": str(ckpt) if ckpt else None,
        "world_size": trainer.world_size,
        "rank_weight_checksums": getattr(parts["module"], "rank_checksums", None),
    }
    last = run_dir / "checkpoints" / "last.ckpt"
    summary["checkpoint"] = str(last.resolve()) if last.exists() else None
    ml = mlflow_logger(parts["logger"])
    finetune = parts["module"].run_info.get("finetune")
    if trainer.is_global_zero and finetune:
        summary["finetune"] = finetune_summary(run_dir, parts, finetune)
    if trainer.is_global_zero:
        done = trainer.global_step - parts["start_step"]
        steps = (f"steps {parts['start_step']} -> {trainer.global_step} ({done} in this session)" if parts["start_step"]
                 else f"{done} steps")
        line = f"scidiff-train: {steps} in {summary['fit_time_s']:.0f} s | run {run_dir}"
        line += f" | checkpoint {summary['checkpoint'] or 'none written'}"
        if ml is not None and ml.run_id is not None:
            store, ui = store_description(ml._tracking_uri)
            summary.update(mlflow_run_id=ml.run_id, mlflow_store=store, mlflow_ui=ui)
            line += f" | MLflow run {ml.run_id} in {store} | view: {ui}"
        if finetune:
            f = summary["finetune"]
            line += (f" | fine-tuned ({f['method']}) {f['trainable_parameters'] / 1e6:.3g} of "
                     f"{f['base_parameters'] / 1e6:.3g} M parameters from {f['base']['checkpoint']}")
            if f.get("adapter"):
                line += f" | adapter {f['adapter']['path']} ({f['adapter']['bytes'] / 1e6:.3g} MB, "
                line += f"{100 * f['adapter']['fraction_of_base']:.2g} % of the base checkpoint)"
        if cfg.get("register_model"):
            line += " | " + _register(cfg.register_model, parts["logger"], trainer, summary)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(line, flush=True)
    return summary


def finetune_summary(run_dir: Path, parts: dict[str, Any], finetune: dict[str, Any]) -> dict[str, Any]:
    """What a fine-tuning run reports; a LoRA run also writes its adapter (the weights that
    sample, the EMA's when there is one) to ``<run dir>/adapter.safetensors``, logged to MLflow."""
    from scidiff.training.checkpoint import ADAPTER_FILE, save_adapter
    from scidiff.training.tracking import log_artifact

    out = dict(finetune)
    if finetune["method"] != "lora":
        return out
    module = parts["module"]
    path = save_adapter(run_dir / ADAPTER_FILE, module.sampling_net, finetune,
                        weights="ema" if module.ema is not None else "raw")
    size = path.stat().st_size
    base_size = Path(finetune["base"]["checkpoint"]).stat().st_size
    out["adapter"] = {"path": str(path.resolve()), "bytes": size, "fraction_of_base": size / base_size}
    if parts["logger"] is not None:
        log_artifact(parts["logger"], path, None)
    return out


def _register(name: str, logger, trainer, summary: dict[str, Any]) -> str:
    """Register the final checkpoint (the run's ``checkpoints/last.ckpt`` artifact) as a new
    version of the MLflow model ``name`` (rank 0); ``registered <name> v<version>``."""
    from scidiff.inference.checkpoint import file_sha256
    from scidiff.training.tracking import register_model

    tags = {"scidiff.global_step": trainer.global_step}
    if summary.get("checkpoint"):
        tags["scidiff.checkpoint_sha256"] = file_sha256(summary["checkpoint"])
    version = register_model(logger, name, tags=tags)
    summary["registered_model"] = {"name": name, "version": version, "uri": f"models:/{name}/{version}"}
    return f"registered {name} v{version}"


def _hydra_app(new_dirs: list[Path]) -> None:
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import DictConfig, open_dict

    from scidiff.cli.runlog import run_log
    from scidiff.cli.runner import guarded

    @hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
    def app(cfg: DictConfig) -> None:
        hydra_cfg = HydraConfig.get()
        run_dir = Path(hydra_cfg.runtime.output_dir)
        sweep = hydra_cfg.mode == RunMode.MULTIRUN
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
            if sweep and cfg.get("logger") is not None and {"run_name", "tags"} <= set(cfg.logger):
                # MLflow: the job's number in the run's name, and the sweep in its tags
                cfg.logger.run_name = f"{cfg.logger.run_name}/{hydra_cfg.job.num}"
                cfg.logger.tags = {**cfg.logger.tags, "scidiff.sweep": str(Path(hydra_cfg.sweep.dir).resolve()),
                                   "scidiff.sweep_job": str(hydra_cfg.job.num)}
        fresh = all(p.name == ".hydra" for p in run_dir.iterdir())  # Hydra created it for this command
        log = run_dir / "train.log" if _process_rank() == 0 else None
        try:
            with run_log(log):  # the run's output, also in its directory; the traceback goes there too
                guarded(lambda: train(cfg), log_dir=lambda: run_dir)
        except SystemExit as exc:
            if exc.code == 2 and fresh:
                remove_refused_run(run_dir, new_dirs)
            if exc.code not in (0, None) and sweep:
                # an exception, not an exit: the launcher records the job as failed and runs the next
                raise SweepJobFailed(f"{run_dir}: exit status {exc.code}") from None
            raise

    app()


class SweepJobFailed(RuntimeError):
    """A job of a sweep ended with a non-zero status (its one-line error was printed above)."""


def remove_refused_run(run_dir: Path, new_dirs: list[Path]) -> None:
    """A run refused for its input (exit status 2) leaves nothing: the run directory Hydra
    created for it, and the parents created with it when they are left empty."""
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    for directory in new_dirs:  # deepest first
        try:
            directory.rmdir()
        except OSError:  # not empty (another run), or already gone
            break


def main(argv: list[str] | None = None) -> None:
    from scidiff.cli.errors import ConfigError, one_line_warnings, report_and_exit

    argv = sys.argv[1:] if argv is None else list(argv)
    one_line_warnings()
    new_dirs: list[Path] = []
    if not any(a in ("--help", "-h", "--hydra-help", "--info") or a.startswith("--cfg") for a in argv):
        try:
            if is_sweep(argv):
                argv, count, sweep_dir = precheck_sweep(argv)
                where = f": run i in {sweep_dir}/i" if sweep_dir else ""
                print(f"scidiff-train: sweep of {count} runs, every config checked{where}", flush=True)
            else:
                run_dir = precheck(argv)
                new_dirs = [d for d in (run_dir.parent, *run_dir.parent.parents) if not d.exists()]
        except ConfigError as exc:
            report_and_exit(exc, status=2)
    sys.argv = [sys.argv[0], *argv]
    _hydra_app(new_dirs)


if __name__ == "__main__":
    main()
