"""The zarr ensemble store (docs/architecture.md#ensemble-output).

Layout, for ``N`` parameter sets and ``M`` members per set::

    <variable>(sample, member, *spatial)  float32, physical units; one per channel,
                                          attrs units / long_name; NaN until written
    done(sample, member)                  bool, True once the member's data is on disk
    sample(sample), member(member)        0..N-1, 0..M-1
    <parameter>(sample)                   coordinate, physical units (attrs units)
    <input coordinate>(sample)            with condition fields: the condition input's
                                          coordinates along its sample dims (e.g. time)
                                          and condition_index, its row for each sample
    seed(sample, member)                  coordinate, the member's random seed
    <spatial coords>                      e.g. lat(lat), lon(lon), y, x, or 2-D curvilinear

Attributes: ``sample_config`` (the resolved sample config, JSON), ``identity``
(JSON of what determines the members' values) and ``identity_sha256``,
``checkpoint`` and ``checkpoint_sha256``, ``scidiff_version``.

The store is created once (metadata, coordinates, seeds; the data arrays stay
unwritten) with xarray, so ``xarray.open_zarr`` opens it at any time. Members are
written with zarr directly: every data chunk holds exactly one member
(``(1, 1, *S)``) and ``done`` is chunked ``(1, 1)``, so concurrent ranks never write
the same chunk, and a member's ``done`` flag is written only after all its
variables are.

A store is created under a temporary name and renamed into place, so a path
either holds a complete empty store or nothing: a crash during creation cannot
leave a store that looks like a run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scidiff.data.atomic import atomic_path
from scidiff.data.dataset import FieldMetadata
from scidiff.sampling.grid import ParameterSets

KIND = "scidiff-ensemble"
RESERVED = ("sample", "member", "seed", "done")


class StoreError(ValueError):
    """An output path that cannot be used (the message names it and says why)."""


def canonical_json(obj: Any) -> str:
    """Key-sorted compact JSON (the form that is hashed)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def identity_sha256(identity: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(identity).encode()).hexdigest()


def is_ensemble_store(path: str | os.PathLike) -> bool:
    try:
        import zarr

        return zarr.open_group(str(path), mode="r").attrs.get("scidiff_kind") == KIND
    except Exception:  # not zarr, missing, unreadable
        return False


@dataclass(frozen=True)
class EnsembleStore:
    """An ensemble store on disk (open it with :meth:`open` or :func:`create_store`)."""

    path: Path
    variables: tuple[str, ...]
    num_samples: int
    num_members: int
    attrs: Mapping[str, Any]

    @classmethod
    def open(cls, path: str | os.PathLike) -> EnsembleStore:
        import zarr

        path = Path(path)
        if not is_ensemble_store(path):
            raise StoreError(f"out: {path} is not a scidiff ensemble store")
        group = zarr.open_group(str(path), mode="r")
        attrs = dict(group.attrs)
        done = group["done"]
        return cls(path=path, variables=tuple(attrs["variables"]), num_samples=done.shape[0],
                   num_members=done.shape[1], attrs=attrs)

    @property
    def identity_sha256(self) -> str:
        return str(self.attrs["identity_sha256"])

    @property
    def identity(self) -> dict[str, Any]:
        return json.loads(self.attrs["identity"])

    def done(self) -> np.ndarray:
        """``[N, M]`` bool: which members are completely written."""
        import zarr

        return np.asarray(zarr.open_group(str(self.path), mode="r")["done"][...], dtype=bool)

    def write_members(self, samples: Sequence[int], members: Sequence[int], data: np.ndarray) -> None:
        """Write members ``(samples[i], members[i])`` from ``data[i]`` ``[C, *S]`` (physical
        units), then mark them done. Each member is its own chunk."""
        import zarr

        data = np.asarray(data, dtype=np.float32)
        if data.ndim < 2 or data.shape[0] != len(samples) or data.shape[1] != len(self.variables):
            raise ValueError(f"data must be [{len(samples)}, {len(self.variables)}, *S], got {data.shape}")
        group = zarr.open_group(str(self.path), mode="r+")
        arrays = [group[name] for name in self.variables]
        for i, (j, k) in enumerate(zip(samples, members)):
            for c, arr in enumerate(arrays):
                arr[j, k] = data[i, c]
        done = group["done"]
        for j, k in zip(samples, members):  # only after all the data above is on disk
            done[j, k] = True


def create_store(
    path: str | os.PathLike,
    *,
    metadata: FieldMetadata,
    sets: ParameterSets,
    seeds: np.ndarray,
    attrs: Mapping[str, Any],
    sample_coords: Mapping[str, tuple[np.ndarray, Mapping[str, Any]]] | None = None,
) -> EnsembleStore:
    """Create an empty ensemble store at ``path`` (which must not exist).

    Args:
        metadata: the checkpoint's field metadata (variables, units, spatial coords).
        sets: the ``N`` parameter sets (physical units).
        seeds: ``[N, M]`` int64, each member's seed.
        attrs: global attributes; must include ``identity`` (a mapping) -- its hash is
            added as ``identity_sha256``.
        sample_coords: more coordinates along ``sample``, ``{name: ([N] values, attrs)}``
            (e.g. the condition input's ``time``).
    """
    import dask.array as da
    import xarray as xr

    path = Path(path)
    if path.exists():
        raise StoreError(f"out: {path} already exists")
    seeds = np.asarray(seeds, dtype=np.int64)
    n, m = seeds.shape
    if n != len(sets):
        raise ValueError(f"seeds has {n} rows for {len(sets)} parameter sets")
    names = tuple(metadata.channel_names)
    extra = dict(sample_coords or {})
    clash = sorted(set(names) & (set(RESERVED) | set(sets.names) | set(metadata.coords) | set(extra)))
    if clash or len(set(names)) != len(names):
        raise StoreError(f"out: variable names {list(names)} clash with coordinate names {clash or 'each other'}")
    spatial = tuple(metadata.spatial_dims)
    shape = tuple(int(s) for s in metadata.spatial_shape)
    dims = ("sample", "member", *spatial)
    chunks = (1, 1, *shape)

    data_vars: dict[str, Any] = {}
    for c, name in enumerate(names):
        placeholder = da.full((n, m, *shape), np.nan, dtype=np.float32, chunks=chunks)
        var_attrs = {"units": metadata.units[c], "long_name": metadata.long_names[c]}
        if metadata.channel_variables[c] != name:
            var_attrs["source_variable"] = metadata.channel_variables[c]
        data_vars[name] = xr.Variable(dims, placeholder, attrs=var_attrs)
    data_vars["done"] = xr.Variable(
        ("sample", "member"), da.zeros((n, m), dtype=bool, chunks=(1, 1)),
        attrs={"long_name": "member completely written (set after its data)"},
    )
    coords: dict[str, Any] = {
        "sample": ("sample", np.arange(n), {"long_name": "parameter set index"}),
        "member": ("member", np.arange(m), {"long_name": "ensemble member index"}),
        "seed": (("sample", "member"), seeds, {"long_name": "random seed of the member (torch.Generator)"}),
    }
    for i, pname in enumerate(sets.names):
        unit = metadata.param_units[metadata.param_names.index(pname)] if pname in metadata.param_names else ""
        coords[pname] = ("sample", sets.values[:, i], {"units": unit, "long_name": f"conditioning parameter {pname}"})
    for cname, (values, cattrs) in extra.items():
        if cname in coords or cname in sets.names or cname in metadata.coords:
            raise StoreError(f"out: coordinate {cname!r} of the condition input clashes with the store's own")
        if len(values) != n:
            raise ValueError(f"sample coordinate {cname!r} has {len(values)} values for {n} samples")
        coords[cname] = ("sample", np.asarray(values), dict(cattrs))
    for cname, values in metadata.coords.items():
        cdims = tuple(metadata.coord_dims.get(cname, (cname,)))
        if not set(cdims) <= set(spatial):
            continue
        coords[cname] = (cdims, np.asarray(values), dict(metadata.coord_attrs.get(cname, {})))

    identity = attrs["identity"]
    global_attrs = {k: v for k, v in attrs.items() if k != "identity"}
    global_attrs.update(
        scidiff_kind=KIND,
        variables=list(names),
        identity=canonical_json(identity),
        identity_sha256=identity_sha256(identity),
    )
    ds = xr.Dataset(data_vars, coords=coords, attrs=_attr_safe(global_attrs))
    encoding = {name: {"chunks": chunks} for name in names}
    encoding["done"] = {"chunks": (1, 1)}

    with atomic_path(path) as tmp:
        ds.to_zarr(str(tmp), mode="w-", compute=False, encoding=encoding, consolidated=True, zarr_format=2)
    return EnsembleStore.open(path)


def _attr_safe(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-safe attributes (zarr stores attributes as JSON)."""
    return json.loads(json.dumps(dict(attrs), default=_json_default))


def remove_store(path: str | os.PathLike) -> None:
    """Delete an ensemble store (``overwrite=true``); refuses anything that is not one."""
    path = Path(path)
    if not path.exists():
        return
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        return
    if not is_ensemble_store(path):
        raise StoreError(f"out: {path} exists and is not a scidiff ensemble store; not deleting it "
                         f"(remove it yourself or choose another out)")
    shutil.rmtree(path)


__all__ = [
    "EnsembleStore",
    "KIND",
    "StoreError",
    "canonical_json",
    "create_store",
    "identity_sha256",
    "is_ensemble_store",
    "remove_store",
]
