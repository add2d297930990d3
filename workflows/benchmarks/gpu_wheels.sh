#!/usr/bin/env bash
# Wheels for running workflows/benchmarks/gpu.sh on a GPU machine that cannot reach a package
# index but already has PyTorch (with CUDA), Lightning, xarray, numpy, scipy, pandas and
# matplotlib, as a cluster's node image often does. Run it here, where pip works; carry the
# folder to the GPU machine; gpu.sh installs what it holds (and scidiff from the checkout) into
# a private target before it runs, without touching the machine's own packages.
#
#   bash workflows/benchmarks/gpu_wheels.sh [folder] [python version]   # default: .whl/ 3.12
#
# What it fetches: what the benchmark and the scidiff CLI path of gpu.sh import and such an
# image lacks: diffusers (the peer), Hydra/OmegaConf (the CLI's config), zarr and its codecs and
# dask (the stores). Not MLflow: gpu.sh's runs use logger=csv and mlflow.run=none. The versions
# are those this repository's CI tests with (2026-12). Pure-python packages published only as
# sources (antlr4-python3-runtime) are built into wheels here.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${1:-.whl}
pyver=${2:-3.12}
mkdir -p "$dest"
py=${PYTHON:-python3}

BINARY=(
    "diffusers==0.42.1" "importlib_metadata==9.1.0"
    "hydra-core==1.3.8" "omegaconf==2.3.1"
    "zarr==3.1.6" "numcodecs==0.16.6" "donfig==0.8.1.post1" "google-crc32c==1.9.0"
    "dask==2026.8.0" "partd==1.4.2" "locket==1.0.0"
)
SOURCE_ONLY=("antlr4-python3-runtime==4.9.3")

platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do
    platforms+=(--platform "$p")
done
for req in "${BINARY[@]}"; do
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
        "${platforms[@]}" -d "$dest" "$req"
done
for req in "${SOURCE_ONLY[@]}"; do
    "$py" -m pip wheel -q --no-deps -w "$dest" "$req"
done
echo "gpu_wheels: $(ls "$dest"/*.whl | wc -l) wheels, $(du -sh "$dest" | cut -f1) in $dest (for Python $pyver)"
