"""``FieldDataset``: lazy samples of scientific fields from a zarr or netCDF store.

A store holds data variables with *sample dims* (``time``; ``sample``; or
``simulation, time``), *spatial dims* (1-3 of them, in any order in the store:
the config's order is the tensor's order) and maybe *extra dims* (``level``).
A sample is one position on the sample-dim grid; the dataset returns::

    {"x":      [C, *S]  float32, normalised target channels (NaN filled with 0),
     "mask":   [C, *S]  float32, 1 = valid           (only when the data can have NaN),
     "params": [P]      float32, normalised           (only when parameters are configured),
     "fields": [Cf, *S] float32, normalised           (only when fields are configured),
     "embedding": [E]   float32, normalised           (only when an embedding is configured),
     "index":  int64    the sample's flat index in the store}

Channels: each target variable gives one channel, or one per value of its
extra dims (``select={"level": [850, 500]}`` keeps two levels; a scalar drops the
dim). Parameters are data variables or coordinates along (some of) the sample
dims, one number per sample. Conditioning fields are other variables (with the
sample dims, or static maps such as a land-sea mask) or a coarsened copy of the
target (block means, repeated back to full resolution) for downscaling. An *embedding* is
a vector per sample: a variable with the sample dims and one more dim (a molecule's
descriptors or fingerprint, a forcing time series, an encoder's output), each component
normalised like a parameter.

Laziness: the store is opened on first use in each process (DataLoader worker,
DDP rank) and never pickled; a batch is read with one indexed read per variable
(``__getitems__``), so only that batch's chunks are decoded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields as dc_fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import xarray as xr
from torch.utils.data import Dataset

from scidiff.data.statistics import ChannelSpec, PhysicalBlock, Statistics
from scidiff.data.transforms import ChannelTransform, Scaling, TransformName, check_mode, resolve_transform

MaskMode = Literal["auto", "always", "never"]


# --------------------------------------------------------------------------- specs


def _coerce(cls, obj: Any, argument: str):
    """A spec from a name or a mapping (plain dict or OmegaConf DictConfig)."""
    if isinstance(obj, cls):
        return obj
    if isinstance(obj, str):
        return cls(name=obj)
    if isinstance(obj, Mapping):
        known = {f.name for f in dc_fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise ValueError(f"{argument}: unknown keys {unknown}; allowed keys are {sorted(known)}")
        return cls(**{k: _plain(v) for k, v in obj.items()})
    raise ValueError(f"{argument}: expected a name or a mapping, got {obj!r}")


def _plain(v: Any) -> Any:
    """OmegaConf containers -> plain python (without importing omegaconf)."""
    if isinstance(v, Mapping):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)) or type(v).__name__ == "ListConfig":
        return [_plain(x) for x in v]
    return v


@dataclass(frozen=True)
class VariableSpec:
    """A target variable: ``name`` in the store, optional ``.sel`` on extra dims, its transform.

    ``transform``: ``zscore | minmax | log | log1p | none | anomaly`` (``log``/``log1p``
    are followed by a z-score unless ``scaling`` says otherwise; ``anomaly`` is a z-score
    per grid point, also ``scaling: anomaly`` after a ``log``); ``log_offset`` is
    the ``c`` of ``log(x + c)``.
    """

    name: str
    select: Mapping[str, Any] | None = None
    transform: TransformName = "zscore"
    scaling: Scaling | None = None
    log_offset: float = 0.0
    shift: float = 0.0  # with scale: the fixed affine part, y = (g(x) - shift) / scale
    scale: float | None = None

    def __post_init__(self) -> None:
        _check_fixed(self, "variable")


@dataclass(frozen=True)
class ParamSpec:
    """A conditioning parameter: a variable or coordinate with one value per sample."""

    name: str
    transform: TransformName = "zscore"
    scaling: Scaling | None = None
    log_offset: float = 0.0
    shift: float = 0.0  # with scale: the fixed affine part, y = (g(x) - shift) / scale
    scale: float | None = None

    def __post_init__(self) -> None:
        _check_fixed(self, "parameter")


@dataclass(frozen=True)
class EmbeddingSpec(ParamSpec):
    """A conditioning vector: a variable with the sample dims and one more dim (its ``E``
    components), each component normalised as a parameter (``transform``; a component
    constant over the training split is only centred)."""


@dataclass(frozen=True)
class FieldSpec:
    """A conditioning field: a variable (``name``; with the sample dims or static), or,
    with ``coarsen`` (block factors per spatial dim, e.g. ``{lat: 4, lon: 4}``), the
    normalised target averaged over blocks and repeated back to full resolution."""

    name: str | None = None
    select: Mapping[str, Any] | None = None
    transform: TransformName = "zscore"
    scaling: Scaling | None = None
    log_offset: float = 0.0
    shift: float = 0.0  # with scale: the fixed affine part, y = (g(x) - shift) / scale
    scale: float | None = None
    coarsen: Mapping[str, int] | None = None

    def __post_init__(self) -> None:
        if (self.name is None) == (self.coarsen is None):
            raise ValueError(f"a field needs exactly one of 'name' or 'coarsen', got name={self.name!r}, "
                             f"coarsen={self.coarsen!r}")
        _check_fixed(self, "field")


def _check_fixed(spec: Any, kind: str) -> None:
    """Resolve the transform now (bad modes fail at configuration time); ``scale`` means ``fixed``."""
    argument = f"{kind} {spec.name!r} transform"
    if spec.scale is not None:
        if spec.scaling not in (None, "fixed"):
            raise ValueError(f"{kind} {spec.name!r}: scale={spec.scale} is given, so scaling must be 'fixed', "
                             f"not {spec.scaling!r}")
        if not spec.scale > 0:
            raise ValueError(f"{kind} {spec.name!r}: scale must be > 0, got {spec.scale}")
        object.__setattr__(spec, "scaling", "fixed")
    _, scaling = resolve_transform(spec.transform, spec.scaling, argument=argument)
    if scaling == "fixed" and spec.scale is None:
        raise ValueError(f"{kind} {spec.name!r}: scaling 'fixed' needs a scale (and optionally a shift)")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class _Resolved:
    """A spec checked against the store: where its channels come from."""

    name: str
    select: Mapping[str, Any] | None
    sample_dims: tuple[str, ...]  # the sample dims the variable has
    extra_dims: tuple[str, ...]
    spatial_dims: tuple[str, ...]  # () for parameters
    channel_names: tuple[str, ...]
    units: str
    long_name: str
    spec: ChannelSpec  # pointwise/scaling template (name replaced per channel)

    def channel_specs(self) -> list[ChannelSpec]:
        s = self.spec
        return [ChannelSpec(n, s.pointwise, s.scaling, s.log_offset, s.fixed_shift, s.fixed_scale)
                for n in self.channel_names]


@dataclass(frozen=True)
class FieldMetadata:
    """What later stages need to write outputs in physical units.

    ``coords`` holds every coordinate that lies on the spatial dims (e.g. ``lat``,
    ``lon``; also 2-D curvilinear ones), as numpy arrays; ``coord_attrs`` their
    attributes (units, long_name).
    """

    path: str
    sample_dims: tuple[str, ...]
    sample_shape: tuple[int, ...]
    spatial_dims: tuple[str, ...]
    spatial_shape: tuple[int, ...]
    channel_names: tuple[str, ...]
    channel_variables: tuple[str, ...]  # the store variable behind each channel
    units: tuple[str, ...]
    long_names: tuple[str, ...]
    param_names: tuple[str, ...]
    param_units: tuple[str, ...]
    field_names: tuple[str, ...]
    coords: Mapping[str, np.ndarray] = field(default_factory=dict)
    coord_dims: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    coord_attrs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    embedding_names: tuple[str, ...] = ()  # the components of the conditioning vector, ``name[dim=value]``

    @property
    def embedding_dim(self) -> int:
        """``E``, the width of the conditioning vector (0: none)."""
        return len(self.embedding_names)

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def state_dict(self) -> dict[str, Any]:
        """Plain python (JSON-able) state."""
        out = {f.name: getattr(self, f.name) for f in dc_fields(self)}
        out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
        out["coords"] = {k: np.asarray(v).tolist() for k, v in self.coords.items()}
        out["coord_dims"] = {k: list(v) for k, v in self.coord_dims.items()}
        out["coord_attrs"] = {k: {a: _jsonable(b) for a, b in v.items()} for k, v in self.coord_attrs.items()}
        return out

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FieldMetadata:
        kw = dict(state)
        for k in ("sample_dims", "sample_shape", "spatial_dims", "spatial_shape", "channel_names",
                  "channel_variables", "units", "long_names", "param_names", "param_units", "field_names"):
            kw[k] = tuple(kw[k])
        kw["embedding_names"] = tuple(kw.get("embedding_names") or ())
        kw["coords"] = {k: np.asarray(v) for k, v in kw["coords"].items()}
        kw["coord_dims"] = {k: tuple(v) for k, v in kw["coord_dims"].items()}
        return cls(**kw)


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return str(v)


def open_store(path: str | os.PathLike, engine: str | None = None,
               open_kwargs: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Open a zarr or netCDF store lazily (no dask: reads happen on indexing).

    Raises ``FileNotFoundError`` / ``ValueError`` naming the path if it is missing or unreadable.
    """
    text = os.fspath(path)
    remote = "://" in text
    p = Path(text)
    if not remote and not p.exists():
        raise FileNotFoundError(f"data store {text} does not exist")
    if engine is None and (text.rstrip("/").endswith(".zarr") or (not remote and p.is_dir())):
        engine = "zarr"
    try:
        return xr.open_dataset(text, engine=engine, chunks=None, **dict(open_kwargs or {}))
    except Exception as err:  # any backend failure: say which store
        raise ValueError(
            f"cannot open data store {text} (engine={engine or 'auto'}): {type(err).__name__}: {err}"
        ) from err


def _attrs(da: xr.DataArray) -> tuple[str, str]:
    return str(da.attrs.get("units", "")), str(da.attrs.get("long_name", da.attrs.get("standard_name", da.name)))


def _resolve(ds: xr.Dataset, path: str, spec: Any, kind: str, sample_dims: Sequence[str],
             spatial_dims: Sequence[str], require_sample: bool, is_param: bool = False,
             is_vector: bool = False) -> _Resolved:
    if spec.name not in ds.variables:
        raise ValueError(
            f"{kind} {spec.name!r} not found in store {path}; it has data variables {sorted(ds.data_vars)} "
            f"and coordinates {sorted(ds.coords)}"
        )
    da = ds[spec.name]
    select = dict(spec.select) if getattr(spec, "select", None) else None
    if select:
        for dim in select:
            if dim not in da.dims:
                raise ValueError(f"{kind} {spec.name!r}: select on dim {dim!r}, which it lacks (dims {da.dims})")
        try:
            da = da.sel(select)
        except (KeyError, ValueError, IndexError) as err:
            raise ValueError(f"{kind} {spec.name!r}: select {select} failed: {err}") from err
    own_sample = tuple(d for d in sample_dims if d in da.dims)
    if require_sample and len(own_sample) != len(sample_dims):
        missing = [d for d in sample_dims if d not in da.dims]
        raise ValueError(f"{kind} {spec.name!r} lacks the sample dim(s) {missing} (its dims are {da.dims})")
    if is_vector:
        extra = [d for d in da.dims if d not in sample_dims]
        if len(extra) != 1 or any(d in spatial_dims for d in extra):
            raise ValueError(
                f"{kind} {spec.name!r} has dims {tuple(da.dims)}: an embedding needs the sample dims "
                f"{list(sample_dims)} and exactly one more dim (its components), no spatial dim"
            )
        spatial = ()
    elif is_param:
        extra = [d for d in da.dims if d not in sample_dims]
        if extra:
            lengths = {d: int(da.sizes[d]) for d in extra}
            raise ValueError(
                f"{kind} {spec.name!r} has dims {lengths} besides the sample dims "
                f"{ {d: int(ds.sizes[d]) for d in sample_dims} }: a parameter needs exactly one value per "
                f"sample, so its length along the sample dims must match and it may have no other dims"
            )
        spatial: tuple[str, ...] = ()
    else:
        missing = [d for d in spatial_dims if d not in da.dims]
        if missing:
            raise ValueError(
                f"{kind} {spec.name!r} lacks the spatial dim(s) {missing} (its dims are {da.dims}; "
                f"configured spatial dims {list(spatial_dims)})"
            )
        spatial = tuple(spatial_dims)
    extra_dims = tuple(d for d in da.dims if d not in sample_dims and d not in spatial)
    if extra_dims:
        grids = np.meshgrid(*[np.asarray(da[d].values) for d in extra_dims], indexing="ij")
        flat = [g.ravel() for g in grids]
        names = tuple(
            f"{spec.name}[" + ",".join(f"{d}={_fmt(v[i])}" for d, v in zip(extra_dims, flat)) + "]"
            for i in range(flat[0].size)
        )
    else:
        names = (spec.name,)
    if not names:
        raise ValueError(f"{kind} {spec.name!r}: select {select} leaves no channel")
    units, long_name = _attrs(da)
    pointwise, scaling = resolve_transform(spec.transform, spec.scaling, argument=f"{kind} {spec.name!r} transform")
    if scaling == "anomaly" and (is_param or is_vector):
        raise ValueError(f"{kind} {spec.name!r}: transform 'anomaly' standardises each grid point of a field; "
                         f"a {kind} has no grid points: use 'zscore'")
    if scaling == "anomaly" and not own_sample:
        raise ValueError(f"{kind} {spec.name!r} is static (no sample dim {list(sample_dims)}): its anomaly "
                         f"would be 0 everywhere; use 'zscore' or 'none'")
    return _Resolved(spec.name, select, own_sample, extra_dims, spatial, names, units, long_name,
                     ChannelSpec(spec.name, pointwise, scaling, float(spec.log_offset), float(spec.shift),
                                 None if spec.scale is None else float(spec.scale)))


def _fmt(v: Any) -> str:
    v = v.item() if isinstance(v, np.generic) else v
    return f"{v:g}" if isinstance(v, float) else str(v)


def _fingerprint(ds: xr.Dataset, names: Sequence[str]) -> dict[str, tuple]:
    return {n: (tuple(ds[n].dims), tuple(int(s) for s in ds[n].shape)) for n in names if n in ds.variables}


def coarsen_repeat(y: torch.Tensor, valid: torch.Tensor | None, factors: Sequence[int]) -> torch.Tensor:
    """Block means of ``y`` ``[N, C, *S]`` over ``factors`` (one per spatial dim), repeated back
    to ``[N, C, *S]``; with ``valid`` (same shape, 1 = valid) the mean is over valid points
    and a block with none is 0."""
    n, c, *spatial = y.shape
    shape = [n, c]
    for s, f in zip(spatial, factors):
        shape += [s // f, f]
    sum_dims = tuple(3 + 2 * i for i in range(len(spatial)))
    w = torch.ones_like(y) if valid is None else valid.to(y.dtype)
    num = (y * w).reshape(shape).sum(dim=sum_dims)
    den = w.reshape(shape).sum(dim=sum_dims)
    coarse = torch.where(den > 0, num / den.clamp_min(1e-12), torch.zeros_like(num))
    for i, f in enumerate(factors):
        coarse = coarse.repeat_interleave(int(f), dim=2 + i)
    return coarse


# --------------------------------------------------------------------------- dataset


class FieldDataset(Dataset):
    """Samples of the configured variables from a zarr/netCDF store (see module docstring).

    Args:
        path: the store (a ``.zarr`` directory, a netCDF file, or a URL xarray opens).
        variables: target variables: names or :class:`VariableSpec` mappings.
        spatial_dims: the spatial dims, 1-3 names, in the tensor's order.
        sample_dims: the dim(s) indexing samples (``"time"`` or ``["simulation", "time"]``).
        params: conditioning parameters: names or :class:`ParamSpec` mappings.
        fields: conditioning fields: names or :class:`FieldSpec` mappings.
        embedding: a conditioning vector per sample: a name or an :class:`EmbeddingSpec`
            mapping (``None``: none).
        indices: flat sample indices this dataset serves (default: all).
        statistics: normalisation statistics; ``None`` returns physical units (identity).
        mask: ``"auto"`` (a mask iff the statistics saw NaN in the target, or no
            statistics are given), ``"always"`` or ``"never"``; a NaN in a batch without
            a mask raises rather than reach the model.
        engine, open_kwargs: passed to ``xarray.open_dataset``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        variables: Sequence[str | Mapping[str, Any] | VariableSpec],
        spatial_dims: Sequence[str],
        sample_dims: str | Sequence[str] = "sample",
        params: Sequence[str | Mapping[str, Any] | ParamSpec] = (),
        fields: Sequence[str | Mapping[str, Any] | FieldSpec] = (),
        indices: Sequence[int] | np.ndarray | None = None,
        statistics: Statistics | None = None,
        embedding: str | Mapping[str, Any] | EmbeddingSpec | None = None,
        mask: MaskMode = "auto",
        engine: str | None = None,
        open_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        self.engine = engine
        self.open_kwargs = dict(open_kwargs or {})
        self.mask_mode = check_mode(mask, MaskMode, "mask")
        self.sample_dims = (sample_dims,) if isinstance(sample_dims, str) else tuple(sample_dims)
        self.spatial_dims = (spatial_dims,) if isinstance(spatial_dims, str) else tuple(spatial_dims)
        if not 1 <= len(self.spatial_dims) <= 3:
            raise ValueError(f"spatial_dims must name 1-3 dims, got {list(self.spatial_dims)}")
        if not self.sample_dims:
            raise ValueError("sample_dims must name at least one dim")
        overlap = set(self.sample_dims) & set(self.spatial_dims)
        if overlap:
            raise ValueError(f"dims {sorted(overlap)} are both sample and spatial dims")
        variables = [variables] if isinstance(variables, (str, Mapping)) else list(variables)
        if not variables:
            raise ValueError("variables: give at least one target variable")
        self.variable_specs = tuple(_coerce(VariableSpec, v, "variables") for v in variables)
        self.param_specs = tuple(_coerce(ParamSpec, p, "params") for p in (params or ()))
        self.field_specs = tuple(_coerce(FieldSpec, f, "fields") for f in (fields or ()))
        self.embedding_spec = None if embedding is None else _coerce(EmbeddingSpec, embedding, "embedding")

        ds = open_store(self.path, self.engine, self.open_kwargs)
        try:
            self._init_layout(ds)
        finally:
            ds.close()
        n = int(np.prod(self.sample_shape))
        self.indices = np.arange(n, dtype=np.int64) if indices is None else np.asarray(indices, np.int64)
        if self.indices.size and (self.indices.min() < 0 or self.indices.max() >= n):
            raise ValueError(f"indices must lie in [0, {n}) for the store's {n} samples")
        self._ds: xr.Dataset | None = None
        self._pid: int | None = None
        self._static: dict[str, np.ndarray] = {}
        self.set_statistics(statistics)

    # -- layout ------------------------------------------------------------------------

    def _init_layout(self, ds: xr.Dataset) -> None:
        path = self.path
        for d in (*self.sample_dims, *self.spatial_dims):
            if d not in ds.sizes:
                raise ValueError(f"dim {d!r} is not in store {path}; its dims are {dict(ds.sizes)}")
        self.sample_shape = tuple(int(ds.sizes[d]) for d in self.sample_dims)
        self.spatial_shape = tuple(int(ds.sizes[d]) for d in self.spatial_dims)
        self._x = tuple(_resolve(ds, path, s, "variable", self.sample_dims, self.spatial_dims, True)
                        for s in self.variable_specs)
        self._p = tuple(_resolve(ds, path, s, "parameter", self.sample_dims, (), False, is_param=True)
                        for s in self.param_specs)
        self._f = tuple(_resolve(ds, path, s, "field variable", self.sample_dims, self.spatial_dims, False)
                        for s in self.field_specs if s.name is not None)
        self._e = () if self.embedding_spec is None else (
            _resolve(ds, path, self.embedding_spec, "embedding", self.sample_dims, self.spatial_dims, True,
                     is_vector=True),)
        self._coarsen: list[tuple[int, ...]] = []
        for s in self.field_specs:
            if s.coarsen is None:
                continue
            unknown = [d for d in s.coarsen if d not in self.spatial_dims]
            if unknown:
                raise ValueError(f"fields coarsen: dims {unknown} are not spatial dims {list(self.spatial_dims)}")
            factors = tuple(int(s.coarsen.get(d, 1)) for d in self.spatial_dims)
            for d, size, f in zip(self.spatial_dims, self.spatial_shape, factors):
                if f < 1 or size % f:
                    raise ValueError(f"fields coarsen: factor {f} along dim {d!r} does not divide its size {size}")
            self._coarsen.append(factors)
        names = [r.name for r in (*self._x, *self._p, *self._f, *self._e)]
        self._fingerprint = _fingerprint(ds, names)
        self.sample_nbytes = int(4 * sum(len(r.channel_names) for r in self._x) * np.prod(self.spatial_shape))
        coords, cdims, cattrs = {}, {}, {}
        for name, c in ds.coords.items():
            if c.dims and set(c.dims) <= set(self.spatial_dims):
                coords[str(name)] = np.asarray(c.values)
                cdims[str(name)] = tuple(c.dims)
                cattrs[str(name)] = {k: _jsonable(v) for k, v in c.attrs.items()}
        for d in self.spatial_dims:  # a dim without a coordinate gets positions 0..n-1
            if d not in coords:
                coords[d] = np.arange(ds.sizes[d])
                cdims[d] = (d,)
                cattrs[d] = {}
        field_names = [n for r in self._f for n in r.channel_names]
        for factors in self._coarsen:
            tag = "x".join(str(f) for f in factors)
            field_names += [f"{n}@coarse{tag}" for r in self._x for n in r.channel_names]
        self.metadata = FieldMetadata(
            path=path,
            sample_dims=self.sample_dims,
            sample_shape=self.sample_shape,
            spatial_dims=self.spatial_dims,
            spatial_shape=self.spatial_shape,
            channel_names=tuple(n for r in self._x for n in r.channel_names),
            channel_variables=tuple(r.name for r in self._x for _ in r.channel_names),
            units=tuple(r.units for r in self._x for _ in r.channel_names),
            long_names=tuple(r.long_name for r in self._x for _ in r.channel_names),
            param_names=tuple(r.name for r in self._p),
            param_units=tuple(r.units for r in self._p),
            field_names=tuple(field_names),
            coords=coords,
            coord_dims=cdims,
            coord_attrs=cattrs,
            embedding_names=tuple(n for r in self._e for n in r.channel_names),
        )

    def channel_specs(self) -> tuple[list[ChannelSpec], ...]:
        """Channel specs of the target, the parameters, the variable fields and the embedding."""
        return ([c for r in self._x for c in r.channel_specs()],
                [c for r in self._p for c in r.channel_specs()],
                [c for r in self._f for c in r.channel_specs()],
                [c for r in self._e for c in r.channel_specs()])

    # -- statistics and transforms -------------------------------------------------------

    def set_statistics(self, statistics: Statistics | None) -> None:
        """Use ``statistics`` to normalise (``None``: physical units, identity transforms)."""
        x_specs, p_specs, f_specs, e_specs = self.channel_specs()
        if statistics is None:
            self.x_transform = ChannelTransform.identity([c.name for c in x_specs])
            self.param_transform = ChannelTransform.identity([c.name for c in p_specs])
            self.field_transform = ChannelTransform.identity([c.name for c in f_specs])
            self.embedding_transform = ChannelTransform.identity([c.name for c in e_specs])
        else:
            for kind, got, want in (("variable", statistics.x, x_specs), ("parameter", statistics.params, p_specs),
                                    ("field variable", statistics.fields, f_specs),
                                    ("embedding", statistics.embedding, e_specs)):
                got_names, want_names = [c.name for c in got], [c.name for c in want]
                if got_names != want_names:
                    raise ValueError(
                        f"statistics do not match the data: {kind} channels {got_names} in the statistics, "
                        f"{want_names} configured"
                    )
                # an embedding's constant components get 'fixed' scaling: its transforms are not compared
                for g, w in zip(got, want) if kind != "embedding" else ():
                    if (g.pointwise, g.scaling) != (w.pointwise, w.scaling):
                        raise ValueError(
                            f"statistics do not match the data: {kind} {g.name!r} has the transform "
                            f"{g.pointwise}+{g.scaling} in the statistics, {w.pointwise}+{w.scaling} configured "
                            f"(statistics computed for another configuration: delete the file to recompute them)"
                        )
                    if g.scaling == "anomaly" and tuple(g.point_shape or ()) != tuple(self.spatial_shape):
                        raise ValueError(
                            f"statistics do not match the data: {kind} {g.name!r} is normalised per grid point "
                            f"on a grid of shape {tuple(g.point_shape or ())}, the store's is {self.spatial_shape}"
                        )
            self.x_transform = statistics.x_transform()
            self.param_transform = statistics.param_transform()
            self.field_transform = statistics.field_transform()
            self.embedding_transform = statistics.embedding_transform()
        self.statistics = statistics
        if self.mask_mode == "auto":
            self.has_mask = statistics is None or statistics.has_missing
        else:
            self.has_mask = self.mask_mode == "always"

    def subset(self, indices: Sequence[int] | np.ndarray) -> FieldDataset:
        """A copy serving other samples (shares no open handle)."""
        new = object.__new__(FieldDataset)
        new.__dict__.update(self.__getstate__())
        new.indices = np.asarray(indices, np.int64)
        return new

    # -- lazy handle ---------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_ds"], state["_pid"], state["_static"] = None, None, {}
        return state

    def _store(self) -> xr.Dataset:
        """This process's handle, opened on first use and checked against the layout."""
        if self._ds is None or self._pid != os.getpid():
            ds = open_store(self.path, self.engine, self.open_kwargs)
            now = _fingerprint(ds, list(self._fingerprint))
            for name, before in self._fingerprint.items():
                if now.get(name) != before:
                    ds.close()
                    raise RuntimeError(
                        f"data store {self.path} changed since the data module was set up: variable "
                        f"{name!r} had dims/shape {before}, now {now.get(name, 'missing')}"
                    )
            self._ds, self._pid, self._static = ds, os.getpid(), {}
        return self._ds

    def close(self) -> None:
        if self._ds is not None:
            self._ds.close()
        self._ds, self._pid, self._static = None, None, {}

    # -- reading -------------------------------------------------------------------------

    def _read(self, r: _Resolved, comps: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        ds = self._store()
        try:
            da = ds[r.name]
            if r.select:
                da = da.sel(r.select)
            order = (*r.extra_dims, *r.spatial_dims)
            if not r.sample_dims:
                if r.name not in self._static:
                    self._static[r.name] = np.asarray(da.transpose(*order).values)
                arr = np.broadcast_to(self._static[r.name][None], (n, *self._static[r.name].shape))
            elif len(r.sample_dims) == 1:
                d = r.sample_dims[0]
                uniq, inverse = np.unique(comps[d], return_inverse=True)
                arr = np.asarray(da.isel({d: uniq}).transpose(d, *order).values)[inverse]
            else:
                idx = {d: xr.DataArray(comps[d], dims="__sample__") for d in r.sample_dims}
                arr = np.asarray(da.isel(idx).transpose("__sample__", *order).values)
        except Exception as err:
            raise RuntimeError(
                f"reading variable {r.name!r} from data store {self.path} failed for samples "
                f"{np.unique(np.ravel_multi_index([comps[d] for d in self.sample_dims], self.sample_shape))[:8].tolist()}"
                f": {type(err).__name__}: {err} (was the store changed or removed while in use?)"
            ) from err
        spatial = tuple(arr.shape[1 + len(r.extra_dims):])
        return arr.reshape(n, -1, *spatial)

    def read_physical(self, flat_indices: Sequence[int] | np.ndarray) -> PhysicalBlock:
        """Samples ``flat_indices`` in physical units, in the given order (NaN = missing)."""
        idx = np.asarray(flat_indices, np.int64).reshape(-1)
        n = idx.size
        comps = dict(zip(self.sample_dims, np.unravel_index(idx, self.sample_shape)))
        x = np.concatenate([self._read(r, comps, n) for r in self._x], axis=1)
        params = np.concatenate([self._read(r, comps, n) for r in self._p], axis=1) if self._p else None
        fields = np.concatenate([self._read(r, comps, n) for r in self._f], axis=1) if self._f else None
        embedding = self._read(self._e[0], comps, n) if self._e else None
        return PhysicalBlock(x=x, params=params, fields=fields, embedding=embedding)

    def read_params(self, flat_indices: Sequence[int] | np.ndarray) -> torch.Tensor | None:
        """The normalised parameters ``[N, P]`` of samples ``flat_indices`` without reading their
        fields (``None`` when the data set has no parameters)."""
        if not self._p:
            return None
        idx = np.asarray(flat_indices, np.int64).reshape(-1)
        comps = dict(zip(self.sample_dims, np.unravel_index(idx, self.sample_shape)))
        phys = np.concatenate([self._read(r, comps, idx.size) for r in self._p], axis=1)
        return self.param_transform(torch.from_numpy(np.ascontiguousarray(phys, dtype=np.float32)))

    def read_batch(self, flat_indices: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """A normalised batch (the dict of the module docstring, batched) for ``flat_indices``."""
        idx = np.asarray(flat_indices, np.int64).reshape(-1)
        phys = self.read_physical(idx)
        x = torch.from_numpy(np.ascontiguousarray(phys.x, dtype=np.float32))
        missing = torch.isnan(x)
        if not self.has_mask and missing.any():
            bad = [n for c, n in enumerate(self.x_transform.names) if missing[:, c].any()]
            raise ValueError(
                f"variable(s) {bad} have missing (NaN) values in samples {idx[missing.flatten(1).any(1).numpy()][:8].tolist()} "
                f"but this data has no mask (mask={self.mask_mode!r}; 'auto' found no NaN in the training split): "
                f"set mask='always' so they are masked out of the loss"
            )
        y = self.x_transform(x)
        broken = ~torch.isfinite(y) & ~missing
        if broken.any():
            bad = [n for c, n in enumerate(self.x_transform.names) if broken[:, c].any()]
            raise ValueError(f"variable(s) {bad}: values outside their transform's domain in samples "
                             f"{idx[broken.flatten(1).any(1).numpy()][:8].tolist()}")
        y = torch.where(missing, torch.zeros((), dtype=y.dtype), y)
        out: dict[str, torch.Tensor] = {"x": y}
        if self.has_mask:
            out["mask"] = (~missing).to(torch.float32)
        if phys.params is not None:
            p = self.param_transform(torch.from_numpy(np.ascontiguousarray(phys.params, dtype=np.float32)))
            if not torch.isfinite(p).all():
                bad = [n for c, n in enumerate(self.param_transform.names) if not torch.isfinite(p[:, c]).all()]
                raise ValueError(f"parameter(s) {bad} are missing or invalid in samples {idx[:8].tolist()}")
            out["params"] = p
        cond = []
        if phys.fields is not None:
            f = self.field_transform(torch.from_numpy(np.ascontiguousarray(phys.fields, dtype=np.float32)))
            cond.append(torch.nan_to_num(f, nan=0.0, posinf=0.0, neginf=0.0))
        for factors in self._coarsen:
            cond.append(coarsen_repeat(y, out.get("mask"), factors))
        if cond:
            out["fields"] = torch.cat(cond, dim=1)
        if phys.embedding is not None:
            e = self.embedding_transform(torch.from_numpy(np.ascontiguousarray(phys.embedding, dtype=np.float32)))
            if not torch.isfinite(e).all():
                bad = [n for c, n in enumerate(self.embedding_transform.names) if not torch.isfinite(e[:, c]).all()]
                raise ValueError(f"embedding component(s) {bad[:4]} are missing or invalid in samples {idx[:8].tolist()}")
            out["embedding"] = e
        out["index"] = torch.from_numpy(idx.copy())
        return out

    def __len__(self) -> int:
        return int(self.indices.size)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.read_batch(self.indices[[i]])
        return {k: v[0] for k, v in batch.items()}

    def __getitems__(self, positions: Sequence[int]) -> list[dict[str, torch.Tensor]]:
        """One read per variable for a whole batch (used by ``DataLoader`` automatically)."""
        batch = self.read_batch(self.indices[np.asarray(positions, np.int64)])
        keys = list(batch)
        return [dict(zip(keys, vals)) for vals in zip(*(batch[k].unbind(0) for k in keys))]
