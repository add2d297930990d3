"""bf16-mixed against float32 training on the quickstart data: does the loss follow?

Trains ``experiment=quickstart`` twice through ``scidiff-train`` from the same seed (same
initial weights, batches, timesteps and noise), once with ``trainer.precision=32-true`` and once
with ``bf16-mixed`` (bfloat16 autocast; weights, optimizer state, EMA and loss in float32), for
``--steps`` steps, and compares

* the validation loss at the last step (the held-out band; every validation draws the same
  timesteps and noise, so the difference is the weights', not the draws'), and
* the mean training loss over the last quarter of the steps.

The goal is a relative difference below 1 % at 200 steps. ``--trainer gpu`` runs both on a
GPU (``trainer=gpu``), with ``--compile`` adding ``module.compile=true`` to the bf16 run.

    python workflows/benchmarks/mixed_precision.py --page docs/benchmarks/mixed-precision.md
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train(precision: str, args, root: Path) -> dict:
    """One run; its per-step training losses, last validation loss and wall time."""
    name = precision.replace("-", "_") + ("_compiled" if args.compile and precision != "32-true" else "")
    cmd = [sys.executable, "-m", "scidiff.cli.train", "experiment=quickstart", f"trainer={args.trainer}",
           f"trainer.precision={precision}", f"trainer.max_steps={args.steps}",
           f"trainer.val_check_interval={args.steps}", "trainer.log_every_n_steps=1", "logger=csv",
           f"callbacks.periodic_checkpoint.every_n_train_steps={args.steps}", "callbacks.samples=null",
           "trainer.enable_progress_bar=false", f"output_root={root}", f"run_name={name}", f"seed={args.seed}"]
    if args.compile and precision != "32-true":
        cmd.append("module.compile=true")
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    if proc.returncode != 0:
        raise SystemExit(f"scidiff-train failed ({precision}):\n{proc.stderr[-3000:]}")
    wall = time.perf_counter() - tic
    rows = list(csv.DictReader((root / "quickstart" / name / "csv" / "metrics.csv").open()))
    train_loss = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    val = [float(r["val/loss"]) for r in rows if r.get("val/loss")]
    return {"train": train_loss, "val": val[-1], "wall_s": wall}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trainer", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--compile", action="store_true", help="module.compile=true for the bf16 run")
    parser.add_argument("--page", type=Path, default=None)
    args = parser.parse_args(argv)
    data = os.environ.get("SCIDIFF_DATA_DIR")
    with tempfile.TemporaryDirectory(prefix="scidiff-precision-") as tmp:
        root = Path(tmp)
        if data is None:  # the quickstart store is generated into the run's directory
            os.environ["SCIDIFF_DATA_DIR"] = str(root / "data")
        runs = {p: train(p, args, root) for p in ("32-true", "bf16-mixed")}
    ref, bf16 = runs["32-true"], runs["bf16-mixed"]
    last = sorted(ref["train"])[-max(1, args.steps // 4):]
    mean = {k: sum(r["train"][s] for s in last) / len(last) for k, r in runs.items()}
    rows = [
        ("validation loss at the last step", ref["val"], bf16["val"]),
        (f"mean training loss, steps {last[0]}-{last[-1]}", mean["32-true"], mean["bf16-mixed"]),
    ]
    print(f"\nbf16-mixed against float32, experiment=quickstart, {args.steps} steps, trainer={args.trainer}"
          + (", bf16 run compiled" if args.compile else ""))
    print(f"{'quantity':<42}{'float32':>10}{'bf16-mixed':>12}{'rel. diff':>11}")
    for label, a, b in rows:
        print(f"{label:<42}{a:>10.5f}{b:>12.5f}{100 * (b / a - 1):>10.2f}%")
    print(f"{'wall time (s)':<42}{ref['wall_s']:>10.1f}{bf16['wall_s']:>12.1f}")
    if args.page:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from page import command, hardware, markdown_table, write_page

        table = markdown_table(["quantity", "float32", "bf16-mixed", "relative difference"],
                               [[label, f"{a:.5f}", f"{b:.5f}", f"**{100 * (b / a - 1):+.2f} %**"] for label, a, b in rows]
                               + [["wall time of the run (s)", f"{ref['wall_s']:.1f}", f"{bf16['wall_s']:.1f}", "-"]])
        summary = (f"`experiment=quickstart` trained twice from the same seed for {args.steps} steps "
                   f"(`trainer={args.trainer}`), with `trainer.precision=32-true` and `bf16-mixed`"
                   + (" plus `module.compile=true`" if args.compile else "") + ": the validation loss at the "
                   "last step (the same timesteps and noise at every validation) and the mean training loss "
                   "over the last quarter of the steps.")
        write_page(args.page, "Mixed precision", summary, command(__file__, sys.argv[1:] if argv is None else argv),
                   table, hardware_line=hardware("cuda" if args.trainer == "gpu" else None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
