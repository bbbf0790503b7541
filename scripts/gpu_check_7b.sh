#!/usr/bin/env bash
# Issue 29 on an H200: `apet check` of the LLaVA-1.5-7B-shape artifact (seeded random weights, ratio 0.11, fp16, op
# attention: the graphs behind the "11 of 96 kept tokens differ" finding in docs/benchmarks.md) with ONNX Runtime's
# CUDA provider against the torch reference (Hugging Face modules), one request, 8 greedy steps. Writes to $OUT:
# check_7b.json (the report), check_7b.txt (its text form), check_7b.log (everything, with timings).
#
#   here, once, in the repository root:  scripts/gpu_check_7b.sh prepare
#       downloads onnxruntime-gpu 1.31.1 and polygraphy wheels into .whl/ (git-ignored), packs the 255 MB ORT wheel's
#       files as .whl/ort.tar.xz (204 MB) in 4 .whl/ort.part.NN pieces (a device call carries at most 64 MiB)
#   device, one call per piece, each soon after the last (the machine stays warm ~30 s between calls):
#       scripts/device_run.sh ort 00      carry [".whl/ort.part.00"]      ... 01, 02 likewise
#   device, the last piece and the check in one call (~8 min: export ~4.5 min, check ~2-3 min):
#       scripts/device_run.sh ort 03 last && scripts/gpu_check_7b.sh
#                                         carry [".whl/ort.part.03", ".whl/ort.sha256", ".whl/polygraphy-*.whl"]
#   dry run on a CPU (tiny model, nothing carried, ~1 min):
#       MODEL=tiny DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/out scripts/gpu_check_7b.sh
set -euo pipefail
MODEL="${MODEL:-llava-shapes}"      # llava-shapes = LLaVA-1.5-7B shapes (CLIP ViT-L/14-336 + Vicuna-7B)
DEVICE="${DEVICE:-cuda}"
RATIO="${RATIO:-0.11}"
ATTENTION="${ATTENTION:-op}"
PYTHON="${PYTHON:-python3}"
ORT_VERSION=1.31.1
OUT="${OUT:-results/device}"
mkdir -p "$OUT"

if [ "${1:-}" = "prepare" ]; then  # here, with network: the wheels the device lacks
  mkdir -p .whl
  platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64)
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "onnxruntime-gpu==$ORT_VERSION"
  poly="$("$PYTHON" -c 'import polygraphy; print(polygraphy.__version__)')"
  "$PYTHON" -m pip download --no-deps --only-binary=:all: -d .whl "polygraphy==$poly"
  wheel=".whl/onnxruntime_gpu-$ORT_VERSION-cp312-cp312-manylinux_2_28_x86_64.whl"
  rm -f .whl/ort.part.*
  unpacked="$(mktemp -d)"; (cd "$unpacked" && unzip -q "$OLDPWD/$wheel" && tar -cf - . | xz -T2 -7) > .whl/ort.tar.xz
  rm -rf "$unpacked"
  split -b 51000000 -d -a 2 .whl/ort.tar.xz .whl/ort.part.   # 4 pieces of <= 49 MiB (the wheel needs 5 calls)
  sha256sum .whl/ort.tar.xz | sed 's# .*/# #' > .whl/ort.sha256
  ls -la .whl
  echo "carry each .whl/ort.part.NN in its own scripts/device_run.sh ort NN call (the last with 'last')"
  exit 0
fi

exec > >(tee "$OUT/check_7b.log") 2>&1
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 APET_CACHE="${APET_CACHE:-/tmp/apet-cache}"
if compgen -G ".whl/polygraphy-*.whl" > /dev/null; then  # carried: the device image has no polygraphy
  "$PYTHON" -m pip install -q --no-index --no-deps --target /tmp/site .whl/polygraphy-*.whl
fi
export PYTHONPATH="/tmp/ortgpu:/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" - "$DEVICE" <<'PY'
import sys

import onnxruntime, polygraphy, torch

providers = onnxruntime.get_available_providers()
print("onnxruntime", onnxruntime.__version__, providers, "| polygraphy", polygraphy.__version__, "| torch",
      torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
if sys.argv[1].startswith("cuda") and "CUDAExecutionProvider" not in providers:
    sys.exit("onnxruntime has no CUDA provider: run the `scripts/device_run.sh ort NN` calls first")
PY

work="$(mktemp -d /tmp/apet-check-7b.XXXX)"
art="${ART:-$work/llava-$RATIO-fp16}"  # ART: an artifact exported earlier with these settings (device_run.sh export7b)
start=$SECONDS
if [ -z "${ART:-}" ]; then
  # the export and the torch runner build the same seeded random weights (same model, dtype and device)
  "$PYTHON" -m apet.cli export --model "$MODEL" --ratio "$RATIO" --dtype fp16 --attention "$ATTENTION" \
    --device "$DEVICE" --out "$art"
  echo "export: $((SECONDS - start)) s"; ls -la "$art"
fi
start=$SECONDS
"$PYTHON" -m apet.cli check "$art" --image apet/assets/demo.png --prompt "Describe the image in detail." \
  --backends torch,onnxruntime --device "$DEVICE" --checkpoint "$MODEL" --steps 8 \
  --report "$OUT/check_7b.json" | tee "$OUT/check_7b.txt"
echo "check: $((SECONDS - start)) s"
rm -rf "$work"
