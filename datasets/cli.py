"""``scidiff-make-dataset <grf|climate|voxels> --out store.zarr --size tiny|small|full --seed N``.

Each sub-command turns its options into the generator's settings dataclass and
hands the resulting :class:`~scidiff_datasets._store.StoreSpec` to the atomic
writer. Errors a user can cause (bad option values, an existing store) end the
run with a message naming the option or path and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from . import _store

SIZE_CHOICES = ("tiny", "small", "full")
log = logging.getLogger("scidiff_datasets")


def _range(kind=float):
    """Parse the two values of an ``--x LO HI`` option into a checked (lo, hi) tuple."""
    return dict(nargs=2, type=kind, metavar=("LO", "HI"))


def _grf_settings(args: argparse.Namespace):
    from . import grf

    num_samples, shape = grf.SIZES[args.size][args.dims]
    if args.shape is not None:
        if len(args.shape) != args.dims:
            raise _UsageError(f"argument --shape: expected {args.dims} values for --dims {args.dims}, "
                              f"got {len(args.shape)}")
        shape = tuple(args.shape)
    settings = grf.GRFSettings(
        shape=shape,
        num_samples=args.num_samples if args.num_samples is not None else num_samples,
        spectral_index=tuple(args.spectral_index),
        amplitude=tuple(args.amplitude),
    )
    return grf.make_store(settings, seed=args.seed, size=args.size)


def _climate_settings(args: argparse.Namespace):
    from . import climate

    preset = climate.SIZES[args.size]
    overrides = {
        "grid": tuple(args.grid) if args.grid else None,
        "simulations": args.simulations,
        "years": args.years,
        "spinup_years": args.spinup_years,
        "co2_forcing": tuple(args.co2_forcing) if args.co2_forcing else None,
        "diffusivity": tuple(args.diffusivity) if args.diffusivity else None,
        "solar_constant": tuple(args.solar_constant) if args.solar_constant else None,
    }
    settings = preset.replace(**{k: v for k, v in overrides.items() if v is not None})
    return climate.make_store(settings, seed=args.seed, size=args.size)


def _voxel_settings(args: argparse.Namespace):
    from . import voxels

    preset = voxels.SIZES[args.size]
    overrides = {
        "grid": args.grid,
        "spacing": args.spacing,
        "sigma": args.sigma,
        "rotations": args.rotations,
        "max_molecules": args.max_molecules,
        "smiles_file": args.smiles,
    }
    settings = preset.replace(**{k: v for k, v in overrides.items() if v is not None},
                              rotate=not args.no_rotate, hydrogens=args.hydrogens)
    return voxels.make_store(settings, seed=args.seed, size=args.size)


class _UsageError(ValueError):
    """A bad option value found after argparse (reported like argparse's own errors)."""


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="path of the zarr store to write")
    common.add_argument("--size", required=True, choices=SIZE_CHOICES, help="preset size (see datasets/README.md)")
    common.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same bytes")
    common.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    common.add_argument("-q", "--quiet", action="store_true", help="log warnings only")

    parser = argparse.ArgumentParser(
        prog="scidiff-make-dataset",
        description="Generate one of scidiff's bundled scientific datasets as a CF-style zarr store.",
    )
    sub = parser.add_subparsers(dest="generator", required=True)

    p = sub.add_parser("grf", parents=[common], help="periodic Gaussian random fields, P(k) = A k^-n")
    p.add_argument("--dims", type=int, choices=(1, 2, 3), default=2, help="spatial rank (default 2)")
    p.add_argument("--shape", type=int, nargs="+", metavar="N", help="spatial shape, e.g. --shape 32 48")
    p.add_argument("--num-samples", type=int, help="number of samples (default from --size)")
    p.add_argument("--spectral-index", default=(1.0, 3.5), help="range of n (uniform)", **_range())
    p.add_argument("--amplitude", default=(0.5, 2.0), help="range of A (log-uniform)", **_range())
    p.set_defaults(make=_grf_settings)

    p = sub.add_parser("climate", parents=[common], help="stochastic 2-D energy-balance climate model")
    p.add_argument("--grid", type=int, nargs=2, metavar=("NLAT", "NLON"), help="grid (default from --size)")
    p.add_argument("--simulations", type=int, help="number of parameter settings")
    p.add_argument("--years", type=int, help="output years per simulation")
    p.add_argument("--spinup-years", type=int, help="discarded spin-up years")
    p.add_argument("--co2-forcing", help="range of F_co2 in W m-2", **_range())
    p.add_argument("--diffusivity", help="range of D in W m-2 K-1", **_range())
    p.add_argument("--solar-constant", help="range of S0 in W m-2", **_range())
    p.set_defaults(make=_climate_settings)

    p = sub.add_parser("voxels", parents=[common], help="small molecules as Gaussian atomic densities")
    p.add_argument("--grid", type=int, help="voxels per side (default 32)")
    p.add_argument("--spacing", type=float, help="voxel spacing in angstrom, 0.25-0.5 (default 0.5)")
    p.add_argument("--sigma", type=float, help="Gaussian width of an atom in angstrom (default 0.5)")
    p.add_argument("--rotations", type=int, help="random rotations per molecule")
    p.add_argument("--no-rotate", action="store_true", help="keep the principal-axes pose (one per molecule)")
    p.add_argument("--hydrogens", action="store_true", help="add a density_H channel and H atoms")
    p.add_argument("--smiles", type=Path, help="SMILES file, one per line (default: the shipped list)")
    p.add_argument("--max-molecules", type=int, help="use at most this many molecules from the list")
    p.set_defaults(make=_voxel_settings)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.out.exists() and not args.overwrite:
        parser.error(f"argument --out: {args.out} already exists; pass --overwrite to replace it")
    try:
        spec = args.make(args)
    except (_UsageError, ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        parser.error(str(err))
    t0 = time.perf_counter()
    _store.write_store(args.out, spec, overwrite=args.overwrite)
    log.info("%s %s store written to %s in %.1f s", args.size, args.generator, args.out, time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
