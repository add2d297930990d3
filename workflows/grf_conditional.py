#!/usr/bin/env python
"""Held-out spectral slopes of a conditional GRF diffusion model.

    python workflows/grf_conditional.py --size cpu --out runs/grf_conditional
    python workflows/grf_conditional.py --size gpu --out runs/grf_conditional_gpu

Steps (all through the public CLIs, as a scientist would run them; a finished step
is not run again when the command is repeated with the same ``--out``):

1. **data**: ``scidiff-make-dataset grf`` — periodic Gaussian random fields with
   ``P(k) = A k^-n``, ``n ~ U[1, 3.5]``, ``A ~ logU[0.5, 2]`` (datasets/README.md).
2. **train**: ``scidiff-train experiment=grf`` conditioned on (spectral_index, amplitude),
   with a *held-out band* of slopes: the data split is ``data/split=coordinate`` on
   ``spectral_index``; the model trains on ``n`` outside ``[2.0, 2.5]`` and validates on
   the band (the validation loss is logged only; sampling uses ``last.ckpt``, so
   nothing is selected on the band).
3. **sample**: ``scidiff-sample`` ensembles at held-out slopes (2.1, 2.25, 2.4) and
   in-range ones, amplitude 1, into ``<out>/ensemble.zarr``.
4. **measure**: every member's spectral index by log-periodogram regression
   (:func:`scidiff.evaluation.slopes.fit_power_law`: ``P ∝ k^-n`` is the *power*
   spectrum, as the generator defines it), over ``k`` in ``[1.5 f_0, 0.7 f_Ny]``
   (cycles per grid spacing: the lowest modes and the Nyquist region left out).
   The same estimator on true GRF fields (the generator, same members, same ``k``
   range) gives the floor set by the estimator's own scatter.
5. **report**: Pearson correlation and mean absolute error between requested and
   measured ``n``, held-out and in-range separately, per member and per ensemble
   (mean over members); ``<out>/report/grf_conditional.json`` and ``.png``
   (requested vs measured with the identity line; mean spectra per slope against the
   analytic ``A k^-n``), logged to the checkpoint's MLflow run (metrics
   ``grf_conditional/*``, artifacts under ``grf_conditional/``); with ``--page
   docs/benchmarks/grf-conditional.md`` also the documentation's benchmark page (with
   the date, the hardware and this command; see ``benchmarks/page.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HELD_OUT_BAND = (2.0, 2.5)


@dataclass(frozen=True)
class Preset:
    """One size of the workflow: data, model, training and sampling settings."""

    shape: int                      # fields are shape x shape
    num_samples: int                # fields in the store (about 80% train, the band validates)
    train_overrides: tuple[str, ...]
    members: int                    # members per parameter set
    sample_overrides: tuple[str, ...] = ()
    held_out: tuple[float, ...] = (2.1, 2.25, 2.4)
    in_range: tuple[float, ...] = (1.2, 1.5, 1.8, 2.7, 3.0, 3.3)
    amplitude: float = 1.0


PRESETS: dict[str, Preset] = {
    # ~10 min on 2 CPU cores (measured figures: docs/benchmarks/grf-conditional.md)
    "cpu": Preset(
        shape=32, num_samples=2048, members=16,
        train_overrides=(
            "denoiser=unet_tiny", "denoiser.model_channels=8", "denoiser.attention_levels=[]",
            "denoiser.mid_attention=false", "diffusion=v_min_snr", "trainer=cpu",
            "trainer.max_steps=4000", "trainer.val_check_interval=1000", "trainer.limit_val_batches=2",
            "data.batch_size=32", "data.num_workers=0", "optimizer.lr=3.0e-3", "lr_scheduler.warmup_steps=50",
            "module.ema_decay=0.99", "module.cond_dropout=0.1", "callbacks=minimal",
            "callbacks.periodic_checkpoint.every_n_train_steps=1000", "trainer.enable_progress_bar=false",
            "trainer.log_every_n_steps=50",
        ),
        sample_overrides=("batch_invariant=false", "batch_size=16"),
    ),
    # the experiment's own model (UNet) at 64x64 on one GPU; not yet run (no GPU in the measured session)
    "gpu": Preset(
        shape=64, num_samples=4096, members=64,
        train_overrides=(
            "denoiser=unet", "diffusion=v_min_snr", "trainer=gpu", "trainer.max_steps=30000", "trainer.val_check_interval=2500",
            "data.batch_size=64", "data.num_workers=4", "module.cond_dropout=0.1",
            "callbacks.periodic_checkpoint.every_n_train_steps=2500",
        ),
        sample_overrides=("batch_invariant=false", "batch_size=64"),
    ),
}


# ----------------------------------------------------------------------------- measurement


@dataclass
class SlopeReport:
    """What the workflow reports (``grf_conditional.json``)."""

    requested: list[float]                  # n per parameter set
    held_out: list[bool]                    # per parameter set
    measured_members: list[list[float]]     # [set][member] fitted n
    measured_mean: list[float]              # mean over members
    measured_std: list[float]               # scatter over members
    reference_mean: list[float]             # the estimator on true GRF fields, same members
    reference_std: list[float]
    k_range_cycles: tuple[float, float]
    metrics: dict[str, float] = field(default_factory=dict)


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def slope_metrics(requested: np.ndarray, measured: np.ndarray, held_out: np.ndarray, prefix: str = ""
                  ) -> dict[str, float]:
    """Correlation and MAE of measured vs requested n, per member and per ensemble mean.

    Args:
        requested: ``[J]`` requested n per parameter set.
        measured: ``[J, M]`` measured n per member.
        held_out: ``[J]`` bool, whether the set's n lies in the held-out band.
    """
    out: dict[str, float] = {}
    for name, sel in (("heldout", held_out), ("inrange", ~held_out), ("all", np.ones_like(held_out))):
        if not sel.any():
            continue
        req, meas = requested[sel], measured[sel]
        members_req = np.repeat(req, meas.shape[1])
        out[f"{prefix}{name}/corr_member"] = _pearson(members_req, meas.ravel())
        out[f"{prefix}{name}/mae_member"] = float(np.mean(np.abs(meas - req[:, None])))
        out[f"{prefix}{name}/corr_mean"] = _pearson(req, meas.mean(axis=1))
        out[f"{prefix}{name}/mae_mean"] = float(np.mean(np.abs(meas.mean(axis=1) - req)))
        out[f"{prefix}{name}/bias_mean"] = float(np.mean(meas.mean(axis=1) - req))
    return out


def reference_fields(requested: np.ndarray, amplitude: float, members: int, shape: tuple[int, ...],
                     seed: int = 1234) -> np.ndarray:
    """True GRF fields ``[J, M, *shape]`` from the bundled generator, for the estimator's floor."""
    from scidiff_datasets.grf import sample_fields

    rng = np.random.default_rng(seed)
    out = np.empty((len(requested), members, *shape))
    for j, n in enumerate(requested):
        w = rng.standard_normal((members, *shape))
        out[j] = sample_fields(w, np.full(members, amplitude), np.full(members, n))
    return out


def analyse_ensemble(store: str | Path, variable: str = "field", k_max_fraction: float = 0.7,
                     band: tuple[float, float] = HELD_OUT_BAND) -> tuple[SlopeReport, dict[str, Any]]:
    """Measure the spectral index of every member of an ensemble store.

    Returns the report and, for plotting, the mean radial spectra
    ``{"k": [K], "power": [J, K], "reference_power": [J, K], "amplitude": [J]}``
    (``k`` in cycles per grid spacing, the spectra of :mod:`scidiff.evaluation.spectra`).
    """
    import torch
    import xarray as xr

    from scidiff.evaluation import radial_power_spectrum
    from scidiff.evaluation.slopes import default_k_range, fit_power_law

    ds = xr.open_zarr(store)
    fields = ds[variable]
    spatial = fields.dims[2:]
    shape = tuple(int(ds.sizes[d]) for d in spatial)
    from scidiff.data.completion import read_done

    done = read_done(store)
    if done is not None and not bool(done.all()):
        raise ValueError(f"{store}: {int((~done).sum())} members are not written yet")
    requested = ds["spectral_index"].values.astype(np.float64)
    amplitude = ds["amplitude"].values.astype(np.float64)
    x = torch.from_numpy(fields.values.astype(np.float64))               # [J, M, *S]
    j, m = x.shape[:2]
    k_lo, _ = default_k_range(shape)
    k_hi = k_max_fraction * 0.5
    fit = fit_power_law(x.reshape(j * m, 1, *shape), k_min=k_lo, k_max=k_hi)
    measured = fit.spectral_index.reshape(j, m).numpy()

    ref = torch.from_numpy(np.stack([reference_fields(requested[i:i + 1], float(amplitude[i]), m, shape,
                                                      seed=1234 + i)[0] for i in range(j)]))
    ref_fit = fit_power_law(ref.reshape(j * m, 1, *shape), k_min=k_lo, k_max=k_hi)
    ref_measured = ref_fit.spectral_index.reshape(j, m).numpy()

    held_out = (requested > band[0]) & (requested < band[1])
    report = SlopeReport(
        requested=requested.tolist(), held_out=held_out.tolist(), measured_members=measured.tolist(),
        measured_mean=measured.mean(1).tolist(), measured_std=measured.std(1, ddof=1).tolist() if m > 1 else [0.0] * j,
        reference_mean=ref_measured.mean(1).tolist(),
        reference_std=ref_measured.std(1, ddof=1).tolist() if m > 1 else [0.0] * j,
        k_range_cycles=(k_lo, k_hi),
    )
    report.metrics = {**slope_metrics(requested, measured, held_out),
                      **slope_metrics(requested, ref_measured, held_out, prefix="reference/")}
    spec = radial_power_spectrum(x.reshape(j * m, 1, *shape))
    spec_ref = radial_power_spectrum(ref.reshape(j * m, 1, *shape))
    spectra = {
        "k": spec.wavenumber.numpy(),
        "power": spec.power.reshape(j, m, -1).mean(1).numpy(),
        "reference_power": spec_ref.power.reshape(j, m, -1).mean(1).numpy(),
        "amplitude": amplitude,
        "nyquist": 0.5,
    }
    return report, spectra


def plot_report(report: SlopeReport, spectra: dict[str, Any], path: Path) -> Path:
    """Requested vs measured n (identity line) and mean spectra vs the analytic ``A k^-n``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    req = np.asarray(report.requested)
    meas = np.asarray(report.measured_members)
    held = np.asarray(report.held_out)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6))
    for sel, colour, label in ((~held, "tab:blue", "in range"), (held, "tab:red", "held out")):
        if not sel.any():
            continue
        xs = np.repeat(req[sel], meas.shape[1])
        ax.scatter(xs, meas[sel].ravel(), s=6, alpha=0.3, color=colour)
        ax.errorbar(req[sel], meas[sel].mean(1), yerr=meas[sel].std(1), fmt="o", color=colour, capsize=3,
                    label=f"{label} (mean ± sd over members)")
    ax.plot(req, report.reference_mean, "k+", ms=9, label="true GRF fields, same estimator")
    lims = [min(req.min(), meas.min()) - 0.2, max(req.max(), meas.max()) + 0.2]
    ax.plot(lims, lims, "k--", lw=1, label="identity")
    ax.axvspan(*HELD_OUT_BAND, color="tab:red", alpha=0.08, label="held-out band (not trained on)")
    ax.set(xlabel="requested spectral index n", ylabel="measured n (log-periodogram fit)", xlim=lims, ylim=lims)
    m = report.metrics
    ax.set_title(f"held out: r={m.get('heldout/corr_member', float('nan')):.2f}, "
                 f"MAE={m.get('heldout/mae_member', float('nan')):.2f} | "
                 f"in range: r={m.get('inrange/corr_member', float('nan')):.2f}, "
                 f"MAE={m.get('inrange/mae_member', float('nan')):.2f}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")

    k = spectra["k"]
    keep = k <= spectra["nyquist"]
    cmap = plt.get_cmap("viridis")
    lo, hi = req.min(), req.max()
    for j, n in enumerate(req):
        c = cmap((n - lo) / max(hi - lo, 1e-9))
        bx.loglog(k[keep], spectra["power"][j][keep], "-", color=c, lw=2 if held[j] else 1,
                  label=f"n={n:.2f}{' (held out)' if held[j] else ''}")
        kr = 2 * np.pi * k[keep]                       # the generator's radians per grid spacing
        bx.loglog(k[keep], spectra["amplitude"][j] * kr ** (-n), ":", color=c, lw=1)
    for edge in report.k_range_cycles:
        bx.axvline(edge, color="grey", lw=0.8)
    bx.set(xlabel="k (cycles per grid spacing)", ylabel="P(k), mean over members",
           title="samples (solid) vs analytic A k^-n (dotted); fit range between grey lines")
    bx.title.set_fontsize(9)
    bx.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- steps


def _run(cmd: list[str], cwd: Path, log: Path) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    with open(log, "a") as fh:
        fh.write(f"$ {' '.join(cmd)}\n")
        fh.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
    tail = log.read_text().splitlines()[-3:]
    print("  " + "\n  ".join(tail), flush=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def _bin(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


def make_data(out: Path, preset: Preset, seed: int) -> Path:
    path = out / "data" / f"grf_{preset.shape}x{preset.shape}_{preset.num_samples}.zarr"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        _run([_bin("scidiff-make-dataset"), "grf", "--out", str(path), "--size", "small",
              "--shape", str(preset.shape), str(preset.shape), "--num-samples", str(preset.num_samples),
              "--seed", str(seed), "-q"], out, out / "workflow.log")
    return path


def train(out: Path, data: Path, preset: Preset, run_name: str, extra: list[str]) -> dict[str, Any]:
    run_dir = out / "outputs" / "grf" / run_name
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    lo, hi = HELD_OUT_BAND
    eps = 1e-4
    _run([_bin("scidiff-train"), "experiment=grf", f"data.path={data.resolve()}", "generate_data=null",
          "data/split=coordinate", "data.split.coord=spectral_index",
          f"data.split.train=[[null,{lo - eps}],[{hi + eps},null]]", f"data.split.val=[{lo},{hi}]",
          "output_root=outputs", f"run_name={run_name}", "resume=auto",
          *preset.train_overrides, *extra], out, out / "workflow.log")
    return json.loads(summary.read_text())


def sample(out: Path, checkpoint: str, preset: Preset, guidance: float, extra: list[str]) -> dict[str, Any]:
    sets = [*preset.held_out, *preset.in_range]
    plist = "[" + ", ".join(f"{{spectral_index: {n}, amplitude: {preset.amplitude}}}" for n in sorted(sets)) + "]"
    store = out / "ensemble.zarr"
    t0 = time.perf_counter()
    log = out / "workflow.log"
    before = len(log.read_text().splitlines()) if log.exists() else 0
    _run([_bin("scidiff-sample"), f"checkpoint={checkpoint}", f"params.list={plist}",
          f"members={preset.members}", f"guidance.scale={guidance}", f"out={store}", "progress=false",
          *preset.sample_overrides, *extra], out, log)
    line = [s for s in log.read_text().splitlines()[before:] if s.startswith("scidiff-sample:")]
    rate = float("nan")
    if line and "members/s" in line[-1]:
        rate = float(line[-1].split(" members/s")[0].split()[-1])
    return {"store": str(store), "members_per_s": rate, "seconds": time.perf_counter() - t0, "line": line[-1:]}


def log_to_mlflow(summary: dict[str, Any], metrics: dict[str, float], files: list[Path], out: Path) -> str | None:
    """Metrics ``grf_conditional/*`` and the report's files on the checkpoint's MLflow run."""
    run_id = summary.get("mlflow_run_id")
    store = summary.get("mlflow_store")
    if not run_id or not store:
        return None
    from mlflow.tracking import MlflowClient

    uri = store if "://" in str(store) else f"sqlite:///{Path(store).resolve()}"
    client = MlflowClient(tracking_uri=uri)
    for name, value in metrics.items():
        if np.isfinite(value):
            client.log_metric(run_id, f"grf_conditional/{name}", float(value))
    for f in files:
        client.log_artifact(run_id, str(f), artifact_path="grf_conditional")
    return run_id


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/grf_conditional"))
    p.add_argument("--seed", type=int, default=0, help="dataset seed")
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale w")
    p.add_argument("--members", type=int, default=None, help="members per parameter set (preset's default)")
    p.add_argument("--k-max-fraction", type=float, default=0.7,
                   help="upper end of the slope fit, as a fraction of the Nyquist frequency")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra scidiff-train override (repeatable), e.g. trainer.max_steps=3000")
    p.add_argument("--sample-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra scidiff-sample override (repeatable), e.g. sampler.steps=100")
    p.add_argument("--page", type=Path, default=None,
                   help="write the documentation's benchmark page here (docs/benchmarks/grf-conditional.md)")
    args = p.parse_args(argv)
    preset = PRESETS[args.size]
    if args.members is not None:
        preset = Preset(**{**asdict(preset), "members": args.members})
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    data = make_data(out, preset, args.seed)
    timings["data_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    summary = train(out, data, preset, run_name=args.size, extra=args.train_override)
    timings["train_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    sampled = sample(out, summary["run_dir"], preset, args.guidance, args.sample_override)
    timings["sample_s"] = time.perf_counter() - t2
    t3 = time.perf_counter()
    report, spectra = analyse_ensemble(sampled["store"], k_max_fraction=args.k_max_fraction)
    timings["analyse_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t0

    report_dir = out / "report"
    report_dir.mkdir(exist_ok=True)
    png = plot_report(report, spectra, report_dir / "grf_conditional.png")
    doc = {
        "size": args.size, "preset": asdict(preset), "held_out_band": HELD_OUT_BAND, "guidance_scale": args.guidance,
        "checkpoint": summary.get("checkpoint"), "training_global_step": summary.get("global_step"),
        "training_wall_time_s": summary.get("wall_time_s"), "mlflow_run_id": summary.get("mlflow_run_id"),
        "ensemble": sampled["store"], "members_per_s": sampled["members_per_s"],
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "note": "timings of steps skipped because already done (data, training) are ~0; "
                "training_wall_time_s is the training's own",
        **asdict(report),
    }
    js = report_dir / "grf_conditional.json"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    run_id = log_to_mlflow(summary, {**report.metrics, "members_per_s": sampled["members_per_s"]}, [js, png], out)

    m = report.metrics
    print(f"grf_conditional ({args.size}): measured vs requested spectral index | "
          f"held out r={m.get('heldout/corr_member', float('nan')):.3f} "
          f"MAE={m.get('heldout/mae_member', float('nan')):.3f} (ensemble mean MAE "
          f"{m.get('heldout/mae_mean', float('nan')):.3f}) | in range r={m.get('inrange/corr_member', float('nan')):.3f} "
          f"MAE={m.get('inrange/mae_member', float('nan')):.3f} (ensemble mean MAE "
          f"{m.get('inrange/mae_mean', float('nan')):.3f}) | true-GRF floor MAE "
          f"{m.get('reference/all/mae_member', float('nan')):.3f} | {sampled['members_per_s']:.2f} members/s | "
          f"{timings['total_s']:.0f} s | {js}" + (f" | MLflow run {run_id}" if run_id else ""), flush=True)
    if args.page:
        write_benchmark_page(args.page, doc, report, argv)
    return 0


def page_tables(report: SlopeReport) -> str:
    """The report as markdown: the metrics per band and the measured mean per requested n."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from page import markdown_table

    m = report.metrics
    nan = float("nan")
    rows = []
    for key, label in (("heldout", "held out"), ("inrange", "in range")):
        sel = [n for n, h in zip(report.requested, report.held_out) if h == (key == "heldout")]
        if not sel:
            continue
        rows.append([f"{label} ({', '.join(f'{n:g}' for n in sel)})",
                     f"{m.get(f'{key}/mae_member', nan):.3f}", f"{m.get(f'{key}/mae_mean', nan):.3f}",
                     f"{m.get(f'{key}/bias_mean', nan):+.3f}", f"{m.get(f'{key}/corr_mean', nan):.3f}",
                     f"{m.get(f'{key}/corr_member', nan):.2f}",
                     f"{m.get(f'reference/{key}/mae_member', nan):.3f} / "
                     f"{m.get(f'reference/{key}/mae_mean', nan):.3f}"])
    summary = markdown_table(
        ["slopes", "member MAE", "ensemble-mean MAE", "ensemble-mean bias", "ensemble-mean r", "member r",
         "true GRFs, same estimator: member MAE / mean MAE"], rows)
    means = markdown_table(
        ["requested n", "held out", "measured n, mean over members", "sd over members", "true GRFs, mean"],
        [[f"{n:g}", "yes" if h else "", f"{mean:.2f}", f"{sd:.2f}", f"{ref:.2f}"]
         for n, h, mean, sd, ref in zip(report.requested, report.held_out, report.measured_mean,
                                        report.measured_std, report.reference_mean)])
    return f"{summary}\n\nPer requested slope:\n\n{means}"


def write_benchmark_page(path: Path, doc: dict[str, Any], report: SlopeReport, argv: list[str] | None) -> Path:
    """The documentation's benchmark page (``benchmarks/page.py``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
    from page import command, hardware, write_page

    preset = doc["preset"]
    steps = doc.get("training_global_step")
    train_s = doc.get("training_wall_time_s")
    summary = (
        f"A model conditioned on (spectral_index n, amplitude A) of {preset['num_samples']} periodic GRFs of "
        f"{preset['shape']}x{preset['shape']} (preset `--size {doc['size']}`), with the band n in "
        f"[{doc['held_out_band'][0]}, {doc['held_out_band'][1]}] held out of training; "
        + (f"{steps} training steps" if steps is not None else "trained")
        + (f" in {train_s:.0f} s" if isinstance(train_s, (int, float)) else "")
        + f". {preset['members']} members per slope sampled at {doc['members_per_s']:.1f} members/s "
        f"(guidance scale {doc['guidance_scale']:g}); {doc['timings_s'].get('total_s', float('nan')):.0f} s end to "
        "end (steps already done when the command was repeated count ~0). Each member's n by log-periodogram "
        "regression (`scidiff.evaluation.slopes.fit_power_law`) against the requested n; the same estimator on "
        "true GRF fields is the floor."
    )
    device = "cuda" if doc["size"] == "gpu" else None
    return write_page(path, "Held-out spectral slopes (GRF conditional)", summary,
                      command(__file__, sys.argv[1:] if argv is None else argv), page_tables(report),
                      hardware_line=hardware(device))


if __name__ == "__main__":
    sys.exit(main())
