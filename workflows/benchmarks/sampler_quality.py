"""Sampler quality against model calls, with the exact denoiser, next to diffusers' schedulers.

The data are Gaussian fields whose per-mode standard deviations span three decades
(1e-3 to 1), in 1-D (64), 2-D (8 x 8) and 3-D (4 x 4 x 4); the denoiser is the exact
one of that law (:class:`scidiff.diffusion.analytic.GaussianDataDenoiser`), so every
difference from the data law is the sampler's own error. A mode is a grid point here:
the samplers act on a field through scalar coefficients only, so any orthogonal change of
basis (Fourier modes of a stationary field) gives the same numbers.

The exact denoiser is affine in x_t, so a deterministic sampler maps x_T ~ N(0, I) to
x_0 = a x_T + b per mode: its output law is N(b, a^2), found from two runs (x_T = 0 and
1), and the KL to the data law is closed-form (mean per mode, nats). DDPM's 1000 ancestral
steps are propagated exactly (mean and variance through every step). The stochastic
SDE-DPM-Solver++ is measured by Monte Carlo (``--mc`` samples; its KL carries an error of
about 1/mc per mode).

The KL is dominated by the smallest modes, which the schedule's last noise level caps; it
hardly sees a few percent of excess variance in the modes a model resolves. A second table
per setting measures exactly that: the largest |ln(output variance / data variance)| over
zero-mean modes of standard deviation 0.1 to 10 (a field's Fourier modes in normalised units:
red spectra put 3-10 in the lowest shells), which is what a spectrum metric sees.

Rows: scidiff's DDIM (trailing and log-SNR grids), DPM-Solver++ 2M and 3M (log-SNR and
Karras grids) and its SDE variant, UniPC of orders 2 and 3 (log-SNR), Heun (EDM, trailing
and Karras grids; calls = 2 steps - 1, so the nearest odd count), and diffusers'
``DDIMScheduler`` (trailing), ``DPMSolverMultistepScheduler`` (dpmsolver++ 2M, its default
grid and Karras sigmas) and ``UniPCMultistepScheduler`` (bh2), each driven by the same
denoiser in the same process, in float64.

    python workflows/benchmarks/sampler_quality.py
    python workflows/benchmarks/sampler_quality.py --page docs/benchmarks/sampler-quality.md
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from scidiff.diffusion import GaussianDiffusion, NoiseSchedule, samplers
from scidiff.diffusion.analytic import GaussianDataDenoiser

SHAPES = {"1-D": (1, 64), "2-D": (1, 8, 8), "3-D": (1, 4, 4, 4)}
DTYPE = torch.float64


def problem(shape, schedule: str, prediction: str):
    diff = GaussianDiffusion(NoiseSchedule.from_name(schedule, 1000), prediction=prediction)
    n = math.prod(shape)
    g = torch.Generator().manual_seed(0)
    std = torch.logspace(-3, 0, n, dtype=DTYPE)[torch.randperm(n, generator=g)].reshape(shape)
    mean = torch.randn(shape, generator=g, dtype=DTYPE)
    return diff, GaussianDataDenoiser(diff, mean, std), mean, std


def resolved_problem(schedule: str, prediction: str, n: int = 64):
    """Zero-mean modes of standard deviation 0.1 to 10."""
    diff = GaussianDiffusion(NoiseSchedule.from_name(schedule, 1000), prediction=prediction)
    std = torch.logspace(-1, 1, n, dtype=DTYPE).reshape(1, n)
    return diff, GaussianDataDenoiser(diff, 0.0, std), std


def variance_error(run: Callable[[torch.Tensor], torch.Tensor], std) -> float:
    """max |ln(var_out / std^2)| of a deterministic sampler on zero-mean data (linear: x_T = 1 gives the gain)."""
    out = run(torch.ones((1, *std.shape), dtype=DTYPE))[0]
    return float((out**2 / std**2).log().abs().max())


def kl(mean_out, var_out, mean, std) -> float:
    r = var_out / std**2
    return float((0.5 * (r + (mean_out - mean) ** 2 / std**2 - 1 - torch.log(r))).mean())


def kl_deterministic(run: Callable[[torch.Tensor], torch.Tensor], shape, mean, std) -> float:
    out = run(torch.stack([torch.zeros(shape, dtype=DTYPE), torch.ones(shape, dtype=DTYPE)]))
    return kl(out[0], (out[1] - out[0]) ** 2, mean, std)


def kl_ddpm_exact(diff, den, shape, mean, std) -> float:
    """DDPM's T ancestral steps, the law propagated exactly: x_{t-1} = A x_t + B + s z."""
    m = torch.zeros(shape, dtype=DTYPE)
    v = torch.ones(shape, dtype=DTYPE)
    for t in range(diff.num_timesteps - 1, -1, -1):
        x = torch.stack([torch.zeros(shape, dtype=DTYPE), torch.ones(shape, dtype=DTYPE)])
        tb = torch.full((2,), t, dtype=torch.long)
        p = diff.p_mean_variance(diff.model_output(den, x, tb, None), x, tb)
        b, a = p.mean[0], p.mean[1] - p.mean[0]
        s2 = torch.exp(p.log_variance[0]) if t > 0 else torch.zeros(shape, dtype=DTYPE)
        m, v = a * m + b, a**2 * v + s2
    return kl(m, v, mean, std)


def kl_monte_carlo(run, shape, mean, std, n: int) -> float:
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    x_T = samplers.randn_like(torch.zeros((n, *shape), dtype=DTYPE), gens)
    out = run(x_T, gens)
    return kl(out.mean(0), out.var(0), mean, std)


def diffusers_run(scheduler, den, calls: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def run(x: torch.Tensor) -> torch.Tensor:
        scheduler.set_timesteps(calls)
        for t in scheduler.timesteps:
            tb = torch.full((x.shape[0],), int(t), dtype=torch.long)
            x = scheduler.step(den(x, tb, None), t, x).prev_sample
        return x
    return run


def diffusers_schedulers(diff: GaussianDiffusion):
    import diffusers

    kind = {"v": "v_prediction", "eps": "epsilon", "x0": "sample"}[diff.prediction]
    betas = diff.schedule.betas.numpy()
    common = dict(num_train_timesteps=diff.num_timesteps, trained_betas=betas, prediction_type=kind)
    return {
        "diffusers DDIM (trailing)": lambda: diffusers.DDIMScheduler(**common, timestep_spacing="trailing",
                                                                       set_alpha_to_one=True, clip_sample=False),
        "diffusers DPM-Solver++ 2M": lambda: diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2),
        "diffusers DPM-Solver++ 2M Karras": lambda: diffusers.DPMSolverMultistepScheduler(
            **common, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
        "diffusers UniPC": lambda: diffusers.UniPCMultistepScheduler(**common),
    }


def deterministic_samplers(diff, den) -> dict[str, Callable]:
    """scidiff's deterministic samplers: name -> run(x_T, calls)."""
    runs: dict[str, Callable] = {
        "DDIM (trailing)": lambda x, c: samplers.ddim_sample(den, diff, x, c, spacing="trailing"),
        "DDIM (logsnr)": lambda x, c: samplers.ddim_sample(den, diff, x, c, spacing="logsnr"),
    }
    for order in (2, 3):
        for grid in ("logsnr", "karras"):
            runs[f"DPM-Solver++ {order}M ({grid})"] = (
                lambda x, c, o=order, g=grid: samplers.dpm_solver_sample(den, diff, x, c, g, order=o))
    for order in (2, 3):
        runs[f"UniPC {order} (logsnr)"] = lambda x, c, o=order: samplers.unipc_sample(den, diff, x, c, order=o)
    # Heun: 2n - 1 calls for n grid points; the nearest odd count to each column
    for grid in ("trailing", "karras"):
        runs[f"Heun ({grid}, calls 2n-1)"] = (
            lambda x, c, g=grid: samplers.heun_sample(den, diff, x, (c + 1) // 2, g))
    return runs


def diffusers_rows(diff, den, calls: list[int], score: Callable) -> dict[str, dict]:
    """``score(run)`` of every diffusers scheduler at each number of calls (nan, reported, where
    one fails); none without diffusers (reported)."""
    try:
        schedulers = diffusers_schedulers(diff)
    except ImportError:
        print("diffusers is not installed (bash workflows/install.sh bench): its rows are skipped", file=sys.stderr)
        return {}
    rows: dict[str, dict] = {}
    for name, make in schedulers.items():
        rows[name] = {}
        for c in calls:
            try:
                rows[name][c] = score(diffusers_run(make(), den, c))
            except (IndexError, RuntimeError, ValueError) as exc:  # reported, not hidden
                print(f"{name} at {c} calls failed: {type(exc).__name__}: {exc}", file=sys.stderr)
                rows[name][c] = float("nan")
    return rows


def measure_resolved(calls: list[int], schedule: str, prediction: str) -> dict[str, dict]:
    """max |ln variance ratio| over modes of std 0.1-10, per deterministic sampler and calls."""
    diff, den, std = resolved_problem(schedule, prediction)
    rows = {name: {c: variance_error(lambda x, c=c, fn=fn: fn(x, c), std) for c in calls}
            for name, fn in deterministic_samplers(diff, den).items()}
    rows.update(diffusers_rows(diff, den, calls, lambda run: variance_error(run, std)))
    rows["DDIM, all 1000 steps"] = {"1000": variance_error(
        lambda x: samplers.ddim_sample(den, diff, x, 1000, spacing="trailing"), std)}
    return rows


def measure(shape, calls: list[int], schedule: str, prediction: str, mc: int) -> dict[str, dict]:
    diff, den, mean, std = problem(shape, schedule, prediction)
    det = lambda run: kl_deterministic(run, shape, mean, std)  # noqa: E731
    rows: dict[str, dict] = {}

    def ours(name, fn):
        rows[name] = {c: det(lambda x, c=c: fn(x, c)) for c in calls}

    for name, fn in deterministic_samplers(diff, den).items():
        ours(name, fn)
    rows["SDE-DPM-Solver++ 2M (logsnr, MC)"] = {
        c: kl_monte_carlo(lambda x, g, c=c: samplers.dpm_solver_sample(den, diff, x, c, order=2, stochastic=True,
                                                                        generator=g), shape, mean, std, mc)
        for c in calls}
    rows.update(diffusers_rows(diff, den, calls, det))
    rows["DDIM, all 1000 steps"] = {"1000": det(lambda x: samplers.ddim_sample(den, diff, x, 1000, spacing="trailing"))}
    rows["DDPM, all 1000 steps (exact law)"] = {"1000": kl_ddpm_exact(diff, den, shape, mean, std)}
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calls", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    p.add_argument("--settings", nargs="+", default=["cosine:v", "linear:eps"],
                   help="schedule:prediction pairs (the project's default, and DDPM's original)")
    p.add_argument("--mc", type=int, default=2000, help="Monte-Carlo samples of the stochastic sampler")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/sampler-quality.md)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tic = time.perf_counter()
    results = {}
    for setting in args.settings:
        schedule, prediction = setting.split(":")
        for dims, shape in SHAPES.items():
            results[f"{dims}, {schedule}, {prediction}"] = measure(shape, args.calls, schedule, prediction, args.mc)
    resolved = {}
    for setting in args.settings:
        schedule, prediction = setting.split(":")
        resolved[f"{schedule}, {prediction}"] = measure_resolved(args.calls, schedule, prediction)
    seconds = time.perf_counter() - tic
    tables = {key: format_table(rows, args.calls) for key, rows in results.items()}
    for key, table in tables.items():
        print(f"\n{key}: KL(sampler law || data law), nats per mode; columns: model calls")
        print(table)
    resolved_tables = {key: format_table(rows, args.calls) for key, rows in resolved.items()}
    for key, table in resolved_tables.items():
        print(f"\n{key}: max |ln(variance / data variance)| over modes of std 0.1-10; columns: model calls")
        print(table)
    verdict = goals(results, args.calls) + resolved_goals(resolved)
    print("\n" + "\n".join(verdict))
    print(f"\n{seconds:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "resolved": resolved, "seconds": seconds}, indent=1,
                                        default=str))
    if args.page:
        write_benchmark_page(args, argv, tables, resolved_tables, verdict)


def format_table(rows: dict[str, dict], calls: list[int]) -> str:
    from page import markdown_table

    header = ["sampler", *map(str, calls), "1000"]
    body = []
    for name, by_calls in rows.items():
        body.append([name, *(f"{by_calls[c]:.4g}" if c in by_calls else "" for c in calls),
                     f"{by_calls['1000']:.4g}" if "1000" in by_calls else ""])
    return markdown_table(header, body)


def goals(results: dict[str, dict], calls: list[int]) -> list[str]:
    """The issue's goals, per rank: the best deterministic scidiff sampler against diffusers'
    best at each column, and at 20 calls against DDPM's 1000 steps (exact law)."""
    out = []
    for dims, rows in results.items():
        ours = {n: r for n, r in rows.items() if not n.startswith("diffusers") and "1000" not in r and "MC" not in n}
        theirs = {n: r for n, r in rows.items() if n.startswith("diffusers")}
        parts = []
        for c in calls:
            name, best = min(((n, r[c]) for n, r in ours.items()), key=lambda kv: kv[1])
            line = f"{c}: ours {best:.4g} ({name})"
            finite = [(n, r[c]) for n, r in theirs.items() if math.isfinite(r[c])]
            if finite:
                other, value = min(finite, key=lambda kv: kv[1])
                line += f" vs {value:.4g} ({other})" + (" ok" if best <= value * (1 + 1e-3) else " WORSE")
            parts.append(line)
        ddpm = rows["DDPM, all 1000 steps (exact law)"]["1000"]
        if 20 in calls:
            at20 = min(r[20] for r in ours.values())
            parts.append(f"at 20 calls {at20:.4g} vs DDPM-1000 {ddpm:.4g}" + (" ok" if at20 <= ddpm * (1 + 1e-3)
                                                                               else " WORSE"))
        out.append(f"{dims}: " + "; ".join(parts))
    return out


def resolved_goals(resolved: dict[str, dict]) -> list[str]:
    """At 20 calls: the best deterministic sampler's variance error on resolved modes, against
    DPM-Solver++ 2M's (the main job's) and diffusers' best."""
    out = []
    for key, rows in resolved.items():
        if not all(20 in r for n, r in rows.items() if "1000" not in r):
            continue
        ours = {n: r[20] for n, r in rows.items() if not n.startswith("diffusers") and "1000" not in r}
        name, best = min(ours.items(), key=lambda kv: kv[1])
        line = f"{key}, resolved modes at 20 calls: ours {best:.3g} ({name}); DPM-Solver++ 2M (logsnr) " \
               f"{ours['DPM-Solver++ 2M (logsnr)']:.3g}"
        theirs = [(n, r[20]) for n, r in rows.items() if n.startswith("diffusers") and math.isfinite(r[20])]
        if theirs:
            other, value = min(theirs, key=lambda kv: kv[1])
            line += f"; diffusers' best {value:.3g} ({other})"
        out.append(line)
    return out


def write_benchmark_page(args, argv, tables: dict[str, str], resolved_tables: dict[str, str],
                         verdict: list[str]) -> Path:
    from page import command, hardware, software, write_page

    try:
        import diffusers

        extra = {"diffusers": diffusers.__version__}
    except ImportError:
        extra = {}
    summary = (
        "KL divergence (nats per mode) from each sampler's output law to the data law, against the number of "
        "model calls, with the exact denoiser of Gaussian fields whose per-mode standard deviations span three "
        "decades (1e-3 to 1), in 1-D (64), 2-D (8 x 8) and 3-D (4 x 4 x 4), on the schedules and "
        f"parameterisations {', '.join(args.settings)} (T = 1000), float64. "
        "scidiff's samplers and diffusers' schedulers are driven by the same denoiser in the same run. "
        "The last column is the floor of the discrete chain itself: DDIM and DDPM (exact law) with all 1000 steps. "
        "The KL is dominated by the smallest modes; the second set of tables gives the error on the modes a model "
        "resolves: the largest |ln(output variance / data variance)| over zero-mean modes of standard deviation "
        "0.1 to 10."
    )
    result = "\n\n".join(f"### {key}\n\n{t}" for key, t in tables.items())
    result += "\n\n" + "\n\n".join(f"### Resolved modes (std 0.1-10): {key}\n\n{t}"
                                      for key, t in resolved_tables.items())
    result += "\n\n### Goals\n\n" + "\n".join(f"- {line}" for line in verdict)
    return write_page(args.page, "Sampler quality against model calls (exact denoiser)", summary,
                      command(__file__, sys.argv[1:] if argv is None else argv), result,
                      hardware_line=hardware(), software_line=software(extra))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
