#!/usr/bin/env bash
# Install scidiff (editable) with the right torch build for this machine.
#
#   bash workflows/install.sh          # the package
#   bash workflows/install.sh dev      # + test tools          (extras are comma-separated:
#   bash workflows/install.sh dev,bench                         dev, bench, molecules)
#
# torch is chosen before scidiff is installed, so pip never has to pick one:
#   * a torch that already imports is kept as it is (a CUDA build stays a CUDA build);
#   * with an NVIDIA driver present, the default PyPI wheel (a CUDA build) is installed;
#   * otherwise the CPU build (torch==$SCIDIFF_TORCH_VERSION+cpu, PyTorch's CPU index),
#     so a CPU machine never downloads gigabytes of CUDA libraries.
# Set PYTHON to choose the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_VERSION=${SCIDIFF_TORCH_VERSION:-2.13.0}
extras=${1:-}

if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "[install] keeping the installed torch: $("$PYTHON" -c 'import torch; print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[install] NVIDIA GPU found: installing the CUDA build of torch==$TORCH_VERSION"
    "$PYTHON" -m pip install "torch==$TORCH_VERSION"
elif [ "$(uname -s)" = "Linux" ]; then
    echo "[install] no GPU: installing the CPU build of torch==$TORCH_VERSION"
    "$PYTHON" -m pip install "torch==$TORCH_VERSION+cpu" \
        --extra-index-url https://download.pytorch.org/whl/cpu
else
    echo "[install] installing torch==$TORCH_VERSION (this platform's wheels are CPU/MPS builds)"
    "$PYTHON" -m pip install "torch==$TORCH_VERSION"
fi

target="."
[ -n "$extras" ] && target=".[$extras]"
"$PYTHON" -m pip install -e "$target"
echo "[install] scidiff installed; torch $("$PYTHON" -c 'import torch; print(torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")')"
