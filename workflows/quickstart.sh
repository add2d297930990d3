#!/usr/bin/env bash
# The main job of README's first command, on CPU, all tracked in the embedded MLflow
# store ./mlflow.db:
#   1. scidiff-train experiment=quickstart: generates the bundled store of 4096 periodic 16x16
#      Gaussian random fields with P(k) = A k^-n, trains a small UNet (v-prediction) conditioned
#      on (n, A), with the band n in [2.0, 2.5] held out of training (the validation split);
#      checkpoints and sample figures under ./outputs/quickstart/<run>/;
#   2. scidiff-sample: 16 members (UniPC, 20 model calls, the sampler judged in 4.) at each of three
#      held-out spectral indices (2.1, 2.25, 2.4; A = 1), in physical units, to
#      ./outputs/quickstart/<run>/ensemble.zarr (open it with xarray.open_zarr);
#   3. scidiff-selfcheck: DDPM, DDIM and DDIM inversion on 1-D/2-D/3-D Gaussian fields with the
#      exact denoiser, checked against known answers;
#   4. scidiff-evaluate on 64 fields of the held-out band: the variational bound (bits/dim,
#      importance-sampled with 100 terms, unbiased, with its standard error) against the store's
#      exact log-likelihood, and every sample metric of 8 members per field (UniPC, 20 calls) next
#      to its noise floor (the same metric for real fields), logged to the training's MLflow run
#      with figures and eval/val/evaluation.nc. It ends with the verdict, and the job exits with
#      status 3 when the model is not faithful.
# Extra arguments go to scidiff-train as Hydra overrides (e.g. trainer.max_steps=3000).
# RUN=<name> fixes the run name (default: the date and time); running the same RUN
# again continues its training (resume=auto) and its ensemble, and evaluates it again.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-$(date +%Y-%m-%d_%H-%M-%S)}
RUN_DIR=outputs/quickstart/$RUN

scidiff-train experiment=quickstart run_name="$RUN" resume=auto "$@"
scidiff-sample checkpoint="$RUN_DIR" members=16 sampler=unipc sampler.steps=20 out="$RUN_DIR/ensemble.zarr" \
    'params.list=[{spectral_index: 2.1, amplitude: 1.0}, {spectral_index: 2.25, amplitude: 1.0}, {spectral_index: 2.4, amplitude: 1.0}]'
scidiff-selfcheck --samples 128
scidiff-evaluate checkpoint="$RUN_DIR" split=val max_samples=64 bound.estimator=importance bound.num_terms=100 \
    sampling.members=8 sampler=unipc sampler.steps=20 verdict.fail_on_unfaithful=true overwrite=true
