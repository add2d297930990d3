"""ControlNet on a climate model: downscaling as a new condition, against the model without it.

The base model is ``experiment=climate`` (monthly surface temperature tas on the 32 x 64 grid
of the energy-balance model, given CO2 forcing, diffusivity, solar constant and the land-sea
mask), trained here at CPU size (the tiny UNet without attention). ``experiment=climate_controlnet``
then gives the frozen model a new input, the same month's tas block-averaged over 4 x 4 cells
(what a coarse model would provide), through a ControlNet. Both are scored on the held-out
simulations (the test split: parameter settings neither saw), ``--members`` members for each of
``--samples`` months, with DPM-Solver++ 2M at 20 calls: CRPS and the ensemble mean's RMSE
(in K), spectral error, each beside its noise floor, and the verdict. The ControlNet at
``control_scale=0`` is scored too: it must give the base model's numbers exactly.

    python workflows/controlnet_climate.py --out /tmp/controlnet --page docs/benchmarks/controlnet-climate.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from sampler_quickstart import short_verdict  # noqa: E402

from scidiff.evaluation import BoundSettings, EvaluationSettings, SamplingSettings, evaluate  # noqa: E402
from scidiff.inference import DPMSolver, load_pretrained  # noqa: E402

CPU = ["denoiser=unet_tiny_conv", "trainer=cpu", "data.batch_size=32", "data.num_workers=0", "optimizer.lr=1e-3",
       "lr_scheduler.warmup_steps=50", "module.ema_decay=0.995", "trainer.val_check_interval=500",
       "trainer.limit_val_batches=4", "callbacks.periodic_checkpoint.every_n_train_steps=500",
       "trainer.enable_progress_bar=false"]


def train(name: str, experiment: str, steps: int, extra: list[str], args) -> Path:
    run = args.out / "outputs" / experiment / name
    if not (run / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "scidiff.cli.train", f"experiment={experiment}", f"run_name={name}",
                        f"data.path={args.data_path}", f"trainer.max_steps={steps}", *CPU, *extra],
                       cwd=args.out, check=True)
    return run


def score(model, args) -> tuple[dict[str, float | str], object]:
    settings = EvaluationSettings(split="test", max_samples=args.samples, batch_size=32, seed=0,
                                  bound=BoundSettings(enabled=False), sampling=SamplingSettings(members=args.members),
                                  sampler=DPMSolver(steps=20, order=2))
    ev = evaluate(model, settings, data_path=args.data_path, device="cpu", progress=False)
    s = ev.scalars
    keys = ("crps", "ensemble_mean_rmse", "spectral_error", "spread_skill")
    out = {k: s[f"{k}/tas"] for k in keys} | {f"{k}_floor": s[f"floor/{k}/tas"] for k in keys}
    return out | {"verdict": short_verdict(ev)}, ev


def figure(base, control, args, path: Path) -> None:
    """Three test months: the truth, the coarse input, a base member, two ControlNet members."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scidiff.data.dataset import coarsen_repeat
    from scidiff.inference.generation import DPMSolver as Solver
    from scidiff.inference.generation import generate

    dm_state = {"statistics": control.statistics.state_dict(), "split_indices": control.split_indices}
    import hydra.utils as hu

    dm = hu.instantiate(dict(control.config["data"]), path=str(args.data_path), num_workers=0, statistics_path=None)
    dm.load_state_dict(dm_state)
    test = dm.datasets["test"]
    picks = np.asarray(test.indices)[[0, len(test) // 2, len(test) - 1]]
    batch = test.read_batch(picks)
    params = control.statistics.param_transform().inverse(batch["params"].double()).float()
    truth = control.to_physical(batch["x"].double()).float()
    sampler = Solver(steps=20, order=2)
    base_fields = batch["fields"][:, :1]
    b = generate(base, params, [0, 1, 2], sampler=sampler, fields=base_fields)
    c1 = generate(control, params, [0, 1, 2], sampler=sampler, fields=batch["fields"])
    c2 = generate(control, params, [3, 4, 5], sampler=sampler, fields=batch["fields"])
    coarse = coarsen_repeat(truth, None, (4, 4))
    cols = [("truth", truth), ("coarse input (4x4 means)", coarse), ("base model", b), ("ControlNet", c1),
            ("ControlNet, other seed", c2)]
    fig, axes = plt.subplots(3, len(cols), figsize=(3.0 * len(cols), 5.4), constrained_layout=True)
    for i in range(3):
        lo, hi = float(truth[i].min()), float(truth[i].max())
        for j, (title, x) in enumerate(cols):
            im = axes[i, j].imshow(x[i, 0].numpy(), origin="lower", cmap="RdYlBu_r", vmin=lo, vmax=hi)
            axes[i, j].set_xticks([]), axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(title, fontsize=9)
        fig.colorbar(im, ax=axes[i, -1], label="tas (K)", shrink=0.8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("."), help="where the runs (outputs/) and the store go")
    p.add_argument("--data-path", type=Path, default=None, help="climate_small.zarr (generated in --out if absent)")
    p.add_argument("--base-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--page", type=Path, default=None)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_path = (args.data_path or args.out / "climate_small.zarr").resolve()
    if not args.data_path.exists():
        subprocess.run([sys.executable, "-m", "scidiff_datasets.cli", "climate", "--out", str(args.data_path),
                        "--size", "small", "--seed", "0", "-q"], check=True)
    base_run = train("base", "climate", args.base_steps, [], args)
    control_run = train("control", "climate_controlnet", args.steps, [f"finetune.base={base_run}"], args)
    base, control = load_pretrained(base_run), load_pretrained(control_run)
    off = load_pretrained(control_run, control_scale=0.0)
    info = json.loads((control_run / "summary.json").read_text())
    base_info = json.loads((base_run / "summary.json").read_text())
    rows, results = [], {}
    for name, model in (("base", base), ("ControlNet", control), ("ControlNet, control_scale=0", off)):
        r, _ = score(model, args)
        results[name] = r
        print(f"{name:28s} CRPS {r['crps']:.4f} K (floor {r['crps_floor']:.4f}) | ensemble-mean RMSE "
              f"{r['ensemble_mean_rmse']:.4f} K (floor {r['ensemble_mean_rmse_floor']:.4f}) | spectral "
              f"{r['spectral_error']:.4f} (floor {r['spectral_error_floor']:.4f}) | spread-skill {r['spread_skill']:.3f}"
              f" | {r['verdict']}", flush=True)
        rows.append([name, f"{r['crps']:.4f}", f"{r['crps_floor']:.4f}", f"{r['ensemble_mean_rmse']:.4f}",
                     f"{r['ensemble_mean_rmse_floor']:.4f}", f"{r['spectral_error']:.4f}",
                     f"{r['spectral_error_floor']:.4f}", f"{r['spread_skill']:.3f}", r["verdict"]])
    same = results["base"]["crps"] == results["ControlNet, control_scale=0"]["crps"]
    print(f"control_scale=0 reproduces the base model's scores exactly: {same}", flush=True)
    f = info["finetune"]
    print(f"ControlNet: {f['trainable_parameters'] / 1e3:.1f} k trained of {f['base_parameters'] / 1e3:.0f} k base "
          f"parameters | s/step base {base_info['fit_time_s'] / args.base_steps:.3f}, ControlNet "
          f"{info['fit_time_s'] / args.steps:.3f}", flush=True)
    fig = (args.page.parent / (args.page.stem + ".png")) if args.page else args.out / "controlnet_climate.png"
    fig.parent.mkdir(parents=True, exist_ok=True)
    figure(base, control, args, fig)
    if args.page:
        from page import command, hardware, markdown_table, software, write_page

        r0, r1 = results["base"], results["ControlNet"]
        summary = (
            f"The climate model (`experiment=climate` at CPU size: the tiny UNet without attention, {args.base_steps} "
            "steps, batch 32; tas given CO2 forcing, diffusivity, solar constant and the land-sea mask) given a new input "
            f"by a ControlNet (`experiment=climate_controlnet`, {args.steps} steps): the month's tas block-averaged over "
            "4 x 4 cells, as a coarse model would provide it (statistical downscaling, 4x). The ControlNet trains "
            f"{f['trainable_parameters'] / 1e3:.1f} k parameters beside the {f['base_parameters'] / 1e3:.0f} k frozen "
            f"ones. Scored on {args.samples} months of the held-out simulations (test split), {args.members} members "
            "each, DPM-Solver++ 2M at 20 calls; the floor is the same metric for real fields of the nearest conditions "
            "(for the ControlNet, nearest also in the coarse field). The new condition cuts the CRPS by "
            f"{100 * (1 - r1['crps'] / r0['crps']):.0f} % and the ensemble mean's RMSE by "
            f"{100 * (1 - r1['ensemble_mean_rmse'] / r0['ensemble_mean_rmse']):.0f} %; at `control_scale=0` the "
            f"ControlNet gives the base model's scores {'exactly' if same else 'NOT exactly (a bug)'}. "
            f"Figure: `{fig.name}` (three test months: truth, coarse input, a base member, two ControlNet members)."
        )
        table = markdown_table(["model", "CRPS (K)", "floor", "ensemble-mean RMSE (K)", "floor", "spectral error",
                                "floor", "spread-skill", "verdict"], rows)
        write_page(args.page, "ControlNet: downscaling as a new condition (climate)", summary,
                   command(__file__, sys.argv[1:] if argv is None else argv), table + f"\n\n![ControlNet samples]({fig.name})\n",
                   hardware_line=hardware(), software_line=software())


if __name__ == "__main__":
    main()
