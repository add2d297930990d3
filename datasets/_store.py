"""Writing a generated dataset to zarr: schema first, samples in blocks, atomically.

A generator describes its store as a :class:`StoreSpec`: a ``template`` Dataset
holding the full schema (static variables and every coordinate computed, the
per-sample variables as lazy dask arrays that are never computed) and an
iterator of blocks, each a Dataset of the per-sample variables over a
contiguous range of samples. Memory therefore stays bounded by one block,
whatever the store size.

The store is written into a hidden sibling ``.<name>.partial-<pid>`` and renamed
onto the final path only once complete, so a killed run never leaves a
half-written store under the name a user asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

log = logging.getLogger(__name__)

SAMPLE_DIM = "sample"
CHUNK_BYTES = 4 * 2**20  # about 4 MiB of one variable per chunk along `sample`


@dataclass(frozen=True)
class Block:
    """Per-sample variables for samples ``start, ..., start + len - 1``."""

    start: int
    data: xr.Dataset


@dataclass
class StoreSpec:
    template: xr.Dataset
    blocks: Iterator[Block]


def sample_chunk(shape_per_sample: tuple[int, ...], itemsize: int) -> int:
    """Samples per chunk so that one chunk of a variable holds about CHUNK_BYTES."""
    per_sample = int(np.prod(shape_per_sample, dtype=np.int64)) * itemsize
    return max(1, CHUNK_BYTES // max(per_sample, 1))


def scidiff_version() -> str:
    """The installed scidiff version, read without importing scidiff (and torch)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("scidiff")
    except PackageNotFoundError:
        return "0+unknown"


def base_attrs(generator: str, seed: int, size: str, **extra) -> dict:
    """Global attributes shared by every store (no timestamps: stores are byte-deterministic)."""
    attrs = {
        "Conventions": "CF-1.10",
        "generator": generator,
        "seed": int(seed),
        "size": size,
        "scidiff_version": scidiff_version(),
        "sample_dim": SAMPLE_DIM,
    }
    attrs.update(extra)
    return attrs


def _encoding(template: xr.Dataset) -> dict:
    encoding = {}
    for name, var in template.variables.items():
        enc: dict = {}
        if SAMPLE_DIM in var.dims and var.ndim > 1:
            per_sample = tuple(n for d, n in var.sizes.items() if d != SAMPLE_DIM)
            assert var.dims[0] == SAMPLE_DIM, f"{name}: sample must be the first dim"
            enc["chunks"] = (min(sample_chunk(per_sample, var.dtype.itemsize), var.shape[0]),) + per_sample
        if np.issubdtype(var.dtype, np.integer):
            # -1 etc. are data (padding flags), not missing values to be masked by readers
            enc["_FillValue"] = None
        if np.issubdtype(var.dtype, np.datetime64):
            enc["units"] = "days since 1970-01-01"
            enc["dtype"] = "int64"
        encoding[name] = enc
    return encoding


def write_store(out: Path, spec: StoreSpec, *, overwrite: bool) -> Path:
    """Write ``spec`` to ``out`` atomically and return ``out``.

    Raises FileExistsError when ``out`` exists and ``overwrite`` is false.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    template = spec.template
    n = template.sizes[SAMPLE_DIM]
    try:
        template.to_zarr(tmp, mode="w", compute=False, zarr_format=2, consolidated=True,
                         encoding=_encoding(template))
        written = 0
        for block in spec.blocks:
            stop = block.start + block.data.sizes[SAMPLE_DIM]
            assert block.start == written, f"blocks must be contiguous: {block.start} != {written}"
            missing = set(block.data.data_vars) ^ {
                k for k, v in template.data_vars.items() if SAMPLE_DIM in v.dims and not isinstance(v.data, np.ndarray)
            }
            assert not missing, f"block variables differ from the template's lazy ones: {sorted(missing)}"
            # One sequential writer: blocks may start inside a chunk (zarr reads, merges and
            # rewrites it), which is safe here and gives the same bytes as aligned blocks.
            block.data.drop_vars(list(block.data.coords)).to_zarr(
                tmp, region={SAMPLE_DIM: slice(block.start, stop)}, zarr_format=2,
                consolidated=False, safe_chunks=False,
            )
            written = stop
        assert written == n, f"blocks covered {written} of {n} samples"
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s (%d samples)", out, n)
    return out


def lazy(shape: tuple[int, ...], dtype) -> "dask.array.Array":  # noqa: F821
    """A never-computed placeholder for a per-sample variable in a template."""
    import dask.array as da

    return da.zeros(shape, dtype=dtype, chunks=shape)
