#!/usr/bin/env bash
# The GPU fast paths in one call of under 10 minutes on one H200: the benchmark tables
# (workflows/benchmarks/gpu.py, in two processes so that a cut-short run keeps the training table),
# then a trainer=fsdp run on the GPU (tested on CPU) sampled in bf16 + torch.compile.
#
#   bash workflows/benchmarks/gpu.sh [out_dir]       # default: gpu-bench/
#   PRECISION=1 bash workflows/benchmarks/gpu.sh     # also bf16-mixed + compile against float32 training
#   WHEELS=.whl bash workflows/benchmarks/gpu.sh     # on a machine without a package index: first install
#                                                   # the wheels of gpu_wheels.sh and this checkout
#
# Writes out_dir/{training.json, training.md, other.json, other.md, gpu.log, fsdp.log}: copy the
# pages into docs/benchmarks/ and link them from its index (the first GPU figures of the project).
set -uo pipefail
cd "$(dirname "$0")/../.."
out=$(mkdir -p "${1:-gpu-bench}" && cd "${1:-gpu-bench}" && pwd)
export SCIDIFF_DATA_DIR=${SCIDIFF_DATA_DIR:-$out/data}
py=${PYTHON:-python3}

if [ -n "${WHEELS:-}" ]; then  # into a private folder first on the path: the machine's packages stay as they are
    site=$out/site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$WHEELS"/*.whl \
      && "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade \
        --target "$site" . || { echo "gpu.sh: installing $WHEELS and scidiff into $site failed"; exit 1; }
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
fi
"$py" -c "import diffusers, hydra, zarr, scidiff, scidiff_datasets" \
    || { echo "gpu.sh: a package is missing (without a package index: WHEELS=, see gpu_wheels.sh)"; exit 1; }

echo "== 1. training steps against diffusers (fp32, bf16, bf16 + compile), MFU" | tee "$out/gpu.log"
timeout 300 "$py" workflows/benchmarks/gpu.py --sections training --json "$out/training.json" \
    --page "$out/training.md" 2>&1 | grep -v Warning | tee -a "$out/gpu.log"

echo "== 2. sampling, 3-D UNet, attention kernels" | tee -a "$out/gpu.log"
timeout 150 "$py" workflows/benchmarks/gpu.py --sections sampling,voxels,attention --json "$out/other.json" \
    --page "$out/other.md" 2>&1 | grep -v Warning | tee -a "$out/gpu.log"

echo "== 3. trainer=fsdp on one GPU, then bf16 + compiled sampling of its checkpoint"
if timeout 90 "$py" -m scidiff.cli.train experiment=quickstart trainer=fsdp trainer.devices=1 trainer.max_steps=300 \
        trainer.val_check_interval=150 callbacks.periodic_checkpoint.every_n_train_steps=150 logger=csv \
        output_root="$out/runs" run_name=fsdp trainer.enable_progress_bar=false > "$out/fsdp.log" 2>&1 \
   && timeout 45 "$py" -m scidiff.cli.sample checkpoint="$out/runs/quickstart/fsdp" members=64 \
        'params.grid={spectral_index: [2.25], amplitude: [1.0]}' out="$out/fsdp.zarr" sampler=dpmpp_2m \
        execution.precision=bf16 execution.compile=true mlflow.run=none progress=false >> "$out/fsdp.log" 2>&1; then
    echo "fsdp: trained and sampled: $(tail -1 "$out/fsdp.log")"
else
    echo "fsdp: FAILED"; tail -20 "$out/fsdp.log"
fi

if [ "${PRECISION:-0}" = 1 ]; then
    echo "== 4. bf16-mixed + compile against float32, 200 quickstart steps"
    timeout 150 "$py" workflows/benchmarks/mixed_precision.py --trainer gpu --compile \
        --page "$out/mixed-precision-gpu.md" 2>&1 | tail -6
fi
