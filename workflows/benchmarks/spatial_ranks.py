"""The quickstart's conditional model in 1-D, 2-D and 3-D, judged by what every sampler generates.

The experiments ``quickstart_1d`` (periodic profiles of 64 points), ``quickstart`` (16 x 16
fields) and ``quickstart_3d`` (8 x 8 x 8 voxels) are the same problem at three spatial
ranks: Gaussian random fields with P(k) = A k^-n conditioned on (n, A), the band n in
[2.0, 2.5] held out of training, the same denoiser configuration (a UNet built with the
data's rank), diffusion and steps. For each trained run this script reports, on the first
``--samples`` fields of the held-out band:

* the main job's evaluation: the variational bound (bits/dim, importance-sampled with 100
  terms, with its standard error) against the store's exact negative log-likelihood, and the
  verdict of ``--members`` members a field from UniPC (order 3) at 20 calls;
* the spread of the domain mean (the k = 0 mode, which the spectral error's shells leave out):
  the standard deviation of the spatial mean over ``--mean-members`` members at each of n = 2.1,
  2.25, 2.4 (A = 1; UniPC, 20 calls), divided by its exact value sqrt(P(0) / N),
  P(0) = A k_min^-n;
* every sampler at ``--calls`` model calls (and DDPM with all 1000 steps unless
  ``--no-ddpm``), members from the same seeds: the spectral error (mean over wavenumber shells
  of |ln P_samples(k) / P_data(k)|) and the CRPS beside their noise floors (the same metric for
  real fields of the nearest parameters), the std ratio and the verdict.

Run from the directory the models were trained in (their stores are found where the runs'
configs say, ``data/generated/`` by default) or give ``--data-dir``:

    scidiff-train experiment=quickstart_1d run_name=r1
    scidiff-train experiment=quickstart run_name=r2
    scidiff-train experiment=quickstart_3d run_name=r3
    python workflows/benchmarks/spatial_ranks.py outputs/quickstart_1d/r1 outputs/quickstart/r2 \\
        outputs/quickstart_3d/r3 --page docs/benchmarks/spatial-ranks.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the quickstart sampler page's samplers and evaluation settings
from sampler_quickstart import MAIN_JOB_SAMPLER, evaluate_samples, samplers_at, short_verdict  # noqa: E402

from scidiff.evaluation import BoundSettings, EvaluationSettings, SamplingSettings, evaluate  # noqa: E402
from scidiff.inference import DDPM, generate, load_pretrained  # noqa: E402

RANK_NAMES = {1: "1-D", 2: "2-D", 3: "3-D"}


def data_path(pretrained, data_dir: Path | None) -> Path | None:
    """The run's store, moved to ``data_dir`` when given (same file name)."""
    if data_dir is None:
        return None
    return data_dir / Path(str(pretrained.config["data"]["path"])).name


def main_job_evaluation(pretrained, args) -> dict[str, float | str]:
    """The main job's evaluation of the first ``args.samples`` held-out fields: bound against the
    exact NLL, and the verdict of the main job's sampler."""
    settings = EvaluationSettings(split="val", max_samples=args.samples, batch_size=args.batch_size, seed=0,
                                  bound=BoundSettings(estimator="importance", num_terms=100),
                                  sampling=SamplingSettings(members=args.members),
                                  sampler=MAIN_JOB_SAMPLER)
    tic = time.perf_counter()
    ev = evaluate(pretrained, settings, data_path=args.data_path, device="cpu", progress=False)
    s = ev.scalars
    return {"bpd": s["bpd"], "bpd_se": s["bpd_se"], "true_nll_bpd": s["true_nll_bpd"],
            "verdict": short_verdict(ev), "seconds": time.perf_counter() - tic}


HELD_OUT_INDICES = (2.1, 2.25, 2.4)


def domain_mean_spread(pretrained, members: int) -> float:
    """The std of the members' spatial means over its exact value sqrt(P(0) / N), as a ratio of
    root-mean-square over the held-out indices ``HELD_OUT_INDICES`` (A = 1)."""
    shape = pretrained.metadata.spatial_shape
    k_min = 2 * math.pi / max(shape)
    variances, exact = [], []
    for i, n in enumerate(HELD_OUT_INDICES):
        params = torch.tensor([[n, 1.0]] * members)
        fields = generate(pretrained, params, seeds=[1000 * i + m for m in range(members)],
                          sampler=MAIN_JOB_SAMPLER)
        variances.append(fields.flatten(1).mean(1).double().var().item())
        exact.append(k_min ** (-n) / math.prod(shape))
    return math.sqrt(sum(variances) / sum(exact))


def sampler_row(pretrained, sampler, args) -> dict[str, float | str]:
    ev, seconds = evaluate_samples(pretrained, sampler, args)
    s = ev.scalars
    return {"spectral_error": s["spectral_error/field"], "spectral_floor": s["floor/spectral_error/field"],
            "crps": s["crps/field"], "crps_floor": s["floor/crps/field"], "std_ratio": s["std_ratio/field"],
            "verdict": short_verdict(ev), "seconds": seconds}


def describe(run: Path, pretrained) -> dict[str, object]:
    """Rank, grid, size and training of one run."""
    meta = pretrained.metadata
    summary = run / "summary.json"
    step_seconds = None
    if summary.is_file():
        info = json.loads(summary.read_text())
        steps = info.get("global_step", 0) - (info.get("start_step") or 0)
        if info.get("fit_time_s") and steps > 0:   # fit time of the last session, validation included
            step_seconds = info["fit_time_s"] / steps
    return {"run": str(run), "rank": len(meta.spatial_dims), "grid": " x ".join(map(str, meta.spatial_shape)),
            "dims": ", ".join(meta.spatial_dims),
            "parameters": sum(p.numel() for p in pretrained.denoiser.parameters()),
            "norm_group_channels": pretrained.config["denoiser"].get("norm_group_channels"),
            "norm": pretrained.config["denoiser"].get("norm", "group"),
            "steps": pretrained.global_step, "step_seconds": step_seconds}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="finished runs of quickstart_1d, quickstart, quickstart_3d")
    p.add_argument("--calls", type=int, default=20, help="model calls of every sampler")
    p.add_argument("--samples", type=int, default=32, help="held-out fields")
    p.add_argument("--members", type=int, default=8, help="members per held-out field")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mean-members", type=int, default=64, help="members per index for the domain mean's spread")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="the directory of the runs' stores when not run from the trainings' directory")
    p.add_argument("--no-ddpm", action="store_true", help="skip the DDPM-1000 rows")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/spatial-ranks.md)")
    args = p.parse_args(argv)
    tic = time.perf_counter()
    results = []
    for run in args.runs:
        pretrained = load_pretrained(run)
        args.data_path = data_path(pretrained, args.data_dir)   # the store evaluate_samples reads
        info = describe(run, pretrained)
        rank = RANK_NAMES[info["rank"]]
        info["main_job"] = m = main_job_evaluation(pretrained, args)
        info["domain_mean_spread"] = spread = domain_mean_spread(pretrained, args.mean_members)
        print(f"{rank} ({info['grid']}): bound {m['bpd']:.4f} ± {m['bpd_se']:.4f} bits/dim, exact NLL "
              f"{m['true_nll_bpd']:.4f} | {m['verdict']} | domain-mean spread / exact {spread:.3f} | "
              f"{m['seconds']:.0f} s", flush=True)
        samplers = dict(samplers_at(args.calls))
        if not args.no_ddpm:
            samplers["DDPM (all 1000 steps)"] = DDPM()
        info["samplers"] = {}
        for name, sampler in samplers.items():
            info["samplers"][name] = r = sampler_row(pretrained, sampler, args)
            print(f"{rank} {name:28s}: spectral {r['spectral_error']:.4f} (floor {r['spectral_floor']:.4f}) "
                  f"crps {r['crps']:.4f} (floor {r['crps_floor']:.4f}) std_ratio {r['std_ratio']:.3f} | "
                  f"{r['verdict']} | {r['seconds']:.0f} s", flush=True)
        results.append(info)
    tables = format_tables(results, args.calls)
    print("\n" + tables + f"\n\n{time.perf_counter() - tic:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.page:
        write_benchmark_page(args, argv, tables)


def _calls(name: str, calls: int) -> str:
    if name.startswith("DDPM"):
        return "1000"
    return str(2 * ((calls + 1) // 2) - 1) if name.startswith("Heun") else str(calls)


def _normalisation(r: dict) -> str:
    """The denoiser's normalisation: ``none`` (the quickstart's) or GroupNorm and its group size."""
    if r.get("norm", "group") == "none":
        return "none"
    return f"GroupNorm, {r['norm_group_channels'] or 1} ch/group"


def _label(r: dict) -> str:
    """The run's rank, with its normalisation when it is not the quickstart's (none)."""
    norm = _normalisation(r)
    return RANK_NAMES[r["rank"]] + ("" if norm == "none" else f" ({norm})")


def format_tables(results: list[dict], calls: int) -> str:
    from page import markdown_table

    models = markdown_table(
        ["rank", "grid (dims)", "denoiser parameters", "normalisation", "training steps", "s/step",
         "bound (bits/dim)", "exact NLL (bits/dim)", "bound - NLL", "domain-mean spread / exact",
         f"verdict ({MAIN_JOB_SAMPLER.describe()})"],
        [[_label(r), f"{r['grid']} ({r['dims']})", f"{r['parameters'] / 1e6:.3f} M",
          _normalisation(r), r["steps"], "-" if r["step_seconds"] is None else f"{r['step_seconds']:.3f}",
          f"{r['main_job']['bpd']:.4f} ± {r['main_job']['bpd_se']:.4f}", f"{r['main_job']['true_nll_bpd']:.4f}",
          f"{r['main_job']['bpd'] - r['main_job']['true_nll_bpd']:.4f}", f"{r['domain_mean_spread']:.3f}",
          r["main_job"]["verdict"]]
         for r in results])
    body = []
    for name in results[0]["samplers"]:
        for r in results:
            s = r["samplers"][name]
            body.append([name, _calls(name, calls), _label(r), f"{s['spectral_error']:.4f}",
                         f"{s['spectral_floor']:.4f}", f"{s['crps']:.4f}", f"{s['crps_floor']:.4f}",
                         f"{s['std_ratio']:.3f}", s["verdict"]])
    samplers = markdown_table(["sampler", "model calls", "rank", "spectral error", "floor", "CRPS", "floor",
                               "std ratio", "verdict"], body)
    return f"### The models\n\n{models}\n\n### Every sampler\n\n{samplers}"


def write_benchmark_page(args, argv, tables: str) -> Path:
    from page import command, hardware, software, write_page

    summary = (
        "The quickstart's conditional model (UNet `unet_tiny_conv`, v-prediction, cosine schedule, 1500 steps) "
        "trained on the same problem at three spatial ranks: periodic Gaussian random fields with P(k) = A k^-n "
        "conditioned on (n, A), with the band n in [2.0, 2.5] held out of training. On the first "
        f"{args.samples} held-out fields of each: the main job's evaluation (the variational bound, "
        "importance-sampled with 100 terms, against the store's exact NLL; the verdict of the main job's "
        f"sampler, {MAIN_JOB_SAMPLER.describe()}), then every sampler at {args.calls} model calls, "
        f"{args.members} members a field from the same seeds: spectral error and CRPS beside their noise floor "
        "(the same metric for real fields of the nearest parameters), std ratio and verdict. The domain-mean "
        "spread is the standard deviation of the members' spatial means "
        f"({args.mean_members} members at each of n = 2.1, 2.25, 2.4, A = 1) over its "
        "exact value sqrt(P(0) / N): the k = 0 mode, which the spectral error leaves out."
    )
    return write_page(args.page, "Spatial ranks: the quickstart in 1-D, 2-D and 3-D", summary,
                      command(__file__, sys.argv[1:] if argv is None else argv), tables,
                      hardware_line=hardware(), software_line=software())


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
