"""A checkpoint loaded into a ready model: :func:`load_pretrained` -> :class:`Pretrained`.

A scidiff checkpoint (written by ``scidiff-train``) holds everything needed to use
the model without the training data: the resolved config (``checkpoint["scidiff"]
["config"]``), the weights and their EMA copy (``state_dict``), the normalisation
statistics and the dataset's metadata (names, units, coordinates; under the data
module's key). :func:`load_pretrained` rebuilds the denoiser and the diffusion from
the config, loads the EMA weights (or the raw ones when the run had no EMA) and
returns a :class:`Pretrained` that converts between physical and model units.

Checkpoints are read with ``torch.load(weights_only=True)``: nothing in the file can
run code. A checkpoint can also be named in an MLflow store (``tracking_uri``): by its
run, ``runs:/<run_id>[/artifact]`` or a bare 32-character run id (the run's
``checkpoints/last.ckpt`` artifact), or by the model registry,
``models:/<name>/<version>``, ``models:/<name>/latest`` (the highest version) or
``models:/<name>@<alias>`` (a version ``scidiff-train register_model=<name>`` registered:
its source is the run's checkpoint file).

A latent diffusion model's checkpoint also holds its autoencoder and the latent's statistics
(``Pretrained.latent``); :func:`load_autoencoder` reads the checkpoint of an autoencoder run
(``scidiff-train stage=autoencoder``), which :func:`load_pretrained` refuses.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from scidiff.data.dataset import FieldMetadata
from scidiff.data.statistics import Statistics
from scidiff.data.transforms import ChannelTransform
from scidiff.diffusion import GaussianDiffusion
from scidiff.nets.adapters import LoraSpec, apply_lora, load_adapter_state, merge_lora
from scidiff.nets.autoencoder import FieldAutoencoder
from scidiff.nets.execution import Execution
from scidiff.nets.latent import LatentCodec
from scidiff.inference.tracking import (
    MODELS,
    RUNS,
    absolute_tracking_uri,
    default_tracking_uri,
    is_run_id,
    model_version,
    parse_model_uri,
)


class CheckpointError(ValueError):
    """The file is not a usable scidiff checkpoint (the message names the file and why)."""


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (no code runs from the file)."""
    return torch.load(path, map_location=map_location, weights_only=True)


@dataclass
class Pretrained:
    """A trained denoiser with what is needed to use it in physical units.

    Attributes:
        denoiser: the network (EMA weights when the run kept an EMA), in eval mode.
        diffusion: the run's :class:`GaussianDiffusion`.
        metadata: channel/parameter names, units, spatial dims and coordinates.
        statistics: the normalisation statistics of the training split.
        config: the run's resolved config (plain python).
        checkpoint: the checkpoint file read; ``sha256`` its content hash.
        global_step: the training step of the checkpoint.
        weights: ``"ema"`` or ``"raw"``.
        mlflow_run_id, mlflow_tracking_uri: the training run, when it was tracked, and the
            store recorded at training (may be relative to the training's directory:
            :func:`scidiff.inference.tracking.checkpoint_tracking_uri` finds it).
        source_tracking_uri: the MLflow store the checkpoint was downloaded from (``runs:/``,
            ``models:/``, a run id), else ``None``.
        latent: for a latent diffusion model, its :class:`~scidiff.nets.latent.LatentCodec`
            (the frozen autoencoder and the latent's statistics, from the checkpoint); the
            model units are then the normalised latent, and :meth:`to_model` /
            :meth:`to_physical` encode / decode. ``latent_info``: the autoencoder run it came
            from (checkpoint, sha256, MLflow run).
        adapter: the LoRA adapter file merged on the checkpoint (``path``, ``sha256``), else empty.
        control_scale: a ControlNet's conditioning scale (0: the base model), else ``None``.
        execution: how ``denoiser`` runs (:class:`~scidiff.nets.execution.Execution`: precision,
            ``torch.compile``, memory format); ``denoiser`` is then the network wrapped in
            :class:`~scidiff.nets.execution.Accelerated`.
    """

    denoiser: nn.Module
    diffusion: GaussianDiffusion
    metadata: FieldMetadata
    statistics: Statistics
    config: dict[str, Any]
    checkpoint: Path
    sha256: str
    global_step: int
    weights: str
    mlflow_run_id: str | None = None
    mlflow_tracking_uri: str | None = None
    split_indices: Mapping[str, list[int]] = field(default_factory=dict)
    source_tracking_uri: str | None = None
    latent: LatentCodec | None = None
    latent_info: Mapping[str, Any] = field(default_factory=dict)
    adapter: Mapping[str, Any] = field(default_factory=dict)
    control_scale: float | None = None
    execution: Execution = field(default_factory=Execution)

    @property
    def model_identity(self) -> dict[str, Any]:
        """What besides the checkpoint determines the network's output: the adapter file merged
        on it (``adapter_sha256``), a ControlNet's conditioning scale and an arithmetic other than
        float32 (``precision``); empty for a plain checkpoint run in float32 (so its ensembles keep
        their identity)."""
        out: dict[str, Any] = {}
        if self.adapter:
            out["adapter_sha256"] = self.adapter["sha256"]
        if self.control_scale is not None:
            out["control_scale"] = self.control_scale
        return {**out, **self.execution.identity()}

    # -- units ---------------------------------------------------------------------------
    @cached_property
    def x_transform(self) -> ChannelTransform:
        """Physical -> normalised for fields; ``inverse`` and ``log_abs_det_jacobian``. Built once
        (an ``anomaly`` variable holds a mean and a std per grid point)."""
        return self.statistics.x_transform()

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.metadata.param_names)

    @property
    def is_latent(self) -> bool:
        return self.latent is not None

    def to_physical(self, x: Tensor) -> Tensor:
        """Model units (what the denoiser generates: normalised fields ``[B, C, *S]``, or for a
        latent model normalised latents ``[B, L, *S']``, decoded) -> physical fields."""
        if self.latent is not None:
            x = self.latent.decode(x)
        return self.x_transform.inverse(x)

    def to_model(self, x: Tensor) -> Tensor:
        """Physical fields ``[B, C, *S]`` -> model units (normalised; for a latent model,
        encoded with the posterior mean and normalised)."""
        x = self.x_transform(x)
        if self.latent is not None:
            x = self.latent.encode(x.to(torch.float32))
        return x

    def params_to_model(self, params: Tensor) -> Tensor:
        """Physical parameters ``[B, P]`` (order of ``param_names``) -> normalised."""
        names = self.param_names
        if params.ndim != 2 or params.shape[1] != len(names):
            raise ValueError(f"params must be [B, {len(names)}] for {list(names)}, got shape {tuple(params.shape)}")
        return self.statistics.param_transform()(params)

    def param_ranges(self) -> dict[str, tuple[float, float]]:
        """Training range (min, max) of each physical parameter."""
        from scidiff.data.transforms import unwarp

        out = {}
        for s in self.statistics.params:  # the statistics are of the warped values g(x)
            lo, hi = (float(unwarp(torch.tensor(v, dtype=torch.float64), s.pointwise, s.log_offset))
                      for v in (s.min, s.max))
            out[s.name] = (lo, hi)
        return out

    @property
    def field_shape(self) -> tuple[int, ...]:
        """``(C, *S)`` of one field (physical)."""
        return (self.metadata.num_channels, *self.metadata.spatial_shape)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """``(C, *S)`` of what the denoiser generates: a field, or a latent ``(L, *S')``."""
        if self.latent is not None:
            return self.latent.latent_shape(self.metadata.spatial_shape)
        return self.field_shape

    def tracking_uri(self, explicit: str | None = None) -> str:
        """The MLflow store of the training run (``explicit`` when given):
        :func:`scidiff.inference.tracking.checkpoint_tracking_uri`."""
        from scidiff.inference.tracking import checkpoint_tracking_uri

        return checkpoint_tracking_uri(self, explicit)

    def to(self, device: torch.device | str) -> Pretrained:
        self.denoiser.to(device)
        if self.latent is not None:
            self.latent.to(device)
        return self


@dataclass
class TrainedAutoencoder:
    """The first stage of a latent diffusion model, as trained by ``scidiff-train stage=autoencoder``.

    Attributes:
        autoencoder: the :class:`~scidiff.nets.autoencoder.FieldAutoencoder`, eval mode, frozen.
        metadata, statistics: the data it was trained on (its normalisation of the fields).
        config: the run's resolved config; ``net_config`` the autoencoder's own, with its shape.
        checkpoint, sha256, global_step, mlflow_run_id: where it comes from.
    """

    autoencoder: FieldAutoencoder
    metadata: FieldMetadata
    statistics: Statistics
    config: dict[str, Any]
    net_config: dict[str, Any]
    checkpoint: Path
    sha256: str
    global_step: int
    mlflow_run_id: str | None = None

    def check_data(self, metadata: FieldMetadata, what: str = "latent.autoencoder") -> None:
        """Raise ``CheckpointError`` naming ``what`` when the data's variables, rank or grid
        differ from those the autoencoder was trained on."""
        mine = self.metadata
        if tuple(metadata.channel_names) != tuple(mine.channel_names):
            raise CheckpointError(f"{what}: {self.checkpoint} was trained on the variables {list(mine.channel_names)}, "
                                  f"the data has {list(metadata.channel_names)}")
        if len(metadata.spatial_dims) != len(mine.spatial_dims):
            raise CheckpointError(f"{what}: {self.checkpoint} is a {len(mine.spatial_dims)}-D autoencoder "
                                  f"({list(mine.spatial_dims)}), the data is {len(metadata.spatial_dims)}-D "
                                  f"({list(metadata.spatial_dims)})")
        if tuple(metadata.spatial_shape) != tuple(mine.spatial_shape):
            raise CheckpointError(f"{what}: {self.checkpoint} was trained on the grid "
                                  f"{dict(zip(mine.spatial_dims, mine.spatial_shape))}, the data's is "
                                  f"{dict(zip(metadata.spatial_dims, metadata.spatial_shape))}")
        try:
            self.autoencoder.latent_shape(metadata.spatial_shape)
        except ValueError as exc:
            raise CheckpointError(f"{what}: {exc}") from None


def file_sha256(path: str | os.PathLike, chunk: int = 2**22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_checkpoint(ref: str | os.PathLike, tracking_uri: str | None = None,
                       artifact: str = "checkpoints/last.ckpt") -> Path:
    """A checkpoint file from a path, a run directory, ``runs:/<id>[/artifact]``, a run id or
    ``models:/<name>/<version|latest>`` / ``models:/<name>@<alias>`` (module docstring)."""
    return fetch_checkpoint(ref, tracking_uri, artifact)[0]


def sweep_runs(path: str | os.PathLike) -> list[Path] | None:
    """The trained runs (``<i>/checkpoints/``) of a sweep's directory (``scidiff-train -m``: it holds
    ``multirun.yaml``), in the order of their job numbers; ``None`` for any other path."""
    path = Path(path)
    if not (path.is_dir() and (path / "multirun.yaml").is_file()):
        return None
    return sorted((p for p in path.iterdir() if p.name.isdigit() and (p / "checkpoints").is_dir()),
                  key=lambda p: int(p.name))


def fetch_checkpoint(ref: str | os.PathLike, tracking_uri: str | None = None,
                     artifact: str = "checkpoints/last.ckpt") -> tuple[Path, str | None]:
    """:func:`resolve_checkpoint`, with the MLflow store the file came from (``None``: a local file)."""
    text = str(ref)
    path = Path(text)
    if path.is_file():
        return path, None
    if path.is_dir():
        for cand in (path / "checkpoints" / "last.ckpt", path / "last.ckpt"):
            if cand.is_file():
                return cand, None
        runs = sweep_runs(path)
        if runs is not None:
            one = runs[0] if runs else path / "<i>"
            raise CheckpointError(f"checkpoint: {path} is a sweep (scidiff-train -m), not a run: give one of its runs, "
                                  f"e.g. {one} (scidiff-evaluate takes the sweep itself and compares its runs)")
        raise CheckpointError(f"checkpoint: {path} is a directory without checkpoints/last.ckpt")
    run_id = None
    if text.startswith(RUNS):
        rest = text[len(RUNS):].strip("/").split("/", 1)
        run_id = rest[0]
        if len(rest) == 2 and rest[1]:
            artifact = rest[1]
    elif is_run_id(text):
        run_id = text
    elif not text.startswith(MODELS):
        raise CheckpointError(f"checkpoint: {text} does not exist (give a .ckpt file, a run directory, an MLflow "
                              f"run id, runs:/<run_id> or models:/<name>/<version>)")
    else:
        try:
            parse_model_uri(text)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint: {text}: {exc}") from None
    given = tracking_uri or default_tracking_uri()
    uri = absolute_tracking_uri(given)  # the store the file comes from, wherever the command goes on
    what = f"MLflow run {run_id}" if run_id is not None else text
    if given.startswith("sqlite:///") and not Path(given[len("sqlite:///"):]).is_file():
        # opening a missing SQLite store would create an empty one
        raise CheckpointError(f"checkpoint: {what}: no MLflow store {given[len('sqlite:///'):]} "
                              "(set tracking_uri or MLFLOW_TRACKING_URI, or give the checkpoint path)")
    if run_id is None:
        try:
            version, source, run_id = model_version(uri, text)
        except LookupError as exc:
            raise CheckpointError(f"checkpoint: {text}: {exc} in {uri}") from None
        what = f"{text} (version {version})"
        if source.startswith(RUNS):
            run_id, _, artifact = source[len(RUNS):].strip("/").partition("/")
        else:
            return _download(what, uri, artifact_uri=source), uri
    return _download(what, uri, run_id=run_id, artifact_path=artifact), uri


def _download(what: str, uri: str, **where: str) -> Path:
    """An MLflow artifact as a local checkpoint file (a directory: its one ``.ckpt``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    name = where.get("artifact_path") or where.get("artifact_uri")
    try:
        local = Path(mlflow.artifacts.download_artifacts(tracking_uri=uri, **where))
    except (MlflowException, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint: {what} has no artifact {name} in {uri} ({first})") from None
    if local.is_dir():
        found = sorted(local.rglob("*.ckpt"))
        if len(found) != 1:
            raise CheckpointError(f"checkpoint: {what}: the artifact {name} in {uri} is not one .ckpt file")
        local = found[0]
    return local


def _datamodule_state(ckpt: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for key in ("ResumableDataModule", "FieldDataModule"):
        if isinstance(ckpt.get(key), Mapping) and "statistics" in ckpt[key]:
            return ckpt[key]
    for value in ckpt.values():
        if isinstance(value, Mapping) and "statistics" in value and "metadata" in value:
            return value
    return None


# GroupNorm's group size became a key of these networks (``norm_group_channels``, default 4) on
# 2026-12-01; a config written before holds none and its network was trained with
# ``norm_group_channels: 1`` (docs/architecture.md, "Normalisation groups").
_NORM_GROUP_NETS = ("UNet", "FieldAutoencoder")


def as_trained(net_config: Any) -> Any:
    """A network's config from a checkpoint, completed with what its network was trained with:
    ``norm_group_channels: 1`` for a UNet or FieldAutoencoder config written before that key."""
    if isinstance(net_config, Mapping) and "norm_group_channels" not in net_config and \
            str(net_config.get("_target_", "")).rsplit(".", 1)[-1] in _NORM_GROUP_NETS:
        return {**net_config, "norm_group_channels": 1}
    return net_config


def _as_trained_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A run's config with each of its network configs :func:`as_trained`."""
    return {**config, **{k: as_trained(config[k]) for k in ("denoiser", "autoencoder") if config.get(k) is not None}}


def _read(ref: str | os.PathLike, tracking_uri: str | None, key: str = "checkpoint"
          ) -> tuple[Path, str | None, Mapping[str, Any], Mapping[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """``(path, source store, checkpoint, its scidiff info, config, data-module state)`` of a
    checkpoint written by ``scidiff-train``; ``CheckpointError`` starting with ``key`` otherwise."""
    try:
        path, source = fetch_checkpoint(ref, tracking_uri)
    except CheckpointError as exc:
        text = str(exc)
        raise CheckpointError(key + text[len("checkpoint"):] if text.startswith("checkpoint") else text) from None
    try:
        ckpt = safe_torch_load(path)
    except Exception as exc:  # pickle errors, zip errors, weights_only refusals
        raise CheckpointError(f"{key}: {path} is not a readable torch checkpoint ({type(exc).__name__})") from None
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        raise CheckpointError(f"{key}: {path} has no state_dict (not a Lightning checkpoint)")
    info = ckpt.get("scidiff") or {}
    config = info.get("config")
    dm_state = _datamodule_state(ckpt)
    if not isinstance(config, Mapping) or dm_state is None:
        raise CheckpointError(
            f"{key}: {path} was not written by scidiff-train (missing its config or normalisation statistics)"
        )
    return path, source, ckpt, info, _as_trained_config(config), dm_state


def _load_weights(module: nn.Module, state: Mapping[str, Tensor], prefix: str, error: str) -> None:
    """Load the entries of ``state`` under ``prefix`` into ``module`` (strict); ``CheckpointError``
    ``error (<torch's first line>)`` when they do not fit."""
    weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{error} ({str(exc).strip().splitlines()[0]})") from None


def _read_stage(ref: str | os.PathLike, tracking_uri: str | None, key: str, stage: str, otherwise: str):
    """:func:`_read` for a run of ``stage`` (its network config under the same key):
    ``(path, checkpoint, scidiff info, config, data-module state, metadata)``;
    ``CheckpointError`` ``<key>: <path> <otherwise>`` for another stage's checkpoint."""
    path, _, ckpt, info, config, dm_state = _read(ref, tracking_uri, key)
    if config.get("stage") != stage or config.get(stage) is None:
        raise CheckpointError(f"{key}: {path} {otherwise}")
    return path, ckpt, info, config, dm_state, FieldMetadata.from_state(dm_state["metadata"])


def autoencoder_net_config(config: Mapping[str, Any], metadata: FieldMetadata) -> dict[str, Any]:
    """The autoencoder's constructor config with the data's shape (channels, rank)."""
    net = dict(config["autoencoder"])
    net.update(in_channels=metadata.num_channels, dims=len(metadata.spatial_dims))
    return net


def load_autoencoder(ref: str | os.PathLike, *, tracking_uri: str | None = None, device: str | torch.device = "cpu",
                     key: str = "latent.autoencoder") -> TrainedAutoencoder:
    """Load an autoencoder trained with ``scidiff-train stage=autoencoder`` (``ref`` as for
    :func:`load_pretrained`); errors name ``key``."""
    import hydra.utils as hu

    path, ckpt, info, config, dm_state, metadata = _read_stage(
        ref, tracking_uri, key, "autoencoder", "is a diffusion model's checkpoint, not an autoencoder's (train one with "
        "scidiff-train stage=autoencoder, e.g. experiment=grf_autoencoder)")
    net_config = autoencoder_net_config(config, metadata)
    autoencoder = hu.instantiate(net_config)
    _load_weights(autoencoder, ckpt["state_dict"], "autoencoder.", f"{key}: {path}: weights do not fit the configured "
                  "autoencoder")
    autoencoder.to(device).eval().requires_grad_(False)
    return TrainedAutoencoder(
        autoencoder=autoencoder, metadata=metadata, statistics=Statistics.from_state(dm_state["statistics"]),
        config=dict(config), net_config=net_config, checkpoint=path.resolve(), sha256=file_sha256(path),
        global_step=int(ckpt.get("global_step", 0)), mlflow_run_id=info.get("mlflow_run_id"),
    )


@dataclass
class TrainedContrastive:
    """A contrastive field encoder trained by ``scidiff-train stage=contrastive``, used on
    physical inputs (it normalises them with its own run's statistics).

    Attributes:
        encoder: the :class:`~scidiff.nets.contrastive.ContrastiveEncoder`, eval mode, frozen.
        metadata, statistics, config, checkpoint, sha256, mlflow_run_id: where it comes from.
    """

    encoder: nn.Module
    metadata: FieldMetadata
    statistics: Statistics
    config: dict[str, Any]
    checkpoint: Path
    sha256: str
    mlflow_run_id: str | None = None

    def check_model(self, metadata: FieldMetadata, what: str = "fidelity.encoder") -> None:
        """``CheckpointError`` naming ``what`` when a model's variables, grid, parameters or
        embedding differ from those the encoder was trained on."""
        mine = self.metadata
        for label, a, b in (("variables", mine.channel_names, metadata.channel_names),
                            ("grid", dict(zip(mine.spatial_dims, mine.spatial_shape)),
                             dict(zip(metadata.spatial_dims, metadata.spatial_shape))),
                            ("parameters", mine.param_names, metadata.param_names),
                            ("embedding", mine.embedding_names, metadata.embedding_names)):
            if (list(a) if not isinstance(a, dict) else a) != (list(b) if not isinstance(b, dict) else b):
                raise CheckpointError(f"{what}: {self.checkpoint} was trained on the {label} {a if isinstance(a, dict) else list(a)}, "
                                      f"the model has {b if isinstance(b, dict) else list(b)}")

    @torch.no_grad()
    def embed_fields(self, x_phys: Tensor) -> Tensor:
        """Fields ``[N, C, *S]`` in physical units (missing points NaN) -> unit vectors ``[N, D]``."""
        x = self.statistics.x_transform()(x_phys.to(torch.float64)).float()
        x = torch.nan_to_num(x, nan=0.0)
        dev = next(self.encoder.parameters()).device
        return self.encoder.field(x.to(dev)).cpu()

    @torch.no_grad()
    def embed_conditions(self, params_phys: Tensor | None, embedding_phys: Tensor | None) -> Tensor:
        """Physical parameters ``[N, P]`` and/or embedding ``[N, E]`` -> unit vectors ``[N, D]``."""
        from scidiff.conditioning import Conditioning

        dev = next(self.encoder.parameters()).device
        params = None if params_phys is None else self.statistics.param_transform()(params_phys.double()).float()
        emb = None if embedding_phys is None else self.statistics.embedding_transform()(embedding_phys.double()).float()
        cond = Conditioning(params=None if params is None else params.to(dev),
                            embedding=None if emb is None else emb.to(dev))
        return self.encoder.condition(cond).cpu()


def load_contrastive(ref: str | os.PathLike, *, tracking_uri: str | None = None, device: str | torch.device = "cpu",
                     key: str = "fidelity.encoder") -> TrainedContrastive:
    """Load a contrastive encoder trained with ``scidiff-train stage=contrastive`` (``ref`` as for
    :func:`load_pretrained`); errors name ``key``."""
    import hydra.utils as hu

    from scidiff.nets.contrastive import ContrastiveEncoder

    path, ckpt, info, config, dm_state, metadata = _read_stage(
        ref, tracking_uri, key, "contrastive", "is not a contrastive encoder's checkpoint (train one with "
        "scidiff-train stage=contrastive, e.g. experiment=quickstart_contrastive)")
    net = dict(config["contrastive"])
    encoder = ContrastiveEncoder(
        hu.instantiate(dict(net["field"]), in_channels=metadata.num_channels, dims=len(metadata.spatial_dims)),
        hu.instantiate(dict(net["condition"]), num_params=len(metadata.param_names),
                       embedding_dim=metadata.embedding_dim))
    _load_weights(encoder, ckpt["state_dict"], "encoder.", f"{key}: {path}: weights do not fit the configured encoder")
    encoder.to(device).eval().requires_grad_(False)
    return TrainedContrastive(encoder=encoder, metadata=metadata, statistics=Statistics.from_state(dm_state["statistics"]),
                              config=dict(config), checkpoint=path.resolve(), sha256=file_sha256(path),
                              mlflow_run_id=info.get("mlflow_run_id"))


def _latent_codec(path: Path, info: Mapping[str, Any], state: Mapping[str, Tensor]) -> LatentCodec:
    """The latent codec stored in a latent diffusion model's checkpoint."""
    import hydra.utils as hu

    latent = info["latent"]
    codec = LatentCodec(hu.instantiate(dict(as_trained(latent["net_config"]))),
                        posterior=latent.get("posterior", "mean"))
    if not any(k.startswith("latent.autoencoder.") for k in state):
        raise CheckpointError(f"checkpoint: {path} is a latent diffusion model but holds no autoencoder weights "
                              "(latent.autoencoder.*): it cannot decode its samples; use the checkpoint "
                              "scidiff-train wrote")
    _load_weights(codec, state, "latent.", f"checkpoint: {path}: the autoencoder weights do not fit its config")
    if not bool(codec.fitted):
        raise CheckpointError(f"checkpoint: {path}: the latent statistics were never computed")
    return codec


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An adapter file written by a LoRA fine-tuning run: (weights, metadata: ``base_sha256``,
    ``lora`` (the :class:`~scidiff.nets.adapters.LoraSpec`), ``weights``)."""
    import json

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"adapter: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error to the user
        raise CheckpointError(f"adapter: {path} is not a readable safetensors file ({type(exc).__name__})") from None
    if "base_sha256" not in meta or "lora" not in meta:
        raise CheckpointError(f"adapter: {path} was not written by a LoRA fine-tuning run (no base_sha256 / lora)")
    return weights, {**meta, "lora": json.loads(meta["lora"])}


def _add_adapter(denoiser: nn.Module, adapter: str | os.PathLike, base_path: Path) -> dict[str, str]:
    """Put the adapter file on ``denoiser`` (the checkpoint ``base_path``'s); its path and sha256."""
    weights, meta = read_adapter(adapter)
    sha = file_sha256(base_path)
    if meta["base_sha256"] != sha:
        raise CheckpointError(f"adapter: {adapter} was trained on the base checkpoint {meta['base_sha256'][:12]}..., "
                              f"not {base_path} ({sha[:12]}...)")
    try:
        apply_lora(denoiser, LoraSpec(**meta["lora"]))
        load_adapter_state(denoiser, weights)
    except (ImportError, ValueError) as exc:
        raise CheckpointError(f"adapter: {adapter}: {exc}") from None
    return {"path": str(Path(adapter).resolve()), "sha256": file_sha256(adapter)}


def load_pretrained(ref: str | os.PathLike, *, tracking_uri: str | None = None, device: str | torch.device = "cpu",
                    use_ema: bool = True, adapter: str | os.PathLike | None = None,
                    control_scale: float | None = None, key: str = "checkpoint",
                    execution: Execution | Mapping[str, Any] | None = None) -> Pretrained:
    """Load a scidiff checkpoint (see the module docstring for what ``ref`` may be); with
    ``adapter``, a LoRA adapter file (``adapter.safetensors`` of a fine-tuning run) on it,
    checked to have been trained on this very checkpoint (its sha256) and merged. A ControlNet
    (``finetune.method=controlnet``) runs its control branch at ``control_scale`` (``None``: as
    trained, 1; 0: the base model). ``key`` names the setting ``ref`` came from in the errors
    about finding and reading the file. ``execution`` (an :class:`~scidiff.nets.execution.Execution`
    or its config node ``{precision, compile, channels_last}``) says how the denoiser runs.

    Raises:
        CheckpointError: the file is missing, not a checkpoint, or not one written by
            ``scidiff-train`` (no config / statistics); the message names the file.
    """
    import hydra.utils as hu

    try:
        execution = execution if isinstance(execution, Execution) else Execution.from_config(execution)
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    path, source, ckpt, info, config, dm_state = _read(ref, tracking_uri, key)
    if config.get("stage") == "autoencoder":
        raise CheckpointError(f"{key}: {path} is an autoencoder (stage=autoencoder), not a diffusion model; "
                              "give it as latent.autoencoder of a latent diffusion run (e.g. experiment=grf_latent)")
    if config.get("stage") == "contrastive":
        raise CheckpointError(f"{key}: {path} is a contrastive encoder (stage=contrastive), not a diffusion model; "
                              "give it to scidiff-evaluate as fidelity.encoder")
    metadata = FieldMetadata.from_state(dm_state["metadata"])
    statistics = Statistics.from_state(dm_state["statistics"])
    state = ckpt["state_dict"]
    latent = _latent_codec(path, info, state) if info.get("latent") else None
    denoiser = hu.instantiate(
        config["denoiser"],
        in_channels=latent.latent_channels if latent is not None else metadata.num_channels,
        dims=len(metadata.spatial_dims),
        num_params=len(metadata.param_names),
        field_channels=len(metadata.field_names),
        embedding_dim=metadata.embedding_dim,
    )
    diffusion = hu.instantiate(config["diffusion"])
    finetune = info.get("finetune") or {}
    if finetune.get("method") == "lora":  # the base weights and the adapters, merged below
        try:
            apply_lora(denoiser, LoraSpec(**finetune["lora"]))
        except ImportError as exc:
            raise CheckpointError(f"checkpoint: {path} is a LoRA fine-tuned model: {exc}") from None
    control = finetune.get("controlnet") if finetune.get("method") == "controlnet" else None
    if control is not None:  # the base denoiser (without the new fields) inside its ControlNet
        from scidiff.nets.controlnet import ControlNet

        base_net = hu.instantiate(config["denoiser"], in_channels=metadata.num_channels,
                                  dims=len(metadata.spatial_dims), num_params=len(metadata.param_names),
                                  field_channels=len(metadata.field_names) - int(control["control_channels"]),
                                  embedding_dim=metadata.embedding_dim)
        denoiser = ControlNet(base_net, control_channels=int(control["control_channels"]),
                              hint_channels=int(control["hint_channels"]), blocks=control.get("blocks"))
    elif control_scale is not None:
        raise CheckpointError(f"control_scale: {path} is not a ControlNet (fine-tuned with finetune.method="
                              "controlnet); leave control_scale=null")
    if control is not None and control_scale is not None:
        if isinstance(control_scale, bool) or not isinstance(control_scale, (int, float)) or control_scale < 0:
            raise CheckpointError(f"control_scale: expected a number >= 0, got {control_scale!r}")
        denoiser.scale = float(control_scale)
    prefix = "ema.model." if use_ema and any(k.startswith("ema.model.") for k in state) else "denoiser."
    _load_weights(denoiser, state, prefix, f"checkpoint: {path}: weights do not fit the configured denoiser")
    adapter_info: dict[str, Any] = {}
    if adapter is not None:
        adapter_info = _add_adapter(denoiser, adapter, path)
    merge_lora(denoiser)  # a fine-tuned model runs at the base model's speed
    denoiser.to(device).eval().requires_grad_(False)
    if latent is not None:
        latent.to(device).eval().requires_grad_(False)
    try:
        fast = execution.apply(denoiser, len(metadata.spatial_dims))
    except ValueError as exc:
        raise CheckpointError(f"execution.{exc}") from None
    return Pretrained(
        denoiser=fast,
        diffusion=diffusion,
        metadata=metadata,
        statistics=statistics,
        config=dict(config),
        checkpoint=path.resolve(),
        sha256=file_sha256(path),
        global_step=int(ckpt.get("global_step", 0)),
        weights="ema" if prefix == "ema.model." else "raw",
        mlflow_run_id=info.get("mlflow_run_id"),
        mlflow_tracking_uri=info.get("mlflow_tracking_uri"),
        split_indices=dict(dm_state.get("split_indices") or {}),
        source_tracking_uri=source,
        latent=latent,
        latent_info={k: v for k, v in (info.get("latent") or {}).items() if k != "net_config"},
        adapter=adapter_info,
        control_scale=float(denoiser.scale) if control is not None else None,
        execution=execution,
    )


__all__ = ["CheckpointError", "Pretrained", "TrainedAutoencoder", "TrainedContrastive", "autoencoder_net_config",
           "fetch_checkpoint", "file_sha256", "load_autoencoder", "load_contrastive", "load_pretrained", "read_adapter",
           "resolve_checkpoint", "safe_torch_load", "sweep_runs"]
