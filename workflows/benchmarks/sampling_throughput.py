"""Ensemble throughput: reproducible micro-batches against unconstrained batching, UNet and DiT.

``scidiff-sample``'s default (``batch_invariant=true``) generates members in fixed
micro-batches of ``micro_batch`` so that every member is bit-identical for any batch size
and number of ranks (:mod:`scidiff.sampling.ensemble`). This measures what that costs:
members/s of :func:`scidiff.sampling.ensemble.run_ensemble` into a fresh store, with the
default (micro-batches of 16, written 16 at a time) against one call per ``--batch-size``
members without the constraint, for the quickstart checkpoint's UNet and for a DiT of the
same field (``configs/denoiser/<name>.yaml``, random weights: throughput only), DDIM with
``--steps`` steps. Rounds alternate between the two settings; the table reports each
one's best round.

    python workflows/benchmarks/sampling_throughput.py outputs/quickstart/<run>
    python workflows/benchmarks/sampling_throughput.py outputs/quickstart/<run> --page docs/benchmarks/sampling-throughput.md
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scidiff.inference import DDIM, GuidanceSpec, load_pretrained, member_seeds
from scidiff.sampling.grid import ParameterSets
from scidiff.sampling.store import create_store
from scidiff.sampling.ensemble import run_ensemble

def with_denoiser(pretrained, name: str):
    """The checkpoint with ``configs/denoiser/<name>.yaml`` (random weights) in place of its network."""
    if name == "checkpoint":
        return pretrained
    import hydra.utils as hu
    from omegaconf import OmegaConf

    from scidiff.cli.train import compose_config

    composed = compose_config(["experiment=quickstart", f"denoiser={name}"])  # the config group, resolved
    cfg = OmegaConf.to_container(composed.denoiser, resolve=True)
    meta = pretrained.metadata
    net = hu.instantiate(cfg, in_channels=meta.num_channels, dims=len(meta.spatial_dims),
                         num_params=len(meta.param_names), field_channels=len(meta.field_names))
    return dataclasses.replace(pretrained, denoiser=net.eval().requires_grad_(False))


def timed_ensemble(pretrained, sets, members: int, steps: int, guidance: float, **kw) -> tuple[float, np.ndarray]:
    """Seconds of one ensemble (DDIM ``steps``) into a fresh temporary store, and its first variable's
    members; ``kw`` goes to :func:`run_ensemble` (``batch_invariant``, ``micro_batch``, ``batch_size``)."""
    import xarray as xr

    seeds = member_seeds(0, len(sets), members)
    tmp = Path(tempfile.mkdtemp(prefix="scidiff-throughput-"))
    try:
        store = create_store(tmp / "ens.zarr", metadata=pretrained.metadata, sets=sets, seeds=seeds,
                             attrs={"identity": {}})
        tic = time.perf_counter()
        run_ensemble(pretrained, store, sets, seeds, sampler=DDIM(steps=steps), guidance=GuidanceSpec(guidance),
                     progress=False, **kw)
        seconds = time.perf_counter() - tic
        return seconds, xr.open_zarr(tmp / "ens.zarr")[pretrained.metadata.channel_names[0]].values
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def rate(pretrained, sets, members: int, steps: int, guidance: float, **kw) -> float:
    return len(sets) * members / timed_ensemble(pretrained, sets, members, steps, guidance, **kw)[0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a quickstart run directory (its checkpoint gives the field)")
    p.add_argument("--denoisers", nargs="+", default=["checkpoint", "dit_tiny"])
    p.add_argument("--members", type=int, default=32, help="members per parameter set (3 sets)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16, help="members per call without the constraint")
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--page", type=Path, default=None)
    args = p.parse_args(argv)
    base = load_pretrained(args.run)
    names = base.param_names
    values = np.array([[2.1, 1.0], [2.25, 1.0], [2.4, 1.0]])[:, :len(names)]
    sets = ParameterSets(names=tuple(names), values=values)
    rows = []
    for name in args.denoisers:
        pre = with_denoiser(base, name)
        best = {"reproducible": 0.0, "unconstrained": 0.0}
        variants = {"reproducible": {"batch_invariant": True, "micro_batch": args.micro_batch,
                                     "batch_size": args.micro_batch},
                    "unconstrained": {"batch_invariant": False, "batch_size": args.batch_size}}
        for i in range(args.rounds):  # each variant first in every other round: neither gains from going second
            for key in sorted(variants, reverse=bool(i % 2)):
                best[key] = max(best[key], rate(pre, sets, args.members, args.steps, args.guidance, **variants[key]))
        ratio = best["reproducible"] / best["unconstrained"]
        shown = "the checkpoint's UNet" if name == "checkpoint" else name
        label = f"{shown} ({sum(q.numel() for q in pre.denoiser.parameters()) / 1e6:.2f} M parameters)"
        rows.append([label, f"{best['reproducible']:.2f}", f"{best['unconstrained']:.2f}", f"{ratio:.2f}"])
        print(f"{label}: reproducible {best['reproducible']:.2f} members/s, unconstrained "
              f"{best['unconstrained']:.2f} members/s, ratio {ratio:.2f}", flush=True)
    if args.page:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from page import command, hardware, markdown_table, software, write_page

        summary = (
            f"Members per second of `run_ensemble` (what `scidiff-sample` runs) on the quickstart field "
            f"({' x '.join(map(str, base.metadata.spatial_shape))}), DDIM {args.steps} steps, guidance w = "
            f"{args.guidance:g}, {3 * args.members} members: the reproducible default (fixed micro-batches of "
            f"{args.micro_batch}: bit-identical members for any batch size and number of ranks) against one call "
            f"per {args.batch_size} members without that guarantee. The DiT has random weights (throughput only). "
            f"Best of {args.rounds} rounds, each variant first in every other round."
        )
        table = markdown_table(["denoiser", "reproducible members/s", "unconstrained members/s", "ratio"], rows)
        write_page(args.page, "Sampling throughput (CPU)", summary, command(__file__, sys.argv[1:] if argv is None
                                                                           else argv),
                   table, hardware_line=hardware(), software_line=software())


if __name__ == "__main__":
    main()
