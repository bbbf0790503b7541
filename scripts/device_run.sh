#!/usr/bin/env bash
# The GPU runs behind the numbers in docs/benchmarks.md (run from the repository root on a CUDA machine;
# $OUT is where results go). Stages: checks | bench | vision | llm | qwen-checks | qwen-bench
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
  vision)
    python3 scripts/full_size_proof.py vision --device cuda --out /tmp/fullsize/vision --images 16
    cp /tmp/fullsize/vision/proof_vision.json "$OUT/"
    ;;
  llm)
    python3 scripts/full_size_proof.py llm --device cuda --out /tmp/fullsize/llm
    cp /tmp/fullsize/llm/proof_llm.json "$OUT/"
    ;;
  qwen-checks)  # needs pip install -e ".[dev,trt]" (TensorRT engines run on the GPU they were built on)
    python3 scripts/qwen_gpu_checks.py --builder tensorrt --out "$OUT/qwen_gpu_checks.json" 2>&1 | tail -60
    ;;
  qwen-bench)
    for model in qwen2.5-vl-7b-shapes qwen2.5-vl-3b-shapes; do
      for size in 448x448 1344x1344; do
        python3 -m apet.cli bench --model "$model" --ratios 1.0,0.5,0.3,0.11 --batch 1,4 --image-size "$size" \
          --repeats 10 --new-tokens 64 --out "$OUT/$model-$size" | tail -12
      done
    done
    ;;
esac
