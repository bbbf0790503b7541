#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install apet with the dev and TensorRT-RTX extras.
#   scripts/setup.sh [VENV_DIR]        (default .venv)
# torch is installed first as the CPU build, from the PyTorch CPU index: without that, pip would resolve
# torch to the CUDA build from PyPI (a 500+ MB wheel plus ~3 GB of CUDA libraries) that apet does not need
# on a CPU-only machine. The "+cpu" pin can only be met by a CPU wheel: from that index, or from a local
# wheel where pip is configured with one (find-links), which is then used without any download.
# Set APET_TORCH (e.g. APET_TORCH="torch==2.13.0" on a CUDA machine) to install another torch instead.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${1:-.venv}"
python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install --quiet --upgrade pip
torch_spec="${APET_TORCH:-torch==2.13.0+cpu}"
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__ == '${torch_spec#*==}' else 1)" 2>/dev/null; then
  python -m pip install --quiet --retries 1 "$torch_spec" --extra-index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install --quiet -e ".[dev,rtx,serve]"
python -c "import torch, tensorrt_rtx_bindings as t; print('apet set up in $venv: torch', torch.__version__, \
'| TensorRT-RTX', t.__version__)"
