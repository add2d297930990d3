#!/usr/bin/env bash
# The main job of README's first command.
#
# Today it runs the longest end-to-end path that exists: the diffusion core's
# samplers (DDPM, DDIM, DDIM inversion) on 1-D, 2-D and 3-D Gaussian fields with the
# exact (analytic) denoiser, checked against known answers (scidiff-selfcheck).
# When the training stack lands it becomes train -> sample -> evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
scidiff-selfcheck --samples 128 "$@"
