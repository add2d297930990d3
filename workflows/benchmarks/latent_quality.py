"""A latent model against the field-space model it replaces, trained on the same data with the
same denoiser configuration and steps, sampled with every sampler, beside the floor of real fields.

Both models are evaluated on the first ``--samples`` fields of the held-out band (the
quickstart's validation split, spectral indices n in [2.0, 2.5]) with ``--members`` members
a field from the same seeds: spectral error, CRPS, std ratio and the spread of the domain
mean, each beside its noise floor (the same metric for real fields of the nearest
parameters), the verdict, and the members per
second of the evaluation's sampling. For the latent model the autoencoder's own
reconstruction error on the same fields is given too: what the diffusion cannot do better than.

    bash workflows/quickstart.sh                                     # the field-space model
    scidiff-train experiment=quickstart_autoencoder run_name=ae
    scidiff-train experiment=quickstart_latent latent.autoencoder=outputs/quickstart_autoencoder/ae run_name=lat
    python workflows/benchmarks/latent_quality.py outputs/quickstart/<run> outputs/quickstart_latent/lat \\
        --page docs/benchmarks/latent-quality.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the quickstart sampler page's samplers and evaluation settings
from sampler_quickstart import evaluate_samples, samplers_at, short_verdict  # noqa: E402

from scidiff.inference import DDPM, load_pretrained  # noqa: E402


def measure(pretrained, sampler, args) -> dict[str, float | str]:
    ev, seconds = evaluate_samples(pretrained, sampler, args)
    s = ev.scalars
    out = {"spectral_error": s["spectral_error/field"], "spectral_floor": s["floor/spectral_error/field"],
           "crps": s["crps/field"], "crps_floor": s["floor/crps/field"], "std_ratio": s["std_ratio/field"],
           "domain_mean": s["domain_mean_std_ratio/field"], "domain_mean_floor": s["floor/domain_mean_std_ratio/field"],
           "members_per_s": 1000.0 * args.members / s["sampling_seconds_per_1000"],
           "verdict": short_verdict(ev), "seconds": seconds}
    for key in ("autoencoder_rmse/field", "autoencoder_spectral_error/field"):
        if key in s:
            out[key] = s[key]
    return out


def step_seconds(run: Path) -> str:
    """The mean seconds of a training step over the run's last session, validation included; "n/a"
    when that session trained no step (a run resumed only to be evaluated again)."""
    summary = json.loads((run / "summary.json").read_text())
    steps = summary["global_step"] - (summary.get("start_step") or 0)
    return f"{summary['fit_time_s'] / steps:.4f} s" if steps > 0 else "n/a (its last session trained no step)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("field_run", type=Path, help="the field-space quickstart run")
    p.add_argument("latent_run", type=Path, help="the latent quickstart run")
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--data-path", type=Path, default=None)
    p.add_argument("--no-ddpm", action="store_true")
    p.add_argument("--page", type=Path, default=None)
    args = p.parse_args(argv)
    models = {"field": load_pretrained(args.field_run), "latent": load_pretrained(args.latent_run)}
    samplers = dict(samplers_at(args.calls))
    if not args.no_ddpm:
        samplers["DDPM (all 1000 steps)"] = DDPM()
    rows, results = [], {}
    for name, sampler in samplers.items():
        r = {k: measure(m, sampler, args) for k, m in models.items()}
        results[name] = r
        f, lt = r["field"], r["latent"]
        ratio = lt["spectral_error"] / f["spectral_error"]
        print(f"{name:30s} spectral field {f['spectral_error']:.4f} latent {lt['spectral_error']:.4f} "
              f"(floor {f['spectral_floor']:.4f}, ratio {ratio:.2f}) | CRPS {f['crps']:.4f} / {lt['crps']:.4f} "
              f"(floor {f['crps_floor']:.4f}) | std ratio {f['std_ratio']:.3f} / {lt['std_ratio']:.3f} | "
              f"domain mean {f['domain_mean']:.3f} / {lt['domain_mean']:.3f} (floor {f['domain_mean_floor']:.3f}) | "
              f"{f['verdict']} / {lt['verdict']} | members/s {f['members_per_s']:.1f} / {lt['members_per_s']:.1f}",
              flush=True)
        rows.append([name, f"{f['spectral_error']:.4f}", f"{lt['spectral_error']:.4f}", f"{f['spectral_floor']:.4f}",
                     f"{ratio:.2f}", f"{f['crps']:.4f}", f"{lt['crps']:.4f}", f"{f['crps_floor']:.4f}",
                     f"{f['std_ratio']:.3f}", f"{lt['std_ratio']:.3f}", f"{f['domain_mean']:.3f}",
                     f"{lt['domain_mean']:.3f}", f"{f['domain_mean_floor']:.3f}", f["verdict"], lt["verdict"],
                     f"{f['members_per_s']:.1f}", f"{lt['members_per_s']:.1f}"])
    first = next(iter(results.values()))["latent"]
    ae = (f"autoencoder reconstruction of the same fields: RMSE {first['autoencoder_rmse/field']:.4f}, spectral "
          f"error {first['autoencoder_spectral_error/field']:.4f}")
    steps = (f"training step: field {step_seconds(args.field_run)}, latent {step_seconds(args.latent_run)} "
             "(mean over the run's last session, validation included)")
    print(ae + "\n" + steps)
    if args.page:
        from page import command, hardware, markdown_table, software, write_page

        f_pre, l_pre = models["field"], models["latent"]
        summary = (
            f"The field-space quickstart model (`{args.field_run}`, {f_pre.global_step} steps, on the 16 x 16 field) "
            f"and the latent one (`{args.latent_run}`, {l_pre.global_step} steps, the same denoiser configuration on "
            f"the {' x '.join(map(str, l_pre.sample_shape))} latent of its autoencoder), each sampled with every "
            f"sampler at {args.calls} model calls, on the first {args.samples} fields of the held-out band "
            f"(n in [2.0, 2.5]), {args.members} members a field from the same seeds. Spectral error and CRPS beside "
            "their noise floor (real fields of the nearest parameters); ratio = latent / field spectral error. "
            "The domain-mean std ratio is the spread of the members' field means over the data's, beside its floor."
        )
        table = markdown_table(["sampler", "spectral error (field)", "spectral error (latent)", "floor", "ratio",
                                "CRPS (field)", "CRPS (latent)", "floor", "std ratio (field)", "std ratio (latent)",
                                "domain-mean std ratio (field)", "(latent)", "floor", "verdict (field)",
                                "verdict (latent)", "members/s (field)", "members/s (latent)"],
                               rows)
        write_page(args.page, "Latent diffusion: quality against the field-space model (quickstart)", summary,
                   command(__file__, sys.argv[1:] if argv is None else argv),
                   table + f"\n\nThe {ae}. The {steps}.", hardware_line=hardware(), software_line=software())


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
