#!/usr/bin/env bash
# The GPU runs behind the numbers in docs/benchmarks.md (run from the repository root on a CUDA machine;
# $OUT is where results go). Stages: checks | bench2 | bench1 | video | vision | llm
set -uo pipefail
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 APET_CACHE=/tmp/apet-cache
OUT="${OUT:-results/device}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, transformers, onnxruntime; print('torch', torch.__version__, 'transformers', transformers.__version__, 'ort', onnxruntime.__version__)"
case "${1:-checks}" in
  checks)
    python3 scripts/gpu_checks.py --out "$OUT/gpu_checks.json" 2>&1 | tail -40
    python3 -m apet.bench.compression --devices cuda --batches 1,8 --out "$OUT/compression_bench.json"
    ;;
  bench2)
    python3 -m apet.cli bench --model llava-shapes --ratios 1.0,0.33,0.22,0.11 --stages 2 --batch 1 \
      --repeats 10 --new-tokens 64 --compile --out "$OUT/two_stage" | tail -30
    ;;
  bench1)
    python3 -m apet.cli bench --model llava-shapes --ratios 1.0,0.11 --stages 1 --batch 1 \
      --repeats 10 --new-tokens 64 --compile --out "$OUT/one_stage" | tail -12
    rm -f "$OUT"/one_stage/*.png
    ;;
  video)
    python3 -m apet.cli bench --model video-llava-shapes --ratios 1.0,0.125 --batch 1 \
      --repeats 10 --new-tokens 64 --compile --out "$OUT/video" | tail -12
    ;;
  vision)
    python3 scripts/full_size_proof.py vision --device cuda --out /tmp/fullsize/vision --images 16
    cp /tmp/fullsize/vision/proof_vision.json "$OUT/"
    ;;
  llm)
    python3 scripts/full_size_proof.py llm --device cuda --out /tmp/fullsize/llm
    cp /tmp/fullsize/llm/proof_llm.json "$OUT/"
    ;;
esac
