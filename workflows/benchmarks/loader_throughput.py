"""Loader throughput: ``FieldDataModule`` (workers 0/2/4) against a naive xarray loop.

Both read the same zarr store in the same shuffled order. The naive loop is what
a first script does::

    ds = xarray.open_zarr(store)
    for i in order:
        x = ds[var].isel(sample=i).values

Our loader reads a whole batch with one indexed read per variable (each chunk
decoded once per batch), normalises it and collates it, in 0, 2 or 4 worker
processes that each open their own handle. Reported: samples/s and MB/s of
float32 target data (what the model receives), and the ratio to the naive loop.

    python workflows/benchmarks/loader_throughput.py                  # synthetic store
    python workflows/benchmarks/loader_throughput.py --store grf.zarr --variables field \\
        --spatial-dims y x

The synthetic store mimics the bundled generators' layout: float32 fields
``(sample, y, x)``, one chunk spanning all spatial points and about 4 MiB along
``sample``.

``--page docs/benchmarks/loader-throughput.md`` writes the table to the documentation's
benchmark page (with the date, the hardware and this command; see ``page.py``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from scidiff.data import FieldDataModule, IndexSplit


def make_store(path: Path, num_samples: int, shape: tuple[int, ...], seed: int = 0, chunk: int | None = None) -> None:
    rng = np.random.default_rng(seed)
    dims = ("sample", *("zyx"[3 - len(shape):]))
    per_sample = 4 * int(np.prod(shape))
    chunk = chunk or max(1, (4 * 2**20) // per_sample)
    data = rng.standard_normal((num_samples, *shape), dtype=np.float32)
    ds = xr.Dataset({"field": (dims, data, {"units": "1"})},
                    coords={"amplitude": ("sample", rng.uniform(0.5, 2.0, num_samples))})
    ds.to_zarr(path, encoding={"field": {"chunks": (chunk, *shape)}}, mode="w")


def naive(store: str, variable: str, order: np.ndarray, sample_dim: str) -> float:
    ds = xr.open_zarr(store)
    start = time.perf_counter()
    for i in order:
        x = ds[variable].isel({sample_dim: int(i)}).values
        assert x.dtype.kind == "f"
    return time.perf_counter() - start


def ours(store: str, args: argparse.Namespace, workers: int, num_samples: int) -> tuple[float, float, int]:
    """(seconds for one epoch including worker start-up, seconds to the first batch, samples)."""
    dm = FieldDataModule(
        store, variables=args.variables, spatial_dims=args.spatial_dims, sample_dims=args.sample_dim,
        split=IndexSplit(train=[0, num_samples]), batch_size=args.batch_size, num_workers=workers,
        persistent_workers=False, shuffle=True, seed=args.seed, mask="auto",
    )
    dm.setup("fit")  # statistics: an out-of-core pass over the split (not timed)
    start = time.perf_counter()
    seen, first = 0, None
    for batch in dm.train_dataloader():
        if first is None:
            first = time.perf_counter() - start  # worker start-up and the first batch
        seen += batch["x"].shape[0]
    return time.perf_counter() - start, first, seen


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", help="an existing zarr store (default: a synthetic one in a temp dir)")
    p.add_argument("--variables", nargs="+", default=["field"])
    p.add_argument("--spatial-dims", nargs="+", default=["y", "x"])
    p.add_argument("--sample-dim", default="sample")
    p.add_argument("--num-samples", type=int, default=1024, help="samples read per method")
    p.add_argument("--shape", type=int, nargs="+", default=[128, 128], help="synthetic store's spatial shape")
    p.add_argument("--chunk", type=int, default=None,
                   help="synthetic store's chunk length along sample (default: about 4 MiB, as the generators)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/loader-throughput.md)")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*[Cc]onsolidated metadata.*")
    warnings.filterwarnings("ignore", message=".*worker processes in total.*")
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store
        if store is None:
            store = str(Path(tmp) / "bench.zarr")
            t0 = time.perf_counter()
            make_store(Path(store), args.num_samples, tuple(args.shape), args.seed, args.chunk)
            print(f"synthetic store {tuple([args.num_samples, *args.shape])} float32 written in "
                  f"{time.perf_counter() - t0:.1f} s")
        ds = xr.open_zarr(store)
        n = min(args.num_samples, int(ds.sizes[args.sample_dim]))
        sample_mb = sum(4 * np.prod([ds.sizes[d] for d in args.spatial_dims]) *
                        int(np.prod([s for d, s in ds[v].sizes.items()
                                     if d not in (args.sample_dim, *args.spatial_dims)]))
                        for v in args.variables) / 1e6
        chunks = {v: ds[v].encoding.get("chunks") for v in args.variables}
        print(f"store {store}: {n} samples of {sample_mb * 1e3:.1f} kB, chunks {chunks}")
        print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible, "
              f"torch {torch.__version__}, batch size {args.batch_size}")

        order = np.random.default_rng(args.seed).permutation(n)
        t_naive = 0.0
        for v in args.variables:
            t_naive += naive(store, v, order, args.sample_dim)
        rate_naive = n / t_naive
        rows = [("naive xarray loop", "-", rate_naive, rate_naive * sample_mb, 1.0, float("nan"))]
        for w in args.workers:
            total, first, seen = ours(store, args, w, n)
            rate = seen / total
            rows.append(("FieldDataModule", str(w), rate, rate * sample_mb, rate / rate_naive, first))
        print(f"\n{'method':<20} {'workers':>7} {'samples/s':>10} {'MB/s':>8} {'ratio':>6} {'first batch s':>13}")
        for name, w, rate, mbs, ratio, first in rows:
            print(f"{name:<20} {w:>7} {rate:>10.1f} {mbs:>8.1f} {ratio:>6.2f} {first:>13.2f}")
        if args.page:
            write_benchmark_page(args, argv, n, sample_mb, chunks, rows, synthetic=args.store is None)


def write_benchmark_page(args, argv, n: int, sample_mb: float, chunks: dict, rows: list, synthetic: bool) -> Path:
    """The documentation's benchmark page: the printed table in markdown (``page.py``)."""
    import zarr

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from page import command, hardware, markdown_table, software, write_page

    store = (f"a synthetic {' x '.join(map(str, args.shape))} float32 store" if synthetic
             else f"the store `{args.store}` (variables {', '.join(args.variables)})")
    chunking = ", ".join(f"{v}: {c}" for v, c in chunks.items())
    summary = (
        f"Reads {n} samples of {store} ({sample_mb * 1e3:.1f} kB of float32 target data a sample; "
        f"chunks {chunking}) in one shuffled order: through a naive "
        "`xarray.open_zarr(...).isel(sample=i).values` loop, and through `FieldDataModule` "
        f"(batch {args.batch_size}, one epoch including worker start-up, workers "
        f"{', '.join(map(str, args.workers))}). MB/s counts the float32 data the model receives; the ratio "
        "is against the naive loop."
    )
    table = markdown_table(
        ["method", "workers", "samples/s", "MB/s", "ratio", "first batch s"],
        [[name, w, f"{rate:.0f}", f"{mbs:.1f}", f"{ratio:.2f}", "-" if first != first else f"{first:.2f}"]
         for name, w, rate, mbs, ratio, first in rows],
    )
    return write_page(
        args.page, "Loader throughput", summary, command(__file__, sys.argv[1:] if argv is None else argv),
        table, hardware_line=hardware(), software_line=software({"zarr": zarr.__version__, "xarray": xr.__version__}),
    )


if __name__ == "__main__":
    main()
