"""Spatial condition fields for a checkpoint, read from a zarr or netCDF store in physical units.

A model trained with ``data.fields`` is conditioned on ``Cf`` field channels
(``metadata.field_names``), built in training by :class:`scidiff.data.FieldDataset`:

* a *field variable* (``{name: sst, transform: zscore}``): the store variable,
  normalised with the checkpoint's field statistics, NaN (e.g. sst over land)
  filled with 0 *after* normalising; a variable without the sample dim (a static
  map such as ``land_sea_mask``) is the same for every sample;
* a *coarsened target* (``{coarsen: {lat: 4, lon: 4}}``, channel ``tas@coarse4x4``):
  the normalised target block-averaged over valid points and repeated back to the
  full grid (:func:`scidiff.data.dataset.coarsen_repeat`).

:func:`condition_fields` repeats exactly that from physical inputs: field variables
and, for the coarsened channels, the *fine* target variable they are derived from
(``tas`` on the model's grid). A target given on the coarse grid itself (each
spatial size divided by the coarsening factors; one coarsening in the model) is
repeated to the fine grid first -- its block means are then its own values, so a
coarse model's output downscales directly.

:class:`StoreReader` reads such variables from an opened store: the model's
spatial dims (any order in the file), optional *sample dims* (all flattened, C
order, into one sample axis; a variable lacking some of them is broadcast), and
extra dims selected as the training spec did (``select``), each selected value
one channel. ``scidiff-sample`` (``conditions.path``, :func:`load_conditions`)
and ``scidiff-invert`` (``input``) both read through it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


class ConditionError(ValueError):
    """Condition inputs that do not fit the checkpoint; the message names the key, file and variable."""


def coarsen_factors(name: str) -> tuple[str, tuple[int, ...]] | None:
    """``("tas", (4, 4))`` for the coarsened-target channel ``tas@coarse4x4``; ``None`` otherwise."""
    base, sep, tag = name.partition("@coarse")
    if not sep:
        return None
    return base, tuple(int(f) for f in tag.split("x"))


def _specs(pretrained, kind: str) -> list[dict[str, Any]]:
    """The checkpoint's ``data.variables`` / ``data.fields`` entries as ``{name, select}`` dicts."""
    data = pretrained.config.get("data") or {}
    out = []
    for spec in data.get(kind) or ():
        if isinstance(spec, str):
            out.append({"name": spec, "select": None})
        elif isinstance(spec, Mapping) and spec.get("name") is not None:
            out.append({"name": str(spec["name"]), "select": spec.get("select")})
    return out


class StoreReader:
    """Variables of an opened store as ``[N, k, *S]`` float32 arrays for a checkpoint's grid.

    Args:
        ds: the opened ``xarray.Dataset`` (the caller closes it).
        path: the store, for messages.
        key: the config key the store came from (``conditions.path``, ``input``), for messages.
        metadata: the checkpoint's :class:`FieldMetadata` (spatial dims and shape).
        sample_dims: the dims that index samples, in flattening order; those present
            in the store are used (none: one sample).
    """

    def __init__(self, ds, path: str | os.PathLike, key: str, metadata, sample_dims: Sequence[str]) -> None:
        self.ds = ds
        self.path = str(path)
        self.key = key
        self.spatial = tuple(metadata.spatial_dims)
        self.spatial_shape = tuple(int(s) for s in metadata.spatial_shape)
        self.sample_dims = tuple(d for d in dict.fromkeys(sample_dims) if d in ds.dims)
        self.sample_shape = tuple(int(ds.sizes[d]) for d in self.sample_dims)
        self.num_samples = int(np.prod(self.sample_shape)) if self.sample_dims else 1

    def _where(self) -> str:
        return f"{self.key}: {self.path}"

    def require(self, name: str, what: str) -> None:
        if name not in self.ds.variables:
            raise ConditionError(f"{self._where()} lacks the variable {name!r} ({what}; it has "
                                 f"{sorted(map(str, self.ds.data_vars))})")

    def _expand(self, da):
        """``da`` with every sample dim (broadcast where it lacks one), sample dims first."""
        missing = {d: self.ds.sizes[d] for d in self.sample_dims if d not in da.dims}
        if missing:
            da = da.expand_dims(missing)
        return da

    def field(self, name: str, *, what: str, select: Mapping[str, Any] | None = None, channels: int | None = None,
              static_ok: bool = True, coarse: tuple[int, ...] | None = None) -> np.ndarray:
        """Variable ``name`` as ``[N, k, *S]`` float32 (``k`` channels from its extra dims).

        Args:
            what: what the variable is for (in messages).
            select: the training spec's ``select`` on extra dims.
            channels: the number of channels expected (checked when given).
            static_ok: whether a variable without the sample dims may serve every sample.
            coarse: coarsening factors: the variable may also lie on the grid divided by
                them, and is then repeated back to the model's grid.
        """
        self.require(name, what)
        da = self.ds[name]
        if select:
            bad = [d for d in select if d not in da.dims]
            if bad:
                raise ConditionError(f"{self._where()}: {name} lacks the dim(s) {bad} the checkpoint selects "
                                     f"{dict(select)} on (its dims {tuple(da.dims)})")
            try:
                da = da.sel(dict(select))
            except (KeyError, ValueError, IndexError) as exc:
                raise ConditionError(f"{self._where()}: {name}: select {dict(select)} failed ({exc})") from None
        lacking = [d for d in self.spatial if d not in da.dims]
        if lacking:
            raise ConditionError(f"{self._where()}: {name} has dims {tuple(da.dims)}, lacking the model's spatial "
                                 f"dim(s) {lacking}")
        if not static_ok and self.sample_dims and not set(self.sample_dims) <= set(da.dims):
            raise ConditionError(f"{self._where()}: {name} lacks the sample dim(s) "
                                 f"{[d for d in self.sample_dims if d not in da.dims]} the other variables have")
        extra = tuple(d for d in da.dims if d not in self.spatial and d not in self.sample_dims)
        got = tuple(int(da.sizes[d]) for d in self.spatial)
        coarse_shape = None if coarse is None else tuple(s // f for s, f in zip(self.spatial_shape, coarse))
        if got != self.spatial_shape and got != coarse_shape:
            expected = _shape(self.spatial, self.spatial_shape)
            if coarse_shape is not None:
                expected += f" (or the coarse grid {_shape(self.spatial, coarse_shape)})"
            raise ConditionError(f"{self._where()}: {name} has spatial shape {_shape(self.spatial, got)}, "
                                 f"the model's is {expected}")
        da = self._expand(da).transpose(*self.sample_dims, *extra, *self.spatial)
        arr = np.asarray(da.values, dtype=np.float32).reshape(self.num_samples, -1, *got)
        if channels is not None and arr.shape[1] != channels:
            raise ConditionError(f"{self._where()}: {name} gives {arr.shape[1]} channel(s) over its extra dims "
                                 f"{extra}; the checkpoint has {channels} (select {dict(select or {})})")
        if got != self.spatial_shape:  # a coarse-grid field, repeated to the model's grid
            for i, f in enumerate(coarse):
                arr = np.repeat(arr, f, axis=2 + i)
        return arr

    def vectors(self, name: str, *, what: str, width: int) -> np.ndarray:
        """Variable ``name`` with one vector of ``width`` components per sample (its one dim besides
        the sample dims; a variable without the sample dims serves every sample): ``[N, width]``."""
        self.require(name, what)
        da = self.ds[name]
        extra = [d for d in da.dims if d not in self.sample_dims]
        if len(extra) != 1:
            raise ConditionError(f"{self._where()}: {name} ({what}) has dims {tuple(da.dims)}; expected the sample "
                                 f"dims {self.sample_dims} and one dim of {width} components")
        if int(da.sizes[extra[0]]) != width:
            raise ConditionError(f"{self._where()}: {name} ({what}) has {int(da.sizes[extra[0]])} components along "
                                 f"{extra[0]!r}; the checkpoint takes {width}")
        da = self._expand(da).transpose(*self.sample_dims, extra[0])
        return np.asarray(da.values, dtype=np.float64).reshape(self.num_samples, width)

    def scalars(self, name: str, *, what: str) -> np.ndarray:
        """Variable or coordinate ``name`` with one value per sample: ``[N]`` float64."""
        self.require(name, what)
        da = self.ds[name]
        extra = [d for d in da.dims if d not in self.sample_dims]
        if extra:
            raise ConditionError(f"{self._where()}: {name} ({what}) has dims {tuple(da.dims)}; expected a "
                                 f"subset of the sample dims {self.sample_dims}")
        da = self._expand(da).transpose(*self.sample_dims)
        return np.asarray(da.values, dtype=np.float64).reshape(self.num_samples)

    def sample_coords(self) -> dict[str, tuple[np.ndarray, dict[str, Any]]]:
        """Every coordinate along (some of) the sample dims, one value per flattened sample."""
        out = {}
        for name, c in self.ds.coords.items():
            if not c.dims or not set(c.dims) <= set(self.sample_dims):
                continue
            values = np.asarray(self._expand(c.variable.to_base_variable()).transpose(*self.sample_dims).values)
            out[str(name)] = (values.reshape(self.num_samples), dict(c.attrs))
        return out


def extra_dims(channel_names: Sequence[str]) -> set[str]:
    """The extra dims behind channel names such as ``ta[level=850]`` (FieldDataset's naming)."""
    out = set()
    for name in channel_names:
        head, sep, rest = name.partition("[")
        if sep and rest.endswith("]"):
            out |= {part.partition("=")[0] for part in rest[:-1].split(",")}
    return out


def _shape(dims: Sequence[str], shape: Sequence[int]) -> str:
    return "(" + ", ".join(f"{d}={s}" for d, s in zip(dims, shape)) + ")"


def condition_fields(pretrained, variables: Tensor | None, target: Tensor | None) -> Tensor:
    """The model's condition fields ``[N, Cf, *S]`` (model units, float32) as training built them.

    Args:
        pretrained: the checkpoint (:class:`scidiff.training.pretrained.Pretrained`).
        variables: the field variables ``[N, Cv, *S]`` in physical units, channels in the
            order of ``pretrained.statistics.fields`` (NaN allowed: 0 after normalising);
            ``None`` when the model has none.
        target: the fine target ``[N, C, *S]`` in physical units (NaN = missing) that the
            coarsened channels are block means of; ``None`` when the model has none.
    """
    meta = pretrained.metadata
    by_name: dict[str, Tensor] = {}
    if pretrained.statistics.fields:
        if variables is None:
            names = [c.name for c in pretrained.statistics.fields]
            raise ValueError(f"the checkpoint needs the field variables {names}")
        model = pretrained.statistics.field_transform()(variables.to(torch.float32))
        model = torch.nan_to_num(model, nan=0.0, posinf=0.0, neginf=0.0)  # as FieldDataset.read_batch
        by_name = {c.name: model[:, i] for i, c in enumerate(pretrained.statistics.fields)}
    coarse: dict[tuple[int, ...], Tensor] = {}
    channels = []
    for name in meta.field_names:
        if name in by_name:
            channels.append(by_name[name])
            continue
        parsed = coarsen_factors(name)
        if parsed is None or parsed[0] not in meta.channel_names:
            raise ValueError(f"checkpoint: conditioning field {name!r} is neither a field variable nor a "
                             f"coarsened channel")
        base, factors = parsed
        if target is None:
            raise ValueError(f"the checkpoint's field {name!r} needs the target {base!r}")
        if factors not in coarse:
            from scidiff.data.dataset import coarsen_repeat

            valid = torch.isfinite(target)
            y = pretrained.x_transform(target.to(torch.float32))  # the fields' units, also for a latent model
            y = torch.where(valid, y, torch.zeros((), dtype=y.dtype))
            coarse[factors] = coarsen_repeat(y, valid.to(y.dtype), factors)
        channels.append(coarse[factors][:, meta.channel_names.index(base)])
    return torch.stack(channels, dim=1).to(torch.float32)


def embedding_variable(pretrained) -> str | None:
    """The store variable the checkpoint's embedding was read from in training (``data.embedding``)."""
    spec = (pretrained.config.get("data") or {}).get("embedding")
    if spec is None or not pretrained.metadata.embedding_names:
        return None
    return str(spec if isinstance(spec, str) else spec["name"])


def read_embedding(reader: StoreReader, pretrained, name: str | None = None) -> Tensor | None:
    """The checkpoint's embedding ``[N, E]`` in model units (normalised as in training), read from
    ``name`` (default: the training's variable); ``None`` when the checkpoint takes none."""
    meta = pretrained.metadata
    if not meta.embedding_names:
        return None
    name = name or embedding_variable(pretrained)
    phys = reader.vectors(name, what="the checkpoint's embedding", width=meta.embedding_dim)
    if not np.isfinite(phys).all():
        bad = sorted({int(i) for i in np.argwhere(~np.isfinite(phys))[:, 0]})[:8]
        raise ConditionError(f"{reader.key}: {reader.path}: {name} has missing or infinite components in samples {bad}")
    model = pretrained.statistics.embedding_transform()(torch.from_numpy(phys))
    return model.to(torch.float32)


def read_condition_inputs(reader: StoreReader, pretrained, *,
                          target: bool = True) -> tuple[Tensor | None, Tensor | None]:
    """``(variables, target)`` in physical units for :func:`condition_fields`, read with ``reader``:
    the field variables of the checkpoint (its ``data.fields`` names and selections) and, when
    it has coarsened channels and ``target`` is true, the target variables they are derived from."""
    meta = pretrained.metadata
    stats_names = [c.name for c in pretrained.statistics.fields]
    variables = None
    if stats_names:
        arrays = []
        for spec in _specs(pretrained, "fields"):
            n = sum(1 for s in stats_names if s == spec["name"] or s.startswith(spec["name"] + "["))
            arrays.append(reader.field(spec["name"], what="condition field of the checkpoint", select=spec["select"],
                                       channels=n))
        variables = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays, axis=1)))
        if variables.shape[1] != len(stats_names):
            raise ConditionError(f"{reader.key}: {reader.path} gives {variables.shape[1]} field channels, the "
                                 f"checkpoint's are {stats_names}")
    fine = None
    factors = {f for name in meta.field_names if (f := coarsen_factors(name)) is not None}
    if factors and target:
        only = next(iter(factors))[1] if len(factors) == 1 else None
        arrays = []
        for spec in _specs(pretrained, "variables"):
            n = sum(1 for v in meta.channel_variables if v == spec["name"])
            arrays.append(reader.field(spec["name"], what="the fine field the checkpoint's coarse condition "
                                       f"{sorted(n for n in meta.field_names if '@coarse' in n)} is derived from",
                                       select=spec["select"], channels=n, coarse=only))
        fine = torch.from_numpy(np.ascontiguousarray(np.concatenate(arrays, axis=1)))
    return variables, fine


# ------------------------------------------------------------- scidiff-sample
@dataclass(frozen=True)
class Conditions:
    """Condition inputs for ``scidiff-sample``, one row per input sample.

    Attributes:
        fields: ``[Nc, Cf, *S]`` float32, model units (what the denoiser sees); ``None`` for a
            checkpoint conditioned on an embedding only.
        embedding: ``[Nc, E]`` float32, model units, or ``None``.
        params: ``{name: [Nc] float64}``: the checkpoint's parameters found in the store
            (physical units; empty when it holds none).
        coords: the store's coordinates along its sample dims, ``{name: ([Nc] values, attrs)}``.
        sample_dims: the store's sample dims (flattened in this order), ``()`` for static maps only.
        path: the store; ``sha256``: hash of the arrays read and the sample coordinates.
    """

    fields: Tensor | None
    params: Mapping[str, np.ndarray]
    coords: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]]
    sample_dims: tuple[str, ...]
    path: str
    sha256: str
    embedding: Tensor | None = None

    def __len__(self) -> int:
        return int((self.fields if self.fields is not None else self.embedding).shape[0])


def load_conditions(path: str | os.PathLike, pretrained, *, isel: Mapping[str, Any] | None = None,
                    key: str = "conditions.path", embedding: str | None = None) -> Conditions:
    """Read the checkpoint's condition fields, its embedding (from the variable ``embedding``,
    default the training's) and any of its parameters from ``path``.

    The sample dims are the dims of the variables read other than the spatial dims and
    the training data's extra (channel) dims, e.g. ``sample``, ``time`` or ``(simulation,
    time)``, flattened in C order; ``isel`` (``{dim: index or [indices]}``) picks samples first.
    """
    from scidiff.data.dataset import open_store

    meta = pretrained.metadata
    if not meta.field_names and not meta.embedding_names:
        raise ConditionError(f"conditions: the checkpoint {pretrained.checkpoint} is not conditioned on fields or an "
                             f"embedding (its conditions: {list(meta.param_names) or 'none'}); remove conditions")
    text = os.fspath(path)
    if "://" not in text and not Path(text).exists():
        raise ConditionError(f"{key}: {text} does not exist")
    try:
        ds = open_store(text)
    except (FileNotFoundError, ValueError) as exc:
        raise ConditionError(f"{key}: {exc}") from None
    try:
        if isel:
            bad = [d for d in isel if d not in ds.dims]
            if bad:
                raise ConditionError(f"conditions.isel: {text} has no dim(s) {bad} (its dims {dict(ds.sizes)})")
            try:
                ds = ds.isel({d: (list(v) if isinstance(v, (list, tuple)) else int(v)) for d, v in isel.items()})
            except (IndexError, TypeError, ValueError) as exc:
                raise ConditionError(f"conditions.isel: {dict(isel)} does not index {text} ({exc})") from None
        # sample dims: every dim of the variables read that is neither spatial nor an extra dim of the
        # training data (a selected level, ...): sample, time, or (simulation, time), in the file's order
        names = [c["name"] for c in _specs(pretrained, "fields")] + list(meta.param_names)
        if any(coarsen_factors(n) for n in meta.field_names):
            names += list(meta.channel_variables)
        vector = (embedding or embedding_variable(pretrained)) if meta.embedding_names else None
        skip = {*meta.spatial_dims, *extra_dims([*meta.channel_names, *(c.name for c in pretrained.statistics.fields)])}
        sample_dims = [d for n in names if n in ds.variables for d in ds[n].dims if d not in skip]
        if vector is not None and vector in ds.variables:  # its component dim: the training's name, else its last
            dims = ds[vector].dims
            named = extra_dims(meta.embedding_names) & set(dims)
            component = next(iter(named)) if named else dims[-1]
            sample_dims += [d for d in dims if d != component and d not in skip]
        reader = StoreReader(ds, text, key, meta, sample_dims)
        variables, target = read_condition_inputs(reader, pretrained) if meta.field_names else (None, None)
        vectors = read_embedding(reader, pretrained, vector) if vector is not None else None
        params = {p: reader.scalars(p, what=f"parameter {p} of the checkpoint")
                  for p in meta.param_names if p in ds.variables}
        coords = reader.sample_coords()
    finally:
        ds.close()
    h = hashlib.sha256()
    for label, arr in (("variables", variables), ("target", target), ("embedding", vectors)):
        if arr is not None:
            h.update(f"{label}{tuple(arr.shape)}".encode())
            h.update(arr.numpy().tobytes())
    for name in sorted(params):
        h.update(f"param:{name}".encode())
        h.update(params[name].tobytes())
    for name in sorted(coords):
        values = coords[name][0]
        h.update(f"coord:{name}:{values.dtype}".encode())
        if values.dtype.kind in "OUS":  # strings: their text (object arrays' bytes are pointers)
            h.update("\x00".join(map(str, values.tolist())).encode())
        else:
            h.update(np.ascontiguousarray(values).tobytes())
    fields = None
    if meta.field_names:
        with torch.no_grad():
            fields = condition_fields(pretrained, variables, target)
    return Conditions(fields=fields, params=params, coords=coords, sample_dims=reader.sample_dims,
                      path=str(Path(text).resolve()) if "://" not in text else text, sha256=h.hexdigest(),
                      embedding=vectors)


__all__ = [
    "ConditionError",
    "Conditions",
    "StoreReader",
    "coarsen_factors",
    "embedding_variable",
    "read_embedding",
    "condition_fields",
    "load_conditions",
    "read_condition_inputs",
]
