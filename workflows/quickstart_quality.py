#!/usr/bin/env python
"""How faithful the quickstart's model is, with every sampler, against real fields and their floor.

    bash workflows/quickstart.sh                        # RUN=<name> to fix the run name
    python workflows/quickstart_quality.py outputs/quickstart/<run> --out runs/quickstart_quality

Everything goes through the public CLIs, as a scientist would run them, on the quickstart's
held-out band (the validation split: spectral indices n in [2.0, 2.5], never trained on):

1. **sample metrics, every sampler**: ``scidiff-evaluate`` (bound off) with DDPM (all 1000
   steps) and DDIM with 20 and 50 steps and each spacing: std ratio, spectral error
   (mean over wavenumber shells of |ln P_samples(k) / P_data(k)|), rank-histogram deviation,
   CRPS, spread-skill, the spread of the domain mean, W1, energy score, each beside its
   noise floor (the same metric for real fields with the nearest parameters) and the
   evaluation's verdict;
2. **held-out slopes, every sampler**: ``scidiff-sample`` at n = 2.1, 2.25, 2.4 (A = 1), and
   the spectral index of every member by log-periodogram regression
   (:func:`scidiff.evaluation.slopes.fit_power_law`), against the same estimator on real
   fields of the generator (``workflows/grf_conditional.py``'s analysis);
3. **likelihood**: ``scidiff-evaluate`` (sampling off) with the bound for the model's own
   reverse variance, ``fixed_large`` and the Analytic-DPM optimum, and the probability-flow
   ODE NLL, against the store's exact conditional log-likelihood (the gap = bound - true).

Writes ``<out>/quality.json`` and ``<out>/quality.md`` (the tables of the docs' quickstart
page) and prints the tables. A finished step is not run again with the same ``--out``.
``--page docs/benchmarks/quickstart-quality.md`` also writes the tables to the documentation's
benchmark page (with the date, the hardware and this command; see ``benchmarks/page.py``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HELD_OUT = (2.1, 2.25, 2.4)
# name -> (sampler, DDIM steps, DDIM spacing)
SAMPLERS: dict[str, tuple[str, int, str]] = {
    "ddpm": ("ddpm", 50, "leading"),
    **{f"ddim{n}-{sp}": ("ddim", n, sp) for n in (20, 50) for sp in ("leading", "trailing", "linspace")},
}


def _sampler_overrides(spec: tuple[str, int, str]) -> list[str]:
    """The sampler as every command spells it: the ``sampler=`` group and its settings."""
    name, steps, spacing = spec
    if name == "ddpm":  # all T steps: no settings
        return ["sampler=ddpm"]
    return [f"sampler={name}", f"sampler.steps={steps}", f"sampler.spacing={spacing}"]


METRICS = ("std_ratio", "spectral_error", "rank_deviation", "crps", "spread_skill", "domain_mean_std_ratio", "w1",
           "energy_score", "shell_correlation")


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def _run(cmd: list[str], log: Path) -> float:
    print(f"$ {' '.join(cmd)}", flush=True)
    tic = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    # 3: scidiff-evaluate's "not faithful" (everything is written); the table reports it
    if proc.returncode not in (0, 3):
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.perf_counter() - tic


def _evaluation(path: Path) -> dict:
    import xarray as xr

    from scidiff.evaluation.report import read_evaluation_metrics

    scalars = read_evaluation_metrics(path)
    with xr.open_dataset(path) as ds:
        verdict = str(ds.attrs.get("verdict", ""))
    return {"scalars": scalars, "verdict": verdict}


def sample_metrics(run: Path, out: Path, samples: int, members: int, log: Path) -> dict:
    results = {}
    for name, spec in SAMPLERS.items():
        dest = out / "eval" / name
        if not (dest / "evaluation.nc").exists():
            seconds = _run([_bin("scidiff-evaluate"), f"checkpoint={run}", "split=val", f"max_samples={samples}",
                            f"sampling.members={members}", *_sampler_overrides(spec), "bound.enabled=false",
                            "logger.enabled=false", "progress=false", f"out={dest}"], log)
            (dest / "seconds.txt").write_text(f"{seconds:.1f}\n")
        results[name] = {**_evaluation(dest / "evaluation.nc"),
                         "seconds": float((dest / "seconds.txt").read_text())}
    return results


def slopes(run: Path, out: Path, members: int, log: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from grf_conditional import analyse_ensemble

    plist = "[" + ", ".join(f"{{spectral_index: {n}, amplitude: 1.0}}" for n in HELD_OUT) + "]"
    results = {}
    for name, spec in SAMPLERS.items():
        store = out / "ensembles" / f"{name}.zarr"
        if not store.exists():
            store.parent.mkdir(parents=True, exist_ok=True)
            _run([_bin("scidiff-sample"), f"checkpoint={run}", f"params.list={plist}", f"members={members}",
                  "batch_invariant=false", "batch_size=64", "progress=false", "mlflow.run=none", f"out={store}",
                  *_sampler_overrides(spec)], log)
        report, _ = analyse_ensemble(store, band=(2.0, 2.5))
        results[name] = {"requested": report.requested, "measured": report.measured_mean,
                         "member_sd": report.measured_std, "reference": report.reference_mean}
    return results


def likelihood(run: Path, out: Path, samples: int, log: Path) -> dict:
    dest = out / "eval" / "likelihood"
    if not (dest / "evaluation.nc").exists():
        _run([_bin("scidiff-evaluate"), f"checkpoint={run}", "split=val", f"max_samples={samples}",
              "sampling.enabled=false", "bound.variance=[fixed_large,optimal]", "ode.enabled=true",
              "logger.enabled=false", "progress=false", f"out={dest}"], log)
    return _evaluation(dest / "evaluation.nc")["scalars"]


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


def tables(doc: dict) -> str:
    lines = ["### Sample metrics on the held-out band (model / floor)", "",
             "| sampler | " + " | ".join(METRICS) + " | verdict | s |",
             "|---|" + "---|" * (len(METRICS) + 2)]
    for name, r in doc["sample_metrics"].items():
        s = r["scalars"]
        cells = [f"{_fmt(s.get(f'{m}/field', s.get(m, math.nan)))} / "
                 f"{_fmt(s.get(f'floor/{m}/field', s.get(f'floor/{m}', math.nan)))}" for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['verdict']} | {r['seconds']:.0f} |")
    lines += ["", "### Spectral index of the members at held-out n (mean over members; real fields, same estimator)",
              "", "| sampler | " + " | ".join(f"n = {n}" for n in HELD_OUT) + " | max abs error |", "|---|" +
              "---|" * (len(HELD_OUT) + 1)]
    for name, r in doc["slopes"].items():
        cells = [f"{m:.2f} (real {ref:.2f})" for m, ref in zip(r["measured"], r["reference"])]
        worst = max(abs(m - n) for m, n in zip(r["measured"], r["requested"]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst:.2f} |")
    lk = doc["likelihood"]
    true = lk.get("conditional_nll_bpd", lk.get("true_nll_bpd", math.nan))
    lines += ["", f"### Likelihood of {doc.get('likelihood_samples', '')} held-out fields, bits/dim (physical units)", "",
              "| estimate | bits/dim | gap to the exact conditional NLL (± s.e.) |", "|---|---|---|",
              f"| exact conditional NLL (store) | {_fmt(true)} | |"]
    rows = (("bound, model's variance (fixed_small)", "bpd", "fixed_small"),
            ("bound, fixed_large", "bpd/fixed_large", "fixed_large"),
            ("bound, Analytic-DPM optimal variance", "bpd/optimal", "optimal"), ("probability-flow ODE", "ode_bpd", "ode"))
    for label, key, gap in rows:  # the gap's standard error is over the paired per-field differences
        se = lk.get(f"gap_se/{gap}", lk.get(f"gap_conditional_se/{gap}", math.nan))
        lines.append(f"| {label} | {_fmt(lk.get(key, math.nan))} | {_fmt(lk.get(key, math.nan) - true)} ± {_fmt(se)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a finished quickstart run directory (outputs/quickstart/<run>)")
    p.add_argument("--out", type=Path, default=Path("runs/quickstart_quality"))
    p.add_argument("--samples", type=int, default=64, help="held-out fields evaluated per sampler")
    p.add_argument("--members", type=int, default=8, help="members per held-out field")
    p.add_argument("--slope-members", type=int, default=32, help="members per held-out n for the slopes")
    p.add_argument("--likelihood-samples", type=int, default=16)
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/quickstart-quality.md)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    run = args.run.resolve()
    log = out / "workflow.log"
    doc = {"run": str(run), "samples": args.samples, "members": args.members,
           "sample_metrics": sample_metrics(run, out, args.samples, args.members, log),
           "slopes": slopes(run, out, args.slope_members, log),
           "likelihood": likelihood(run, out, args.likelihood_samples, log),
           "likelihood_samples": args.likelihood_samples}
    (out / "quality.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = tables(doc)
    (out / "quality.md").write_text(md)
    print(md)
    if args.page:
        write_benchmark_page(args.page, doc, md, argv, args.slope_members)
    return 0


def write_benchmark_page(path: Path, doc: dict, md: str, argv: list[str] | None, slope_members: int) -> Path:
    """The documentation's benchmark page: the tables of ``quality.md`` (``benchmarks/page.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from page import command, write_page

    summary = (
        f"How faithful the quickstart's model (`{Path(doc['run']).name}`) is on its held-out band of spectral "
        "indices (n in [2.0, 2.5], never trained on), with every sampler, through the public CLIs: "
        f"`scidiff-evaluate` on {doc['samples']} held-out fields x {doc['members']} members per sampler "
        "(each sample metric beside its noise floor, and the verdict), `scidiff-sample` at n = "
        f"{', '.join(map(str, HELD_OUT))} with {slope_members} members each (the members' spectral index by "
        "log-periodogram regression, next to the same estimator on real fields), and the likelihood of "
        f"{doc['likelihood_samples']} held-out fields against the store's exact conditional log-likelihood. "
        "The seconds column is the wall time of each evaluation."
    )
    return write_page(path, "Quickstart model quality", summary, command(__file__, sys.argv[1:] if argv is None else argv),
                      md)


if __name__ == "__main__":
    sys.exit(main())
