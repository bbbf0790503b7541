#!/usr/bin/env bash
# The whole workflow on the built-in tiny model, on any Linux machine (no GPU, no network beyond pip):
# install -> apet-export (ONNX + ApET) -> apet-build (TensorRT-RTX engines, ahead of time) -> trtexec lines
# -> apet inspect (verifies everything) -> apet-run (TensorRT when a supported GPU is present, else ONNX Runtime).
#   scripts/demo.sh [OUT_DIR]          (default: demo)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-demo}"
bash scripts/setup.sh .venv
# shellcheck disable=SC1091
source .venv/bin/activate
overwrite=()
[ -f "$out/manifest.json" ] && overwrite=(--overwrite)  # re-running replaces the previous demo artifact only
apet-export --model tiny --ratio 0.11 --out "$out" "${overwrite[@]}"
apet-build "$out" --backend tensorrt-rtx --overwrite
apet-build "$out" --emit-trtexec
apet inspect "$out"
apet-run "$out" --image @demo --prompt "Describe the image." --max-new-tokens 24 --stats
echo "(the tiny model has random weights: the answer is gibberish, the point is that every stage ran)"
