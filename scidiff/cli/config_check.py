"""Checks a composed training config before anything runs.

Every node with a ``_target_`` is checked against the signature of what it builds:
a key the target does not accept, or a value whose type does not match a simple
annotation (``int``, ``float``, ``bool``, ``str``, their optionals and literals),
raises a :class:`ConfigError` naming the key's full path. Top-level keys are
checked against the ``TrainConfig`` schema below; the dataset path must exist (or
be generated); unknown ``_target_``s name the key and the target.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from scidiff.cli.errors import ConfigError


@dataclasses.dataclass
class TrainConfig:
    """Top-level keys of ``configs/train.yaml`` (the groups are checked through their targets)."""

    task_name: str
    run_name: str
    output_root: str
    run_dir: str | None
    experiment_name: str
    seed: int
    resume: str | None
    boundary: Any
    generate_data: dict | None
    module: dict
    optimizer: dict
    lr_scheduler: dict | None
    data: dict
    trainer: dict
    logger: dict | None
    callbacks: dict | None
    local: dict | None = None
    register_model: str | None = None
    stage: Literal["diffusion", "autoencoder", "contrastive"] = "diffusion"
    denoiser: dict | None = None       # stage=diffusion
    diffusion: dict | None = None      # stage=diffusion
    autoencoder: dict | None = None    # stage=autoencoder
    contrastive: dict | None = None    # stage=contrastive
    latent: dict | None = None
    finetune: dict | None = None


@dataclasses.dataclass
class FinetuneConfig:
    """``finetune``: the trained model a run adapts, and how."""

    base: str                                          # run dir, .ckpt, run id, runs:/ or models:/
    method: Literal["full", "lora", "controlnet"] = "lora"
    lora: dict | None = None                           # scidiff.nets.adapters.LoraSpec's fields
    controlnet: dict | None = None                     # {hint_channels, blocks}: the new condition's branch
    prior: dict | None = None                          # prior preservation: {count, weight, steps, data_path}
    tracking_uri: str | None = None


@dataclasses.dataclass
class LatentConfig:
    """``latent``: the autoencoder a latent diffusion run works in the latent space of."""

    autoencoder: str                                   # run dir, .ckpt, run id, runs:/ or models:/
    posterior: Literal["mean", "sample"] = "mean"
    statistics_samples: int = 4096                     # training fields the latent statistics are computed over
    cache: bool = True                                 # posterior mean: encode the training split once, keep it
    tracking_uri: str | None = None                    # the MLflow store of a run id / runs:/ / models:/ reference


@dataclasses.dataclass
class GenerateData:
    kind: Literal["grf", "climate", "voxels"]
    size: Literal["tiny", "small", "full"] = "tiny"
    seed: int = 0
    dims: int | None = None
    path: str | None = None         # the store it writes; generated only when data.path is this path
    num_samples: int | None = None  # grf: overrides the size preset's number of fields
    shape: list[int] | None = None  # grf: overrides the size preset's spatial shape


BOUNDARIES = ("zeros", "circular", "reflect")
_SPECIAL = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether a config value fits a *simple* annotation; anything else passes."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return True
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if origin is Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if value is None:
        return False if annotation in (int, float, bool, str) else True
    if isinstance(value, str) and value.startswith("${"):
        return True
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if annotation in (dict,) or origin in (dict, Mapping):
        return isinstance(value, (dict, DictConfig))
    return True


def _describe(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "")
    return getattr(annotation, "__name__", text) if typing.get_origin(annotation) is None else text


def _hints(fn: Any) -> dict[str, Any]:
    try:
        target = fn.__init__ if inspect.isclass(fn) else fn
        return typing.get_type_hints(target)
    except Exception:  # unresolvable forward references: no type checks, keys still checked
        return {}


def check_target_node(node: DictConfig, path: str) -> None:
    target_name = node.get("_target_")
    try:
        target = get_object(target_name)
    except Exception as exc:
        raise ConfigError(f"{path}._target_: cannot import {target_name!r} ({type(exc).__name__})") from None
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    hints = _hints(target)
    for key in node.keys():
        if key in _SPECIAL:
            continue
        if key not in params and not takes_kwargs:
            known = ", ".join(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
            raise ConfigError(f"{path}.{key}: unknown key for {target_name} (accepted: {known})")
        value = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            raise ConfigError(f"{path}.{key}: required value is missing (???); set it on the command line")
        if key in params and not isinstance(value, (DictConfig, ListConfig)):
            raw = node[key]
            annotation = hints.get(key, params[key].annotation)
            if isinstance(annotation, str):
                continue
            if not _type_ok(raw, annotation):
                raise ConfigError(f"{path}.{key}: expected {_describe(annotation)}, got {type(raw).__name__} {raw!r}")


def _walk(node: Any, path: str) -> None:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            check_target_node(node, path)
        for key in node.keys():
            if key == "_target_":
                continue
            _walk(node._get_node(key) if not isinstance(node[key], (DictConfig, ListConfig)) else node[key],
                  f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for i, item in enumerate(node):
            _walk(item, f"{path}[{i}]")


def check_dataclass(values: Mapping[str, Any], schema: type, path: str) -> None:
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in values:
        if key not in fields:
            raise ConfigError(f"{path}{key}: unknown key (accepted: {', '.join(fields)})")
    for name, f in fields.items():
        if name not in values:
            if f.default is dataclasses.MISSING:
                raise ConfigError(f"{path}{name}: required key is missing")
            continue
        if not _type_ok(values[name], hints[name]):
            raise ConfigError(f"{path}{name}: expected {_describe(hints[name])}, got {values[name]!r}")


def check_execution(plain: dict[str, Any]) -> None:
    """Check the ``execution`` node of a sampling command (precision, compile, channels_last);
    a :class:`ConfigError` names the key."""
    from scidiff.nets.execution import Execution

    try:
        Execution.from_config(plain.get("execution"))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def check_train_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` naming the first bad key of a composed training config."""
    missing = sorted(_missing(cfg, ""))
    if "finetune.base" in missing:
        raise ConfigError("finetune.base: required: the trained model to adapt (its run directory, checkpoint, "
                          "MLflow run id or models:/<name>/<version>)")
    if "latent.autoencoder" in missing:
        raise ConfigError("latent.autoencoder: required: the autoencoder run this latent model works in (its run "
                          "directory, checkpoint, MLflow run id or models:/<name>/<version>)")
    if missing:
        raise ConfigError(f"{missing[0]}: required value is missing (???); set it on the command line")
    top = {k: (dict(v) if isinstance(v := cfg[k], DictConfig) else list(v) if isinstance(v, ListConfig) else v)
           for k in cfg.keys() if k != "hydra"}
    check_dataclass(top, TrainConfig, "")
    boundary = top.get("boundary")
    modes = boundary if isinstance(boundary, list) else [boundary]
    if any(m not in BOUNDARIES for m in modes):
        raise ConfigError(f"boundary: expected one of {list(BOUNDARIES)} or a list of them (one per spatial axis), "
                          f"got {boundary!r}")
    if cfg.get("generate_data") is not None:
        check_dataclass(OmegaConf.to_container(cfg.generate_data, resolve=True), GenerateData, "generate_data.")
    check_stage(cfg)
    check_finetune(cfg)
    if cfg.resume is not None and cfg.resume != "auto":
        check_resume(cfg)
    for group in ("data", "denoiser", "diffusion", "autoencoder", "trainer", "logger", "module", "optimizer",
                  "lr_scheduler"):
        node = cfg.get(group)
        if node is None:
            continue
        if group == "diffusion" and node.get("sigma_data") == "auto":  # resolved from the data by scidiff-train
            node = node.copy()
            node.sigma_data = 1.0
        if "_target_" not in node:
            raise ConfigError(f"{group}: has no _target_ (choose a config from configs/{group}/)")
        _walk(node, group)
    if cfg.get("callbacks") is not None:
        for name in cfg.callbacks:
            if cfg.callbacks[name] is not None:
                _walk(cfg.callbacks[name], f"callbacks.{name}")
    check_register_model(cfg)
    check_data_path(cfg)
    check_fast_paths(cfg)


# Lightning precisions that store the weights in half precision: an EMA update (1 - decay) * (w - ema)
# of ~1e-3 of the weights' scale is below bfloat16's rounding step (2^-8), so the average would not move
HALF_WEIGHTS = ("bf16-true", "16-true")


def check_fast_paths(cfg: DictConfig) -> None:
    """``trainer.precision`` keeps float32 weights, ``trainer=fsdp`` shards a diffusion model over a
    number of devices, ``module.compile`` names a mode and ``module.channels_last`` has fields of
    rank 2 or 3 to work on."""
    from scidiff.nets.execution import check_compile

    precision = str((cfg.get("trainer") or {}).get("precision", "32-true"))
    if precision in HALF_WEIGHTS:
        raise ConfigError(f"trainer.precision: {precision} stores the weights and their EMA in half precision, where "
                          "an EMA update (1e-3 of the weights) is below the rounding step; use "
                          f"trainer.precision={precision.replace('true', 'mixed')} (half-precision arithmetic, "
                          "float32 weights)")
    strategy = OmegaConf.select(cfg, "trainer.strategy._target_", default=None, throw_on_resolution_failure=False)
    if strategy == "scidiff.training.sharding.fsdp_strategy" and cfg.get("stage", "diffusion") != "diffusion":
        raise ConfigError(f"trainer: trainer=fsdp shards a diffusion model's denoiser; stage={cfg.stage} trains with "
                          "trainer=ddp")
    module = cfg.get("module") or {}
    if strategy == "scidiff.training.sharding.fsdp_strategy" and module.get("channels_last", False) is True:
        raise ConfigError("module.channels_last: FSDP2 cannot change the memory format of sharded weights; with "
                          "trainer=fsdp set module.channels_last=false")
    try:
        check_compile(module.get("compile", False), "module.compile")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if module.get("channels_last", False) not in (True, False):
        raise ConfigError(f"module.channels_last: expected true or false, got {module.get('channels_last')!r}")
    dims = OmegaConf.select(cfg, "denoiser.dims", default=None, throw_on_resolution_failure=False)
    if module.get("channels_last", False) and cfg.get("latent") is None and dims == 1:
        raise ConfigError("module.channels_last: fields of spatial rank 1 have no channels-last layout (2-D and 3-D "
                          "only); set module.channels_last=false")


def _missing(node: Any, path: str) -> list[str]:
    """The keys under ``node`` whose value is ``???`` (interpolations are not resolved; Hydra's own
    ``hydra`` node is skipped)."""
    out = []
    if isinstance(node, DictConfig):
        for key in node.keys():
            full = f"{path}.{key}" if path else str(key)
            if full == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                out.append(full)
            else:
                child = node._get_node(key)
                if isinstance(child, (DictConfig, ListConfig)):
                    out += _missing(child, full)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            child = node._get_node(i)
            if isinstance(child, (DictConfig, ListConfig)):
                out += _missing(child, f"{path}[{i}]")
    return out


def check_stage(cfg: DictConfig) -> None:
    """The groups a stage needs are chosen, and ``module`` trains that stage; ``latent``
    names a readable autoencoder."""
    from scidiff.training import AutoencoderModule, DiffusionModule

    stage = cfg.get("stage", "diffusion")
    module_target = (cfg.get("module") or {}).get("_target_")
    if stage == "contrastive":
        from scidiff.training.contrastive import ContrastiveModule

        if cfg.get("contrastive") is None:
            raise ConfigError("contrastive: stage=contrastive needs the encoders (contrastive=conv, or an experiment "
                              "such as experiment=quickstart_contrastive)")
        if cfg.get("latent") is not None or cfg.get("finetune") is not None:
            raise ConfigError("stage: a contrastive encoder is trained on the fields themselves (latent=null, "
                              "finetune=null)")
        if not _subclass(module_target, ContrastiveModule):
            raise ConfigError(f"module: stage=contrastive trains with module=contrastive, got {module_target}")
        return
    if stage == "autoencoder":
        if cfg.get("autoencoder") is None:
            raise ConfigError("autoencoder: stage=autoencoder needs the autoencoder's network (autoencoder=conv, "
                              "or an experiment such as experiment=grf_autoencoder)")
        if cfg.get("latent") is not None:
            raise ConfigError("latent: an autoencoder is trained on the fields themselves; latent is for a diffusion "
                              "run (stage=diffusion)")
        if not _subclass(module_target, AutoencoderModule):
            raise ConfigError(f"module: stage=autoencoder trains with module=autoencoder, got {module_target}")
        return
    for group in ("denoiser", "diffusion"):
        if cfg.get(group) is None:
            raise ConfigError(f"{group}: stage=diffusion needs a {group} (choose one from configs/{group}/)")
    if not _subclass(module_target, DiffusionModule):
        raise ConfigError(f"module: stage=diffusion trains with module=diffusion, got {module_target}"
                          + (" (set stage=autoencoder to train the autoencoder)"
                             if _subclass(module_target, AutoencoderModule) else ""))
    if cfg.get("latent") is not None:
        node = cfg.latent
        if not isinstance(node, DictConfig):
            raise ConfigError(f"latent: expected {{autoencoder: <run or checkpoint>, posterior: mean}}, got {node!r}")
        values = OmegaConf.to_container(node, resolve=True)
        check_dataclass(values, LatentConfig, "latent.")
        if values.get("statistics_samples", 1) < 1:
            raise ConfigError(f"latent.statistics_samples: expected a positive integer, got {values['statistics_samples']}")
        from scidiff.inference.checkpoint import CheckpointError, load_autoencoder

        try:
            load_autoencoder(values["autoencoder"], tracking_uri=values.get("tracking_uri"))
        except CheckpointError as exc:
            raise ConfigError(str(exc)) from None


def check_finetune(cfg: DictConfig) -> None:
    """``finetune``: its keys, the LoRA settings, a readable base checkpoint of a diffusion model."""
    node = cfg.get("finetune")
    if node is None:
        return
    if not isinstance(node, DictConfig):
        raise ConfigError(f"finetune: expected {{base: <run or checkpoint>, method: lora}}, got {node!r}")
    values = OmegaConf.to_container(node, resolve=True)
    check_dataclass(values, FinetuneConfig, "finetune.")
    if cfg.get("stage", "diffusion") != "diffusion" or cfg.get("latent") is not None:
        raise ConfigError("finetune: adapts a field-space diffusion model (stage=diffusion, latent=null)")
    from scidiff.nets.adapters import LoraSpec

    if values.get("method", "lora") == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("finetune.method: lora needs the peft library: pip install 'scidiff[adapt]' "
                              "(or finetune.method=full)") from None
        lora = dict(values.get("lora") or {})
        unknown = sorted(set(lora) - {"rank", "alpha", "dropout", "targets", "train"})
        if unknown:
            raise ConfigError(f"finetune.lora.{unknown[0]}: unknown key (accepted: rank, alpha, dropout, targets, train)")
        try:
            LoraSpec(**lora)
        except (ValueError, TypeError) as exc:
            raise ConfigError(str(exc)) from None
    control = dict(values.get("controlnet") or {})
    unknown = sorted(set(control) - {"hint_channels", "blocks"})
    if unknown:
        raise ConfigError(f"finetune.controlnet.{unknown[0]}: unknown key (accepted: hint_channels, blocks)")
    for key, value in control.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"finetune.controlnet.{key}: expected a positive integer, got {value!r}")
    prior = dict(values.get("prior") or {})
    if values.get("method") == "controlnet" and int(prior.get("count") or 0) > 0:
        raise ConfigError("finetune.prior.count: prior preservation is for method=full|lora; a ControlNet keeps the "
                          "base model frozen (control_scale=0 samples the base), so set finetune.prior.count=0")
    unknown = sorted(set(prior) - {"count", "weight", "steps", "data_path"})
    if unknown:
        raise ConfigError(f"finetune.prior.{unknown[0]}: unknown key (accepted: count, weight, steps, data_path)")
    for key, kind in (("count", int), ("steps", int), ("weight", (int, float))):
        value = prior.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or value < 0
                                  or (key == "steps" and value < 1)):
            raise ConfigError(f"finetune.prior.{key}: expected a {'positive integer' if kind is int else 'number >= 0'}"
                              f", got {value!r}")
    from scidiff.inference.checkpoint import CheckpointError, load_pretrained

    try:
        load_pretrained(values["base"], tracking_uri=values.get("tracking_uri"), key="finetune.base")
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None


def check_resume(cfg: DictConfig) -> None:
    """``resume=<file>``: a readable training checkpoint of the same denoiser."""
    from scidiff.inference.checkpoint import CheckpointError
    from scidiff.training.checkpoint import read_resumable

    try:
        ckpt = read_resumable(cfg.resume)
    except CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    net = {"autoencoder": "autoencoder", "contrastive": "contrastive"}.get(cfg.get("stage"), "denoiser")
    trained_config = (ckpt.get("scidiff") or {}).get("config") or {}
    if trained_config and trained_config.get("stage", "diffusion") != cfg.get("stage", "diffusion"):
        raise ConfigError(f"resume: {cfg.resume} is a stage={trained_config.get('stage', 'diffusion')} run, this is "
                          f"stage={cfg.get('stage', 'diffusion')}; resume with the run's own config")
    trained = trained_config.get(net)
    if cfg.get("finetune") is not None:  # a fine-tuning's denoiser is its base model's, not the config's
        return
    wanted = OmegaConf.to_container(cfg[net], resolve=True)
    if trained is not None and trained != wanted:
        differ = sorted(k for k in set(trained) | set(wanted) if trained.get(k) != wanted.get(k))
        raise ConfigError(f"resume: {cfg.resume} was trained with another {net} ({net}.{differ[0]}: "
                          f"{trained.get(differ[0])!r} there, {wanted.get(differ[0])!r} here); resume with the "
                          "run's own config")


def check_register_model(cfg: DictConfig) -> None:
    """``register_model=<name>``: a model name, an MLflow logger to register in, and a
    checkpoint callback that writes ``last.ckpt`` (the file registered)."""
    name = cfg.get("register_model")
    if name is None:
        return
    if not isinstance(name, str) or not name.strip() or any(c in name for c in "/@"):
        raise ConfigError(f"register_model: expected a model name (no '/' or '@'), got {name!r}")
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import MLFlowLogger

    logger = cfg.get("logger")
    if logger is None or not _subclass(logger.get("_target_"), MLFlowLogger):
        raise ConfigError(f"register_model: {name}: the model registry is MLflow's; needs logger=mlflow "
                          f"(got {'logger=none' if logger is None else logger.get('_target_')})")
    if not any(node is not None and _subclass(node.get("_target_"), ModelCheckpoint) and node.get("save_last")
               for node in (cfg.get("callbacks") or {}).values()):
        raise ConfigError(f"register_model: {name}: no checkpoint callback writes last.ckpt (the file registered); "
                          "keep callbacks.periodic_checkpoint with save_last: true")


def _subclass(target: Any, base: type) -> bool:
    try:
        obj = get_object(str(target))
    except Exception:  # noqa: BLE001 - unknown targets are reported by the target checks
        return False
    return isinstance(obj, type) and issubclass(obj, base)


def check_data_path(cfg: DictConfig) -> None:
    path = cfg.data.get("path")
    if path is None:
        return
    if not Path(path).exists() and not generates(cfg):
        raise ConfigError(f"data.path: dataset {path} does not exist (generate it with scidiff-make-dataset)")
    if not Path(path).exists() and cfg.generate_data.get("kind") == "voxels":
        from scidiff_datasets.voxels import require_rdkit

        try:
            require_rdkit()
        except ModuleNotFoundError as exc:
            raise ConfigError(f"generate_data.kind: {exc}") from None


def generates(cfg: DictConfig) -> bool:
    """Whether the run creates ``data.path`` itself (``generate_data.path`` is that store)."""
    gen = cfg.get("generate_data")
    if gen is None or cfg.data.get("path") is None:
        return False
    return gen.get("path") is None or Path(gen.path).resolve() == Path(cfg.data.path).resolve()
