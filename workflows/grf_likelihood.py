#!/usr/bin/env python
"""Bits/dim of conditional GRF diffusion models next to the true NLL of the data.

    python workflows/grf_likelihood.py --out runs/grf_likelihood            # 16x16, 500 steps: the shared-CPU size
    python workflows/grf_likelihood.py --out runs/grf_likelihood --steps 3000 --eval-samples 64

The bundled GRF store holds, for every field, its exact log-density under the
Gaussian it was drawn from (``log_likelihood``, given the field's spectral index and
amplitude). A model conditioned on those two parameters is therefore scored against
the true conditional NLL: the **gap** (bound - true NLL, bits/dim) is how much
likelihood the model loses, whatever the fields' units.

Steps (through the public CLIs; a finished step is not run again with the same ``--out``):

1. **data**: ``scidiff-make-dataset grf`` (``--shape`` x ``--shape``, 16x16 by default, ``--num-samples`` fields), split
   90/5/5 (contiguous fractions; the fields are i.i.d.).
2. **train** two models with ``experiment=grf`` conditioned on (spectral_index,
   amplitude), ``unet_tiny`` without attention, the same steps and seed:
   ``fixed`` (eps prediction, ``diffusion.variance=fixed_small``, the simple loss) and
   ``learned`` (``diffusion.variance=learned_range denoiser.learned_variance=true``:
   Improved DDPM's hybrid loss).
3. **evaluate** each on the test split with ``scidiff-evaluate``:
   * ``importance``: ``bound.estimator=importance bound.num_terms=K`` on
     ``--eval-samples`` fields, with ``bound.variance=[fixed_small, fixed_large,
     optimal]`` (+ ``learned_range`` for the learned model), the true NLL and every
     gap with its standard error over samples; the Monte-Carlo error of the
     importance estimate (``bpd_mc_se``) is reported beside it;
   * ``exact``: the full bound (all T terms, the model's own variance) on the first
     ``--exact-samples`` of them: the exact gap of those fields, the per-timestep
     terms (which timesteps the gap comes from) and the cost of the full bound, timed
     on those fields and scaled to 1,000 samples;
   * ``ode``: the probability-flow ODE NLL (Hutchinson, ``--ode-probes`` probes) on
     ``--ode-samples`` fields, with its 95% confidence interval.
4. **report**: ``<out>/report/grf_likelihood.json`` and a markdown table printed at
   the end (and written to ``grf_likelihood.md``); with ``--page
   docs/benchmarks/likelihood-gap.md`` also the documentation's benchmark page (with the
   date, the hardware and this command; see ``benchmarks/page.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np



def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def _run(cmd: list[str], cwd: Path, log: Path) -> float:
    """Run ``cmd`` with its output appended to ``log``; returns the wall time (s)."""
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - t0
    tail = log.read_text().splitlines()[-2:]
    print("  " + "\n  ".join(t[:400] for t in tail) + f"\n  ({seconds:.0f} s)", flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return seconds


# ------------------------------------------------------------------------------ steps
def make_data(out: Path, shape: int, num_samples: int, seed: int) -> Path:
    path = out / "data" / f"grf_{shape}x{shape}_{num_samples}.zarr"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _run([_bin("scidiff-make-dataset"), "grf", "--out", str(path), "--size", "small",
              "--shape", str(shape), str(shape), "--num-samples", str(num_samples), "--seed", str(seed), "-q"],
             out, out / "workflow.log")
    return path


MODELS: dict[str, tuple[str, ...]] = {
    "fixed": ("diffusion.variance=fixed_small",),
    "learned": ("diffusion.variance=learned_range", "denoiser.learned_variance=true"),
}


def train_command(data: Path, name: str, steps: int, extra: list[str]) -> list[str]:
    return [_bin("scidiff-train"), "experiment=grf", f"data.path={data.resolve()}", "generate_data=null",
          "data.split.train=0.9", "data.split.val=0.05", "data.split.test=0.05",
          "output_root=outputs", f"run_name={name}", "resume=auto",
          "denoiser=unet_tiny", "denoiser.attention_levels=[]", "trainer=cpu",
          f"trainer.max_steps={steps}", f"trainer.val_check_interval={max(steps // 2, 1)}",
          "trainer.limit_val_batches=2", "data.batch_size=32", "data.num_workers=0", "optimizer.lr=1.0e-3",
          "lr_scheduler.warmup_steps=100", "module.ema_decay=0.995", "module.cond_dropout=0.0",
          "callbacks=minimal", f"callbacks.periodic_checkpoint.every_n_train_steps={steps}",
          "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50",
          *MODELS[name], *extra]


def train(out: Path, data: Path, names: list[str], steps: int, extra: list[str], parallel: bool
          ) -> dict[str, dict[str, Any]]:
    """Train the models not trained yet (concurrently with ``parallel``: on a shared machine
    two processes get two shares of the CPU); their ``summary.json``."""
    todo = [n for n in names if not (out / "outputs" / "grf" / n / "summary.json").exists()]
    if parallel and len(todo) > 1:
        procs = []
        for i, name in enumerate(todo):
            if i:
                time.sleep(20)  # the first run creates the MLflow store before the next opens it
            cmd = train_command(data, name, steps, extra)
            print(f"$ {' '.join(cmd)}", flush=True)
            log = open(out / f"train_{name}.log", "a")
            procs.append((name, cmd, log, subprocess.Popen(cmd, cwd=out, stdout=log, stderr=subprocess.STDOUT,
                                                           env={**os.environ, "PYTHONWARNINGS": "ignore"})))
        for name, cmd, log, proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log.name}")
            log.close()
    else:
        for name in todo:
            _run(train_command(data, name, steps, extra), out, out / f"train_{name}.log")
    return {n: json.loads((out / "outputs" / "grf" / n / "summary.json").read_text()) for n in names}


def evaluate(out: Path, run_dir: str, name: str, kind: str, overrides: list[str]) -> dict[str, float]:
    """One ``scidiff-evaluate`` run into ``<out>/eval/<name>/<kind>``; its scalars (+ wall time)."""
    from scidiff.evaluation.report import read_evaluation_metrics

    dest = out / "eval" / name / kind
    file = dest / "evaluation.nc"
    if not file.exists():
        seconds = _run([_bin("scidiff-evaluate"), f"checkpoint={run_dir}", "split=test", f"out={dest}",
                        "progress=false", "sampling.enabled=false", *overrides], out, out / "workflow.log")
        (dest / "wall_time_s.txt").write_text(f"{seconds:.1f}\n")
        (dest / "loadavg.txt").write_text(" ".join(f"{v:.2f}" for v in os.getloadavg()) + "\n")
    scalars = read_evaluation_metrics(file)
    scalars["wall_time_s"] = float((dest / "wall_time_s.txt").read_text())
    scalars["loadavg_1min_after"] = float((dest / "loadavg.txt").read_text().split()[0])
    return scalars


def dominant_terms(file: Path, top: int = 5) -> dict[str, Any]:
    """Where the exact bound's denoising + reconstruction sum comes from (mean terms, bits/dim)."""
    import xarray as xr

    from scidiff.evaluation.report import netcdf_engine as _netcdf_engine

    with xr.open_dataset(file, engine=_netcdf_engine()) as ds:
        terms = np.asarray(ds["bound_terms"].values, np.float64)
    total = float(terms.sum())
    order = np.argsort(terms)[::-1][:top]
    T = terms.size
    return {
        "sum_terms_bpd": total,
        "L0_reconstruction_bpd": float(terms[0]),
        "last_step_bpd": float(terms[T - 1]),
        "last_10_steps_bpd": float(terms[T - 10:].sum()),
        "first_10_denoising_steps_bpd": float(terms[1:11].sum()),
        "middle_steps_bpd": float(terms[11:T - 10].sum()),
        "largest": [{"t": int(t), "bpd": float(terms[t])} for t in order],
    }


def dominant_samples(file: Path) -> dict[str, Any]:
    """How the exact bound's excess is spread over fields: the largest per-field gaps."""
    import xarray as xr

    from scidiff.evaluation.report import netcdf_engine as _netcdf_engine

    with xr.open_dataset(file, engine=_netcdf_engine()) as ds:
        gap_vars = [v for v in ds.data_vars if str(v).startswith("gap__")]
        out: dict[str, Any] = {}
        for v in gap_vars:
            g = np.asarray(ds[v].values, np.float64)
            out[str(v)[5:]] = {"median": float(np.median(g)), "max": float(g.max()),
                               "share_of_largest": float(g.max() / g.sum()) if g.sum() > 0 else float("nan")}
    return out


# ----------------------------------------------------------------------------- report
def _fmt(v: float | None, se: float | None = None, digits: int = 3) -> str:
    if v is None or not np.isfinite(v):
        return "–"
    return f"{v:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and np.isfinite(se) else "")


def markdown_table(models: dict[str, dict[str, Any]]) -> str:
    """Bound and gap per model and reverse variance (exact and importance-sampled, same
    fields), the ODE NLL, and the cost of the full exact bound."""
    rows = ["| model | reverse variance | bound, exact (bits/dim) | gap, exact | "
            "bound, importance K | gap, importance K | MC SE of the importance bound |",
            "|---|---|---|---|---|---|---|"]
    for name, m in models.items():
        exact, imp, ode = m["exact"], m["importance"], m["ode"]
        own = m["variance"]
        rows.append(f"| {name} | **true NLL** ({int(exact['num_samples'])} test fields) | "
                    f"{_fmt(exact.get('true_nll_bpd'), exact.get('true_nll_bpd_se'))} | 0 | | | |")
        for v in m["variants"]:
            key, se_key = ("bpd", "bpd_se") if v == own else (f"bpd/{v}", f"bpd_se/{v}")
            mc = imp.get("bpd_mc_se") if v == own else imp.get(f"bpd_mc_se/{v}")
            label = f"{v} (the model's)" if v == own else v
            rows.append(f"| {name} | {label} | {_fmt(exact.get(key), exact.get(se_key))} | "
                        f"{_fmt(exact.get(f'gap/{v}'), exact.get(f'gap_se/{v}'))} | "
                        f"{_fmt(imp.get(key), imp.get(se_key))} | {_fmt(imp.get(f'gap/{v}'), imp.get(f'gap_se/{v}'))}"
                        f" | {_fmt(mc)} |")
        ci = 1.96 * ode.get("ode_bpd_probe_se", float("nan"))
        rows.append(f"| {name} | ODE NLL ({int(ode['num_samples'])} fields; 95% Hutchinson CI of the mean ± {ci:.3f}) | "
                    f"{_fmt(ode.get('ode_bpd'), ode.get('ode_bpd_se'))} | "
                    f"{_fmt(ode.get('gap/ode'), ode.get('gap_se/ode'))} | | | |")
    rows.append("")
    rows.append("± : standard error of the mean over the evaluated fields; a gap's SE is that of the per-field "
                "differences (paired), far smaller than the spread of either number.")
    rows.append("")
    rows.append("| model | full exact bound (T = 1000 terms, own variance), per 1,000 samples | measured on | "
                "load average | training steps | training wall time |")
    rows.append("|---|---|---|---|---|---|")
    for name, m in models.items():
        t = m["timing"]
        rows.append(f"| {name} | {t['bound_seconds_per_1000']:.0f} s = {t['bound_seconds_per_1000'] / 60:.1f} min | "
                    f"{int(t['num_samples'])} fields, scaled | {t['loadavg_1min_after']:.1f} | "
                    f"{m['training_global_step']} | {m['training_wall_time_s']:.0f} s |")
    return "\n".join(rows)


def terms_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """Where each model's exact bound comes from: its mean terms by range of timesteps."""
    lines = []
    for name, m in models.items():
        d = m["exact_terms"]
        lines.append(
            f"{name}: exact per-timestep terms (bits/dim, normalised units): L_0 {d['L0_reconstruction_bpd']:.3f}, "
            f"t=1..10 {d['first_10_denoising_steps_bpd']:.3f}, t=11..T-11 {d['middle_steps_bpd']:.3f}, "
            f"last 10 {d['last_10_steps_bpd']:.3f} (t=T-1 alone {d['last_step_bpd']:.3f}); largest "
            + ", ".join(f"t={x['t']}: {x['bpd']:.3f}" for x in d["largest"]))
    return lines


def write_benchmark_page(path: Path, doc: dict[str, Any], table: str, terms: list[str],
                         argv: list[str] | None) -> Path:
    """The documentation's benchmark page: the report's table and the terms (``benchmarks/page.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from page import command, write_page

    shape = "x".join(map(str, doc["shape"]))
    summary = (
        f"Bits/dim of conditional GRF models next to the true NLL of the data. {doc['num_samples']} GRF fields of "
        f"{shape} (split 90/5/5); two `unet_tiny` models without attention conditioned on (spectral_index, "
        f"amplitude), trained for {doc['steps']} steps each"
        + (" at the same time" if doc["trained_concurrently"] else "")
        + ": `fixed` (eps-prediction, `fixed_small` variance, simple loss) and `learned` (`learned_range`, "
        "Improved DDPM's hybrid loss). Evaluated with `scidiff-evaluate` on the test split: the exact bound (all "
        f"T terms) and the importance estimate (K = {doc['num_terms']}) on {doc['eval_samples']} fields with "
        "several reverse variances, the full exact bound timed on "
        f"{doc['timing_samples']} fields and scaled to 1,000, and the probability-flow ODE NLL "
        f"({doc['ode_steps']} Heun steps, {doc['ode_probes']} Hutchinson probes) on {doc['ode_samples']} fields. "
        "The gap is bound - true NLL per field, then averaged (paired standard error)."
    )
    result = table + "\n\nMean exact terms by timestep:\n\n" + "\n".join(f"- {line}" for line in terms)
    return write_page(path, "The gap to the true NLL (GRF likelihood)", summary,
                      command(__file__, sys.argv[1:] if argv is None else argv), result)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/grf_likelihood"))
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--shape", type=int, default=16, help="fields are shape x shape (16: the shared-CPU size)")
    p.add_argument("--num-samples", type=int, default=1024, help="fields in the store (90%% train, 5%% test)")
    p.add_argument("--steps", type=int, default=500, help="training steps per model")
    p.add_argument("--sequential", action="store_true", help="train the models one after the other")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--eval-samples", type=int, default=32, help="test fields of the importance-sampled bounds")
    p.add_argument("--num-terms", type=int, default=64, help="K of the importance estimator")
    p.add_argument("--timing-samples", type=int, default=8,
                   help="test fields on which the full exact bound (the model's own variance only) is timed")
    p.add_argument("--ode-samples", type=int, default=32, help="test fields of the ODE NLL")
    p.add_argument("--ode-steps", type=int, default=100)
    p.add_argument("--ode-probes", type=int, default=4)
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/likelihood-gap.md)")
    args = p.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    data = make_data(out, args.shape, args.num_samples, args.seed)
    t_train = time.perf_counter()
    summaries = train(out, data, args.models, args.steps, args.train_override, parallel=not args.sequential)
    train_wall = time.perf_counter() - t_train

    models: dict[str, dict[str, Any]] = {}
    for name, summary in summaries.items():
        run_dir = summary["run_dir"]
        own = "learned_range" if name == "learned" else "fixed_small"
        variants = ["fixed_small", "fixed_large", "optimal"] + (["learned_range"] if name == "learned" else [])
        common = ["bound.optimal_samples=32", "bound.timestep_batch=100", "batch_size=16"]
        exact = evaluate(out, run_dir, name, "exact", [
            f"max_samples={args.eval_samples}", "bound.estimator=exact", f"bound.variance=[{','.join(variants)}]",
            *common])
        imp = evaluate(out, run_dir, name, "importance", [
            f"max_samples={args.eval_samples}", "bound.estimator=importance", f"bound.num_terms={args.num_terms}",
            f"bound.variance=[{','.join(variants)}]", *common])
        timing = evaluate(out, run_dir, name, "timing", [
            f"max_samples={args.timing_samples}", "bound.estimator=exact", "bound.variance=[]", *common])
        ode = evaluate(out, run_dir, name, "ode", [
            f"max_samples={args.ode_samples}", "bound.enabled=false", "ode.enabled=true",
            f"ode.num_steps={args.ode_steps}", f"ode.num_probes={args.ode_probes}"])
        models[name] = {
            "run_dir": run_dir, "checkpoint": summary.get("checkpoint"), "variance": own, "variants": variants,
            "num_terms": args.num_terms, "training_global_step": summary.get("global_step"),
            "training_wall_time_s": summary.get("wall_time_s", float("nan")),
            "mlflow_run_id": summary.get("mlflow_run_id"),
            "exact": exact, "importance": imp, "timing": timing, "ode": ode,
            "exact_terms": dominant_terms(out / "eval" / name / "exact" / "evaluation.nc"),
            "dominant_samples": dominant_samples(out / "eval" / name / "exact" / "evaluation.nc"),
        }

    table = markdown_table(models)
    report_dir = out / "report"
    report_dir.mkdir(exist_ok=True)
    doc = {
        "data": str(data), "shape": [args.shape, args.shape], "train_wall_time_s": train_wall,
        "trained_concurrently": not args.sequential, "num_samples": args.num_samples, "steps": args.steps,
        "eval_samples": args.eval_samples, "timing_samples": args.timing_samples, "ode_samples": args.ode_samples,
        "ode_steps": args.ode_steps, "ode_probes": args.ode_probes, "num_terms": args.num_terms,
        "hardware": f"{os.cpu_count()} CPU cores (shared), torch {__import__('torch').__version__}",
        "total_wall_time_s": time.perf_counter() - t_start, "models": models,
    }
    (report_dir / "grf_likelihood.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")
    (report_dir / "grf_likelihood.md").write_text(table + "\n")
    terms = terms_lines(models)
    for line in terms:
        print(line)
    print(table)
    if args.page:
        write_benchmark_page(args.page, doc, table, terms, argv)
    print(f"grf_likelihood: {report_dir / 'grf_likelihood.json'} ({doc['total_wall_time_s']:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
