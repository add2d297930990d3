#!/usr/bin/env bash
# The main job of README's first command, on CPU, all tracked in the embedded MLflow
# store ./mlflow.db:
#   1. scidiff-train experiment=quickstart: generates the bundled 2-D Gaussian random
#      field store, trains a tiny UNet (DDPM, eps-prediction) with Lightning, writes
#      checkpoints and sample figures under ./outputs/quickstart/<run>/;
#   2. scidiff-sample: a 16-member ensemble from the EMA weights, in physical units,
#      to ./outputs/quickstart/<run>/ensemble.zarr (open it with xarray.open_zarr);
#   3. scidiff-evaluate: the variational bound (bits/dim, all 1000 terms) of the
#      validation fields and the metrics of samples against them, logged to the
#      training's MLflow run, with figures and eval/val/evaluation.nc;
#   4. scidiff-selfcheck: DDPM, DDIM and DDIM inversion on 1-D/2-D/3-D Gaussian
#      fields with the exact denoiser, checked against known answers.
# Extra arguments go to scidiff-train as Hydra overrides (e.g. trainer.max_steps=300).
# RUN=<name> fixes the run name (default: the date and time); running the same RUN
# again continues its training (resume=auto) and its ensemble.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-$(date +%Y-%m-%d_%H-%M-%S)}
RUN_DIR=outputs/quickstart/$RUN

scidiff-train experiment=quickstart run_name="$RUN" resume=auto "$@"
scidiff-sample checkpoint="$RUN_DIR" members=16 sampler.steps=50 out="$RUN_DIR/ensemble.zarr"
scidiff-evaluate checkpoint="$RUN_DIR" split=val sampling.members=4 sampling.steps=50
scidiff-selfcheck --samples 128
