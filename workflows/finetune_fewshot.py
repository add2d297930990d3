"""Few-shot adaptation of the quickstart model: LoRA against full fine-tuning, on the new regime
and on the old one.

Two new regimes, each adapted from ~10-13 fields through LoRA adapters and in full (the same
steps and learning rate, ``experiment=quickstart_finetune``):

* **band**: n in [2.0, 2.5], the band held out of the quickstart's training (interpolation):
  trained on the fields of n in [2.245, 2.255], scored on the rest of the band;
* **steep**: n in [3.75, 4.25], beyond the training range [1, 3.5] (extrapolation), a store
  generated here: trained on the fields of n in [3.75, 3.77], scored on those of n >= 3.8.

Each is also run with prior preservation (DreamBooth): 256 fields the base model generates at
parameters of its own training split, whose loss is added with weight 1 at every step. Each
model (base, LoRA, full, and both with the prior) is sampled on the new regime (fields none
of them trained on) and on the **old regime**, the base model's training split (n < 2 or
n > 2.5), to see what the adaptation made the model forget, with the main job's sampler (UniPC
at 20 calls), ``--members`` members for each of the first ``--samples`` fields: spectral error and CRPS beside their noise floor (real fields of the nearest
parameters), and the verdict.

    bash workflows/quickstart.sh                                    # the base model
    python workflows/finetune_fewshot.py outputs/quickstart/<run> --page docs/benchmarks/finetune-fewshot.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
from sampler_quickstart import MAIN_JOB_SAMPLER, short_verdict  # noqa: E402

from scidiff.evaluation import BoundSettings, EvaluationSettings, SamplingSettings, evaluate  # noqa: E402
from scidiff.inference import load_pretrained  # noqa: E402


REGIMES = {  # name: (the store's n range or None for the quickstart's, train range, validation range)
    "band": (None, [2.245, 2.255], [[2.0, 2.2], [2.3, 2.5]]),
    "steep": ([3.75, 4.25], [3.75, 3.77], [3.8, None]),
}


def regime_store(name: str, out: Path, args) -> Path:
    """The store of a regime: the quickstart's, or one generated with the regime's n range."""
    n_range = REGIMES[name][0]
    if n_range is None:
        return args.data_path
    path = (out / f"grf_{name}.zarr").resolve()
    if not path.exists():
        subprocess.run([sys.executable, "-m", "scidiff_datasets.cli", "grf", "--out", str(path), "--size", "small",
                        "--num-samples", "256", "--shape", "16", "16", "--seed", "1", "--spectral-index",
                        *map(str, n_range), "-q"], check=True)
    return path


METHODS = {"lora": [], "full": [], "lora+prior": ["finetune.prior.count=256"], "full+prior": ["finetune.prior.count=256"]}


def finetune(base: Path, regime: str, method: str, store: Path, args) -> Path:
    name = f"{regime}_{method.replace('+', '_')}"
    run = args.out / "outputs" / "quickstart_finetune" / name
    _, train, val = REGIMES[regime]
    if not (run / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "scidiff.cli.train", "experiment=quickstart_finetune",
                        f"finetune.base={base.resolve()}", f"finetune.method={method.split('+')[0]}",
                        f"run_name={name}", *METHODS[method], f"finetune.prior.data_path={args.data_path.resolve()}",
                        f"data.path={store}", f"data.split.train={json.dumps(train)}",
                        f"data.split.val={json.dumps(val)}", f"trainer.max_steps={args.steps}",
                        "trainer.enable_progress_bar=false"], cwd=args.out, check=True)
    return run


def score(pretrained, split: str, indices, store: Path, args) -> dict[str, float | str]:
    model = dataclasses.replace(pretrained, split_indices=indices)
    settings = EvaluationSettings(split=split, max_samples=args.samples, batch_size=32, seed=0,
                                  bound=BoundSettings(enabled=False), sampling=SamplingSettings(members=args.members),
                                  sampler=MAIN_JOB_SAMPLER)
    ev = evaluate(model, settings, data_path=store, device="cpu", progress=False)
    s = ev.scalars
    return {"spectral": s["spectral_error/field"], "spectral_floor": s["floor/spectral_error/field"],
            "crps": s["crps/field"], "crps_floor": s["floor/crps/field"], "std_ratio": s["std_ratio/field"],
            "verdict": short_verdict(ev)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("base", type=Path, help="the trained quickstart run")
    p.add_argument("--out", type=Path, default=Path("."), help="where the fine-tuning runs (outputs/) and stores go")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--members", type=int, default=8)
    p.add_argument("--data-path", type=Path, required=True, help="the quickstart's store (grf_quickstart.zarr)")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--page", type=Path, default=None)
    args = p.parse_args(argv)
    base = load_pretrained(args.base)
    old = base.split_indices                                    # train: the base's own regime
    rows = []
    for regime in args.regimes:
        store = regime_store(regime, args.out, args)
        runs = {m: finetune(args.base, regime, m, store, args) for m in METHODS}
        models = {"base": base, **{m: load_pretrained(r) for m, r in runs.items()}}
        new = models["lora"].split_indices                      # val: the regime's fields not trained on
        for name, model in models.items():
            r = {"new": score(model, "val", new, store, args), "old": score(model, "train", old, args.data_path, args)}
            info = json.loads((runs[name] / "summary.json").read_text()) if name in runs else None
            f = None if info is None else info["finetune"]
            trained = "-" if f is None else f"{f['trainable_parameters'] / 1e3:.1f} k of {f['base_parameters'] / 1e3:.0f} k"
            adapter = "-" if f is None or "adapter" not in f else \
                f"{f['adapter']['bytes'] / 1e3:.0f} kB ({100 * f['adapter']['fraction_of_base']:.1f} %)"
            step = "-" if info is None else f"{info['fit_time_s'] / args.steps:.3f}"
            print(f"{regime:5s} {name:10s} new: spectral {r['new']['spectral']:.4f} (floor {r['new']['spectral_floor']:.4f})"
                  f" crps {r['new']['crps']:.4f} {r['new']['verdict']} | old: spectral {r['old']['spectral']:.4f} (floor "
                  f"{r['old']['spectral_floor']:.4f}) crps {r['old']['crps']:.4f} {r['old']['verdict']} | trained "
                  f"{trained} | adapter {adapter} | s/step {step}", flush=True)
            rows.append([regime, name, f"{r['new']['spectral']:.4f}", f"{r['new']['spectral_floor']:.4f}",
                         f"{r['new']['crps']:.4f}", f"{r['new']['crps_floor']:.4f}", r["new"]["verdict"],
                         f"{r['old']['spectral']:.4f}", f"{r['old']['spectral_floor']:.4f}", f"{r['old']['crps']:.4f}",
                         r["old"]["verdict"], trained, adapter, step])
    if args.page:
        sys.path.insert(0, str(Path(__file__).resolve().parent / "benchmarks"))
        from page import command, hardware, markdown_table, software, write_page

        summary = (
            f"The quickstart model (`{args.base}`) adapted for {args.steps} steps, through LoRA adapters (rank 4 on the "
            "convolutions and the embedding's scale-shift layers) and in full, each also with prior preservation (256 "
            "fields of the base model at its training conditions, weight 1), to two new regimes: *band*, the held-out "
            "band n in [2.0, 2.5] (interpolation; trained on the 13 fields of n in [2.245, 2.255], scored on the rest), "
            "and *steep*, n in [3.75, 4.25] beyond the training range [1, 3.5] (extrapolation; trained on the fields of "
            "n in [3.75, 3.77], scored on n >= 3.8). Old regime: the base's training split. "
            f"{MAIN_JOB_SAMPLER.describe()}, {args.members} members for each of the first "
            f"{args.samples} fields; spectral error and CRPS beside their floor (real fields of the nearest parameters)."
        )
        table = markdown_table(["regime", "model", "new: spectral error", "floor", "new: CRPS", "floor", "new: verdict",
                                "old: spectral error", "floor", "old: CRPS", "old: verdict", "trained parameters",
                                "adapter file", "s/step"], rows)
        write_page(args.page, "Few-shot fine-tuning: LoRA and full (quickstart)", summary,
                   command(__file__, sys.argv[1:] if argv is None else argv), table, hardware_line=hardware(),
                   software_line=software())


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
