#!/usr/bin/env bash
# The main job of README's first command, on CPU:
#   1. scidiff-train experiment=quickstart: generates the bundled 2-D Gaussian random
#      field store, trains a tiny UNet (DDPM, eps-prediction) with Lightning, logs
#      to the embedded MLflow store ./mlflow.db, writes checkpoints and sample
#      figures under ./outputs/quickstart/;
#   2. scidiff-selfcheck: DDPM, DDIM and DDIM inversion on 1-D/2-D/3-D Gaussian
#      fields with the exact denoiser, checked against known answers.
# Ensemble sampling (scidiff-sample) and evaluation (scidiff-evaluate) join this
# job as they land. Extra arguments go to scidiff-train as Hydra overrides.
set -euo pipefail
cd "$(dirname "$0")/.."
scidiff-train experiment=quickstart "$@"
scidiff-selfcheck --samples 128
