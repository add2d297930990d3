"""Every sampler against model calls on the trained quickstart model, beside the floor of real fields.

For each sampler (DDIM on the leading grid; DPM-Solver++ 2M, 3M and SDE 2M and UniPC of order
3, the main job's, on the log-SNR grid; Heun on the trailing and Karras grids) and each number
of model calls,
``scidiff.evaluation.evaluate`` generates ``--members`` members for each of the first
``--samples`` fields of the held-out band (the validation split, spectral indices n in
[2.0, 2.5]) and reports the spectral error (mean over wavenumber shells of
|ln P_samples(k) / P_data(k)|) and the CRPS, each beside its noise floor (the same metric
for real fields of the nearest parameters) and the evaluation's verdict (every sample
metric within its floor's tolerance). DDPM with all 1000 steps is the reference. The
members of every row come from the same seeds.

    bash workflows/quickstart.sh                                   # RUN=<name> fixes the run name
    python workflows/benchmarks/sampler_quickstart.py outputs/quickstart/<run>
    python workflows/benchmarks/sampler_quickstart.py outputs/quickstart/<run> \
        --page docs/benchmarks/sampler-quickstart.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from scidiff.evaluation import BoundSettings, EvaluationSettings, SamplingSettings, evaluate
from scidiff.inference import DDIM, DDPM, DPMSolver, Heun, UniPC, load_pretrained

# the main job's sampler (workflows/quickstart.sh: sampler=unipc sampler.steps=20), which the other
# quickstart pages judge their models with
MAIN_JOB_SAMPLER = UniPC(steps=20, order=3)


def samplers_at(calls: int) -> dict[str, object]:
    """The samplers compared, each at ``calls`` model calls (Heun: the nearest odd count)."""
    return {
        "DDIM (leading)": DDIM(steps=calls),
        "DPM-Solver++ 2M (logsnr)": DPMSolver(steps=calls, order=2),
        "DPM-Solver++ 3M (logsnr)": DPMSolver(steps=calls, order=3),
        "SDE-DPM-Solver++ 2M (logsnr)": DPMSolver(steps=calls, order=2, stochastic=True),
        "UniPC 3 (logsnr)": UniPC(steps=calls, order=3),
        "Heun (trailing)": Heun(steps=(calls + 1) // 2),
        "Heun (karras)": Heun(steps=(calls + 1) // 2, spacing="karras"),
    }


def evaluate_samples(pretrained, sampler, args):
    """The evaluation of ``args.members`` members for each of the first ``args.samples`` fields of
    the held-out band (no bound), and its wall time in seconds."""
    settings = EvaluationSettings(split="val", max_samples=args.samples, batch_size=args.batch_size, seed=0,
                                  bound=BoundSettings(enabled=False), sampling=SamplingSettings(members=args.members),
                                  sampler=sampler)
    tic = time.perf_counter()
    ev = evaluate(pretrained, settings, data_path=args.data_path, device="cpu", progress=False)
    return ev, time.perf_counter() - tic


def row(pretrained, sampler, args) -> dict[str, float | str]:
    ev, seconds = evaluate_samples(pretrained, sampler, args)
    s = ev.scalars
    return {"spectral_error": s["spectral_error/field"], "spectral_floor": s["floor/spectral_error/field"],
            "crps": s["crps/field"], "crps_floor": s["floor/crps/field"],
            "std_ratio": s["std_ratio/field"], "domain_mean": s["domain_mean_std_ratio/field"],
            "domain_mean_floor": s["floor/domain_mean_std_ratio/field"], "verdict": short_verdict(ev),
            "seconds": seconds}


def short_verdict(ev) -> str:
    """``faithful (9/9)`` or ``NOT faithful (4/9)``, or ``none`` without a verdict."""
    return _short(ev.verdict.summary()) if ev.verdict else "none"


def _short(summary: str) -> str:
    """``faithful (9/9)`` or ``NOT faithful (4/9)`` from the verdict's summary line."""
    label = "NOT faithful" if summary.startswith("NOT") else "faithful"
    counts = summary.rsplit("(", 1)[-1].split(" ", 1)[0] if "(" in summary else "?"
    return f"{label} ({counts})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished quickstart run directory (outputs/quickstart/<run>)")
    p.add_argument("--calls", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--samples", type=int, default=32, help="held-out fields")
    p.add_argument("--members", type=int, default=8, help="members per held-out field")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-path", type=Path, default=None,
                   help="the quickstart's store when not run from the training's directory")
    p.add_argument("--no-ddpm", action="store_true", help="skip the DDPM-1000 reference row")
    p.add_argument("--precision", default="32", choices=["32", "bf16"],
                   help="the denoiser's arithmetic (execution.precision; the samplers' state stays float32)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/sampler-quickstart.md)")
    args = p.parse_args(argv)
    pretrained = load_pretrained(args.run, execution={"precision": args.precision})
    results: dict[str, dict[str, dict]] = {}
    tic = time.perf_counter()
    for calls in args.calls:
        for name, sampler in samplers_at(calls).items():
            results.setdefault(name, {})[str(calls)] = r = row(pretrained, sampler, args)
            print(f"{name:32s} {calls:4d} calls: spectral {r['spectral_error']:.4f} (floor {r['spectral_floor']:.4f}) "
                  f"crps {r['crps']:.4f} (floor {r['crps_floor']:.4f}) std_ratio {r['std_ratio']:.3f} "
                  f"domain mean {r['domain_mean']:.3f} (floor {r['domain_mean_floor']:.3f}) | "
                  f"{r['verdict']} | {r['seconds']:.0f} s", flush=True)
    if not args.no_ddpm:
        results["DDPM (all 1000 steps)"] = {"1000": (r := row(pretrained, DDPM(), args))}
        print(f"{'DDPM':32s} 1000 calls: spectral {r['spectral_error']:.4f} crps {r['crps']:.4f} | {r['verdict']}")
    seconds = time.perf_counter() - tic
    table = format_table(results)
    print("\n" + table + f"\n\n{seconds:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.page:
        write_benchmark_page(args, argv, table, pretrained)


def format_table(results: dict[str, dict[str, dict]]) -> str:
    from page import markdown_table

    body = []
    for name, by_calls in results.items():
        for calls, r in by_calls.items():
            calls_text = f"{2 * ((int(calls) + 1) // 2) - 1}" if name.startswith("Heun") else calls
            body.append([name, calls_text, f"{r['spectral_error']:.4f}", f"{r['spectral_floor']:.4f}",
                         f"{r['crps']:.4f}", f"{r['crps_floor']:.4f}", f"{r['std_ratio']:.3f}",
                         f"{r['domain_mean']:.3f}", f"{r['domain_mean_floor']:.3f}", r["verdict"]])
    return markdown_table(["sampler", "model calls", "spectral error", "floor", "CRPS", "floor", "std ratio",
                           "domain-mean std ratio", "floor", "verdict"], body)


def write_benchmark_page(args, argv, table: str, pretrained) -> Path:
    from page import command, hardware, software, write_page

    summary = (
        f"The quickstart model (`{args.run}`, {pretrained.global_step} training steps, v-prediction, cosine "
        f"schedule) on the first {args.samples} fields of its held-out band (n in [2.0, 2.5]), {args.members} "
        "members a field from the same seeds for every sampler: the spectral error and the CRPS of the members, "
        "each beside its noise floor (the same metric for real fields of the nearest parameters), the members' "
        "std ratio, the spread of their domain means (std ratio of the fields' means, members / data) beside its "
        "floor, and the evaluation's verdict (every sample metric within its floor's tolerance)."
    )
    return write_page(args.page, "Sampler quality against model calls (quickstart model)", summary,
                      command(__file__, sys.argv[1:] if argv is None else argv), table,
                      hardware_line=hardware(), software_line=software())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
