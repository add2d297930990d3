"""The zarr ensemble store (docs/architecture.md#ensemble-output).

Layout, for ``N`` parameter sets and ``M`` members per set::

    <variable>(sample, member, *spatial)  float32, physical units; one per channel,
                                          attrs units / long_name; NaN until written
    sample(sample), member(member)        0..N-1, 0..M-1 (units 1)
    <parameter>(sample)                   coordinate, physical units (attrs units)
    <input coordinate>(sample)            with condition fields: the condition input's
                                          coordinates along its sample dims (e.g. time)
                                          and condition_index, its row for each sample
    seed(sample, member)                  coordinate, the member's random seed
    <spatial coords>                      e.g. lat(lat), lon(lon), y, x, or 2-D curvilinear
    progress/done(sample, member)         in the sub-group ``progress``: bool, True once
                                          the member's data is on disk

Attributes: ``Conventions`` (``CF-1.10``), ``sample_config`` (the resolved sample
config, JSON), ``identity`` (JSON of what determines the members' values) and
``identity_sha256``, ``checkpoint`` and ``checkpoint_sha256``, ``scidiff_version``.

``xarray.open_zarr(store)`` shows the members and their coordinates only: the
completion record lives in the sub-group ``progress`` (which ``open_zarr`` does not
read; ``open_zarr(store, group="progress")`` does), so Dataset-wide operations
(``ds.mean("member")``, ``xskillscore.crps_ensemble(obs, ds, member_dim="member")``)
see no bookkeeping variable. :func:`scidiff.data.completion.read_done` reads the
record of either layout (the evaluation reads it there too).

Chunks. A data chunk holds *all members of one sample*, ``(1, M, *S)``: ``member``
is one chunk, as ensemble scores want it (``xskillscore``, ``scoringrules`` and
``properscoring`` take ``member`` as a core dimension and refuse, or rechunk, a
``member`` split over chunks). When that chunk would exceed
:data:`MAX_CHUNK_BYTES`, the spatial dims are split (halving the largest) until it
fits; ``member`` is never split. ``progress/done`` is chunked ``(1, M)``.

Writes. Members are written with zarr directly, a sample at a time: the chunks of
sample ``j`` are read, the new members put in, and written back (zarr writes each
chunk to a temporary file and renames it, so a chunk on disk is always either the
old or the new one -- zarr 2 and zarr >= 3.1.3 do; zarr 3.0 to 3.1.2 wrote in place,
and writing members with them raises :class:`StoreError`), then the members' ``done``
flags are set. This is safe because
**one writer owns each sample**: the ranks split the samples between them
(:func:`scidiff.sampling.ensemble.rank_samples`) and only a sample's owner writes its
chunks, so no chunk is written by two processes. Do not run two ``scidiff-sample``
on the same ``out`` at once. A kill at any point leaves every member either written
and flagged, or unflagged (recomputed, with the same bits, by the next run).

Stores written before the ``progress`` group existed (``done`` a data variable at the
root, chunks ``(1, 1, *S)``) are still opened and resumed as they are (their chunks
lie within one sample, so the same rule keeps them rank-safe); ``overwrite=true``
rewrites one in the current layout.

A store is created under a temporary name and renamed into place, so a path
either holds a complete empty store or nothing: a crash during creation cannot
leave a store that looks like a run's.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scidiff.data.atomic import atomic_path
from scidiff.data.completion import DONE, PROGRESS, done_array, read_done
from scidiff.data.dataset import FieldMetadata
from scidiff.sampling.grid import ParameterSets

KIND = "scidiff-ensemble"
CONVENTIONS = "CF-1.10"
RESERVED = ("sample", "member", "seed", DONE, PROGRESS)
MAX_CHUNK_BYTES = 64 * 2**20
"""Largest data chunk (bytes) before the spatial dims are split (``member`` never is)."""


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


def chunk_shape(num_members: int, spatial_shape: Sequence[int], itemsize: int = 4,
                max_bytes: int = MAX_CHUNK_BYTES) -> tuple[int, ...]:
    """The data chunk of a store: ``(1, M, *S)``, the spatial dims halved (largest first)
    while the chunk exceeds ``max_bytes``; ``member`` is never split.

    >>> chunk_shape(8, (16, 16))
    (1, 8, 16, 16)
    >>> chunk_shape(50, (721, 1440))
    (1, 50, 361, 720)
    """
    tile = [int(s) for s in spatial_shape]
    while num_members * itemsize * int(np.prod(tile)) > max_bytes and max(tile, default=1) > 1:
        i = int(np.argmax(tile))
        tile[i] = -(-tile[i] // 2)
    return (1, int(num_members), *tile)


def check_atomic_chunk_writes(version: str | None = None) -> None:
    """Raise :class:`StoreError` for a zarr that writes chunk files in place (3.0 to 3.1.2):
    a kill while a sample's chunk is rewritten would corrupt the members already in it."""
    if version is None:
        import zarr

        version = zarr.__version__
    found = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", str(version))
    release = tuple(int(x or 0) for x in found.groups()) if found else (0, 0, 0)
    if (3, 0, 0) <= release < (3, 1, 3):
        raise StoreError(f"zarr {version} writes chunk files in place, so a run killed while writing could "
                         f"corrupt members already written; install zarr>=3.1.3 (or zarr 2)")


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
        done = done_array(group)
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
        done = read_done(self.path)
        if done is None:
            raise StoreError(f"out: {self.path} has no completion record (progress/done)")
        return done

    def write_members(self, samples: Sequence[int], members: Sequence[int], data: np.ndarray) -> None:
        """Write members ``(samples[i], members[i])`` from ``data[i]`` ``[C, *S]`` (physical
        units), then mark them done.

        Each sample's chunks are rewritten once (read, the members put in, written back;
        see the module docstring), so the caller must be the only writer of these
        samples while it runs: :func:`~scidiff.sampling.ensemble.run_ensemble` gives each
        rank its own samples.
        """
        import zarr

        data = np.asarray(data, dtype=np.float32)
        if data.ndim < 2 or data.shape[0] != len(samples) or data.shape[1] != len(self.variables):
            raise ValueError(f"data must be [{len(samples)}, {len(self.variables)}, *S], got {data.shape}")
        if len(members) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(members)} members")
        rows: dict[int, list[int]] = {}  # sample -> rows of data, in order
        for i, j in enumerate(samples):
            rows.setdefault(int(j), []).append(i)
        picks = {j: [int(members[i]) for i in idx] for j, idx in rows.items()}
        for j, ks in picks.items():
            if len(set(ks)) != len(ks):
                raise ValueError(f"member(s) of sample {j} given twice: {sorted(ks)}")
        check_atomic_chunk_writes()
        group = zarr.open_group(str(self.path), mode="r+")
        arrays = [group[name] for name in self.variables]
        for j, idx in rows.items():
            for c, arr in enumerate(arrays):
                arr.set_orthogonal_selection((j, picks[j]), data[idx, c])
        done = done_array(group)
        for j, ks in picks.items():  # only after all the data above is on disk
            done.set_orthogonal_selection((j, ks), np.ones(len(ks), dtype=bool))


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
    chunks = chunk_shape(m, shape)

    data_vars: dict[str, Any] = {}
    for c, name in enumerate(names):
        placeholder = da.full((n, m, *shape), np.nan, dtype=np.float32, chunks=chunks)
        var_attrs = {"units": metadata.units[c]} if metadata.units[c] else {}  # no empty units attribute
        var_attrs["long_name"] = metadata.long_names[c]
        if metadata.channel_variables[c] != name:
            var_attrs["source_variable"] = metadata.channel_variables[c]
        data_vars[name] = xr.Variable(dims, placeholder, attrs=var_attrs)
    progress = xr.Dataset(
        {DONE: xr.Variable(("sample", "member"), da.zeros((n, m), dtype=bool, chunks=(1, m)),
                          attrs={"long_name": "member completely written (set after its data)"})},
        attrs={"description": "scidiff-sample's completion record of the members of the root group"},
    )
    coords: dict[str, Any] = {
        "sample": ("sample", np.arange(n), {"units": "1", "long_name": "parameter set index"}),
        "member": ("member", np.arange(m), {"units": "1", "long_name": "ensemble member index"}),
        "seed": (("sample", "member"), seeds, {"long_name": "random seed of the member (torch.Generator)"}),
    }
    for i, pname in enumerate(sets.names):
        unit = metadata.param_units[metadata.param_names.index(pname)] if pname in metadata.param_names else ""
        pattrs = {"units": unit} if unit else {}  # no units attribute rather than an empty one
        coords[pname] = ("sample", sets.values[:, i], {**pattrs, "long_name": f"conditioning parameter {pname}"})
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
    global_attrs = {"Conventions": CONVENTIONS, **{k: v for k, v in attrs.items() if k != "identity"}}
    global_attrs.update(
        scidiff_kind=KIND,
        variables=list(names),
        identity=canonical_json(identity),
        identity_sha256=identity_sha256(identity),
    )
    ds = xr.Dataset(data_vars, coords=coords, attrs=_attr_safe(global_attrs))
    encoding = {name: {"chunks": chunks} for name in names}

    import zarr

    with atomic_path(path) as tmp:
        ds.to_zarr(str(tmp), mode="w-", compute=False, encoding=encoding, consolidated=False, zarr_format=2)
        progress.to_zarr(str(tmp), group=PROGRESS, mode="a", compute=False,
                         encoding={DONE: {"chunks": (1, m)}}, consolidated=False, zarr_format=2)
        zarr.consolidate_metadata(str(tmp))  # one .zmetadata for the whole hierarchy, written last
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
    "CONVENTIONS",
    "KIND",
    "MAX_CHUNK_BYTES",
    "StoreError",
    "canonical_json",
    "check_atomic_chunk_writes",
    "chunk_shape",
    "create_store",
    "identity_sha256",
    "is_ensemble_store",
    "remove_store",
]
