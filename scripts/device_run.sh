#!/usr/bin/env bash
# The GPU runs behind docs/benchmarks.md (run from the repository root on a CUDA machine, e.g. through the
# device tool; $OUT is where results go). Stages:
#   ort NN [last]   append one carried piece of the onnxruntime-gpu wheel (.whl/ort.part.NN); install after the last
#   checks          tiny-model token parity of every GPU path, the fused ApET kernel test, variants + profiler
#   llava           apet-bench llava-shapes (two stages, batch 1, compile, all baselines)
#   batch           apet-bench llava-shapes at batch 1, 4 and 8, ratio 1.0 vs 0.11 (one run: the batch table)
#   ortbench [FORM] [STAGES] the exported 7B-shape graphs (attention FORM: pattern | op) in ONNX Runtime CUDA vs the torch
#                   path (parity, greedy tokens, timing); run both forms and compare their greedy tokens
#   forms [ARGS]    each form's one-node kernel error against float64 (scripts/attention_kernel_error.py), then both
#                   attention forms in ONNX Runtime on one set of weights (7B widths, few layers; see
#                   scripts/attention_forms_gpu.py): kernel numerics of op vs pattern without selection near-ties
#   family NAME ... apet-bench for another family (arguments passed through)
#   llm-int8|llm-int4 the 7B-shape LLM exported at int8/int4 (size, time, peak host RAM); bench-weights per format
#   video           apet-bench video-llava-shapes (per-frame budgets 1.0 and 0.125)
#   qwen-checks     Qwen2.5-VL torch GPU vs CPU parity (scripts/qwen_gpu_checks.py)
#   qwen-bench      apet-bench qwen2.5-vl-7b/3b-shapes at two image sizes, batch 1 and 4
#   check7b         apet check of the 7B-shape artifact, ONNX Runtime CUDA vs torch (scripts/gpu_check_7b.sh: how
#                   to prepare and carry the wheels); ART=/tmp/DIR checks an artifact exported earlier
#   export7b DIR    the LLaVA-1.5-7B-shape artifact at 0.11 (fp16, op attention) into /tmp/DIR, kept for later calls
#                   on the same machine (issue 28: export once before and once after a graph change)
#   profile7b A B   ONNX Runtime CUDA's per-scope profile of two such artifacts (apet.bench.ort_profile)
#   towers [ARGS]   the vision towers' GPU fast path (scripts/gpu_towers.py): tiny-model parity against the graph form,
#                   then Qwen2.5-VL-7B 1344² (graph, compile), Qwen3-VL-8B 1024², LLaVA-1.5 CLIP (compile, graph) and
#                   LLaVA-NeXT 672² timed before/after with floors, warm-up seconds and top kernels; where one
#                   call runs out of time: towers --towers qwen25, then towers --towers qwen3,llava,next --no-parity
#   ortstatic-export DIR  the LLaVA-1.5-7B-shape artifact at 0.11 in the static-KV form (fp16, op attention, batch 1,
#                   512 cache positions) into /tmp/DIR, kept for ortstatic (a 7B export of two LLM graphs takes minutes)
#   ortstatic [DIR] [nocg|graph|-] [RUN [REWRITES]]  ONNX Runtime CUDA on the static-KV form (IO binding; decode as a CUDA graph
#                   through GroupQueryAttention; the prompt and the vision as CUDA graphs; nocg: no CUDA graphs; graph:
#                   the exported decode graph; -: the default) -> $OUT/ortstatic[_FORM][_RUN].json
#                   vs the torch path without --compile, one run: summary table + $OUT/ortstatic_summary.json. With DIR
#                   it runs /tmp/DIR from ortstatic-export; without, it exports inside the bench (may pass 10 minutes);
#                   REWRITES: apet-bench --ort-rewrites (a comma list, none or default)
#   ortvision DIR   the graphed vision session of /tmp/DIR made several ways (token-layout attention, MatMulAddFusion
#                   left out, pixels cast on the device, skip norms, packed projections;
#                   scripts/ort_vision_variants.py): wall and GPU-busy ms, kernels, outputs -> $OUT; then
#                   scripts/ort_ttft_parts.py /tmp/DIR (vision, prefill and a decode step apart; CUDA graphs with each
#                   set of the optional rewrites)
#   ortfidelity DIR [N]  each ONNX Runtime vision form of /tmp/DIR against the float32 torch path on N random
#                   images: kept indices, token errors, merges that went another way (scripts/ort_vision_fidelity.py)
#   orttime DIR [SETS]  /tmp/DIR's first token apart (scripts/ort_ttft_parts.py; SETS as its --sets, default: the
#                   default rewrites, and + vision-skip-norms), then scripts/ort_gpu_kernels.py (each phase's wall
#                   time before, across and after its GPU work)
#   ortprocess DIR  the bench with ONNX Runtime in its own torch-free process (--ort-process own) and in the
#                   bench's (shared), between two scripts/ort_ttft_parts.py runs of the default form
#   ortkernels-env DIR [SETTING ...]  the first token apart under ONNX Runtime's attention-kernel environment
#                   switches (VAR=VALUE[,VAR=VALUE]; default: cuDNN prefill attention off, XQA decode off, both);
#                   -> $OUT/ort_ttft_parts_env_VAR-VALUE[+VAR-VALUE].json
#   firsttoken      ONNX Runtime's first-token graph (vision, splice, prefill in one run) against the two sessions
#                   on a tiny fp16 artifact: indices, rows, logits, its CUDA graph replayed (ort_first_token_check.py);
#                   on by default since its 7B time (h200-first-token/); apart: ortstatic DIR - apart
#                   fuse-norms,pack-projections,gqa-rotary
#   flashdecode DIR  issue 28's decode lever: the bench with flash-decode twice and the default once (one session:
#                   speed, and whether two runs of one form give the same tokens and logits), then the decode step
#                   alone in both forms (ort_ttft_parts) -> $OUT/ortstatic_{fd1,fd2,def}*.json, flashdecode_repeat.json
#   apetgraphs DIR  ApET's cost inside ONNX Runtime's graphs: each ApET scope of /tmp/DIR cut out and timed alone, as
#                   a CUDA graph and without, beside the whole vision graph (scripts/ort_apet_graphs.py)
#                   -> $OUT/ort_apet_graphs.json
#   hostcaches DIR  the first token apart with the host's caches (the prompt's layout, a prompt graph's unchanged
#                   small inputs) and without (--no-host-caches), each its own process -> ort_ttft_parts_hostcaches_*.json
#   ortthreads DIR  the first token apart with ONNX Runtime's intra-op thread pool and without it (--threads 1):
#                   whether workers spinning on the host slow the host-bound steps (layout, prefill's host work)
#   autotune [llava|qwen]  LLaVA-1.5-7B (0.11, two stages) or Qwen2.5-VL-7B 1344² (1.0) compiled in Inductor's default
#                   mode and in max-autotune (its GEMM templates timed against cuBLAS per shape), one process
#                   (scripts/gpu_profile.py :autotune; the second compile takes minutes) -> $OUT/profile_autotune_*.json
#   towerattn       Qwen2.5-VL-7B 1344²'s vision-tower attention kernels alone (scripts/gpu_tower_attention.py: the
#                   windows as varlen or one SDPA batch, full attention, each backend forced) (~1 minute)
#   stagetests      tests/test_apet_stage.py on the GPU (its compiles need minutes on a fresh machine)
#   prefill         the prefill's attention kernels alone (scripts/gpu_prefill_attention.py: FlashAttention varlen
#                   against SDPA's causal kernels at the 7B prompt shapes), then LLaVA-1.5-7B (compile) and
#                   LLaVA-NeXT-7B 672² (no compile) with the unpadded prompt attending causally and packed (:packed)
#                   and its cache written by torch's assignment (:cacheassign) (~7 minutes)
#   prefill-qwen    Qwen2.5-VL-7B 1344² (compile, ratio 1.0 and 0.3) with the prefill's rotary tables computed once
#                   and as Inductor decides (:rotaryeach), each pair in one process (~6 minutes)
#   ortmemory DIR   device memory and decode-step time as batch sizes 1, 2, 4 arrive: the decode steps of every
#                   batch size in one session (the default) and a session per batch size (before), each in its own
#                   process (scripts/ort_decode_memory.py), then the one session with share-weights (the prefill's
#                   and decode's sessions reading one copy) -> $OUT/ort_decode_memory_{per-batch,shared,share-weights}.json
#   norms           the fused norms' float16 error on the CUDA provider against a float64 oracle and the unfused nodes,
#                   strict SkipLayerNorm mode on and off (scripts/ort_norm_precision.py) -> $OUT
#   ortkernels DIR [SUFFIX [ARGS]]  what ONNX Runtime CUDA runs on the GPU for /tmp/DIR (scripts/ort_gpu_kernels.py:
#                   wall vs GPU-busy ms, kernel counts, top kernels per phase; ARGS e.g. --decode-attention graph)
#   floor [ARGS]    issue 31: the new GPU kernels' tests (ApET stage kernels, fused norms/rotary), then
#                   scripts/gpu_floor.py: tiny-model token parity, ApET stages, llava-shapes prefill/decode (batch 1, 4)
#                   and llava-next-shapes prefill, old vs new against their floors (ARGS: --compile, --skip PARTS)
#   issue31 PART    issue 31's whole table in one session, a call per PART (each within the 10-minute limit): llava
#                   (LLaVA-1.5-7B batch 1 and 4 compiled, LLaVA-NeXT-7B 672² uncompiled), qwen (Qwen2.5-VL-7B 1344² at
#                   0.3 and 1.0, batch 1, compiled), qwen4 (the same at batch 4) -> $OUT/issue31_PART.json; after the
#                   last: python scripts/issue31_table.py issue31_*.json --out issue31_table.md (the docs' table)
#   profile CASES   per-stage kernel profiles of the torch path (scripts/gpu_profile.py; cases MODEL[:WxH][:bN]...)
#   gemv [--sweep|--fused]  cuBLAS vs apet's skinny-matmul kernels on the 7B decode projections, cold L2 in CUDA
#                   graphs (scripts/gpu_gemv.py; --fused: the folded one-row projections), after the kernel tests
#   new-families    apet-bench qwen3-vl-8b-shapes (1024², 2048²) and internvl3.5-8b-shapes (1, 6 and 12 tiles)
#                   against HF generate in the same run
set -uo pipefail
export PYTHONPATH="/tmp/ortgpu:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 APET_CACHE=/tmp/apet-cache
OUT="${OUT:-results/device}"
mkdir -p "$OUT"
wait_export() {  # DIR SECONDS: an export started in the background (ortstatic-export): wait for its marker
  local waited=0
  while [ -e "/tmp/$1.started" ] && [ ! -e "/tmp/$1.done" ] && [ "$waited" -lt "$2" ]; do sleep 5; waited=$((waited + 5)); done
  [ -e "/tmp/$1.done" ] && echo "export of $1 took $(cat "/tmp/$1.done") s (waited $waited s)"
  return 0
}
stage="${1:-checks}"
shift || true
case "$stage" in
  ort)  # ort NN [last]: append piece NN of .whl/ort.tar.xz (the onnxruntime-gpu wheel's files, xz: 4 pieces of
        # ~49 MiB where the wheel itself needs 5 calls); unpack into /tmp/ortgpu after the last one
    cat ".whl/ort.part.$1" >> /tmp/ort.tar.xz.partial
    ls -la /tmp/ort.tar.xz.partial
    if [ "${2:-}" = "last" ]; then
      mv /tmp/ort.tar.xz.partial /tmp/ort.tar.xz
      echo "$(cut -d' ' -f1 .whl/ort.sha256)  /tmp/ort.tar.xz" | sha256sum -c - || exit 1
      mkdir -p /tmp/ortgpu && tar -xJf /tmp/ort.tar.xz -C /tmp/ortgpu
      python3 -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())"
      python3 - <<'PY'  # the CUDA provider in a process that never imports torch (the bench's --ort-process own)
import sys

import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from apet.runtime.backends.ort_options import load_cuda_libraries

x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
load_cuda_libraries(ort)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
model.ir_version = 8  # what ONNX Runtime 1.31 reads (the device's newer onnx writes IR 14 by default)
session = ort.InferenceSession(model.SerializeToString(),
                               providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("without torch:", session.get_providers(), "torch imported:", "torch" in sys.modules, onnx.__version__)
PY
    fi
    ;;
  checks)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, onnxruntime, onnx_ir, onnxscript; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'ort', onnxruntime.__version__, onnxruntime.get_available_providers())"
    python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py 2>&1 | tail -5
    python3 scripts/gpu_checks.py --out "$OUT/gpu_checks.json" 2>&1 | tail -30
    python3 scripts/gpu_checks.py --attention op --out "$OUT/gpu_checks_op.json" 2>&1 | tail -30
    python3 scripts/gpu_variants.py --out "$OUT/variants.json" 2>&1 | tail -40
    ;;
  llava)
    python3 -m apet.cli bench --model llava-shapes --ratios 1.0,0.33,0.22,0.11 --stages 2 --batch 1 \
      --repeats 10 --new-tokens 64 --compile --out "$OUT/llava" 2>&1 | tail -40
    ;;
  batch)
    python3 -m apet.cli bench --model llava-shapes --ratios 1.0,0.11 --stages 2 --batch 1,4,8 \
      --repeats 5 --new-tokens 32 --baselines hf --out "$OUT/llava_batch" 2>&1 | tail -30
    ;;
  ortbench)  # ortbench FORM [STAGES]
    form="${1:-pattern}" stages="${2:-2}"
    python3 -m apet.cli bench --model llava-shapes --ratios 0.11 --stages "$stages" --batch 1 --repeats 10 \
      --new-tokens 32 --backends torch,onnxruntime --attention "$form" --baselines "" \
      --out "$OUT/llava_ort_${form}_s$stages" 2>&1 | tail -30
    ;;
  forms)  # one-node kernel error vs float64; then without near-ties (every token kept), then the two-stage 0.11
    # schedule; fp16, then fp32
    for dtype in fp16 fp32; do
      python3 scripts/attention_kernel_error.py --dtype "$dtype" --out "$OUT/kernel_error_${dtype}.json" 2>&1 | tail -6
    done
    for dtype in fp16 fp32; do
      python3 scripts/attention_forms_gpu.py --dtype "$dtype" --ratio 1.0 --stages 1 \
        --out "$OUT/forms_${dtype}_all_tokens.json" "$@" 2>&1 | tail -4
      python3 scripts/attention_forms_gpu.py --dtype "$dtype" --out "$OUT/forms_${dtype}_0.11.json" "$@" 2>&1 | tail -4
    done
    ;;
  video)
    python3 -m apet.cli bench --model video-llava-shapes --ratios 1.0,0.125 --batch 1 \
      --repeats 10 --new-tokens 64 --compile --out "$OUT/video" 2>&1 | tail -20
    ;;
  family)
    python3 -m apet.cli bench "$@" 2>&1 | tail -40
    ;;
  llm-int8|llm-int4)  # 7B-shape LLM graph with quantized weights: size, export time, peak host RAM, ORT parity
    fmt="${1#llm-}"
    python3 scripts/full_size_proof.py llm --device cuda --weights "$fmt" --out "/tmp/fullsize/llm-$fmt"
    cp "/tmp/fullsize/llm-$fmt/proof_llm_$fmt.json" "$OUT/"
    ;;
  bench-weights)  # decode ms/token and TTFT per weight format (torch path), Jetson projections per format
    python3 -m apet.cli bench --model llava-shapes --ratios 1.0,0.11 --stages 2 --batch 1 --repeats 10 \
      --new-tokens 64 --weights fp16,int8,int4 --no-baselines --out "$OUT/weights" | tail -30
    ;;
  qwen-checks)  # [tensorrt|tensorrt-rtx]: also build and run engines (needs a GPU that TensorRT runs on)
    python3 scripts/qwen_gpu_checks.py --builder "${1:-none}" --out "$OUT/qwen_gpu_checks.json" 2>&1 | tail -60
    ;;
  check7b)
    OUT="$OUT" scripts/gpu_check_7b.sh
    ;;
  export7b)
    start=$SECONDS
    python3 -m apet.cli export --model llava-shapes --ratio 0.11 --dtype fp16 --attention op --device cuda \
      --out "/tmp/$1" 2>&1 | tail -5
    echo "export7b $1: $((SECONDS - start)) s"; du -sh "/tmp/$1"
    ;;
  profile7b)
    python3 -m apet.bench.ort_profile "/tmp/$1" "/tmp/$2" --device cuda --repeats 10 --warmup 3 --decode-steps 16 \
      --out "$OUT/ort_profile_llava7b.json" 2>&1 | tail -40
    ;;
  ortstatic-export)  # may run in the background (setsid) while the wheel's pieces are carried: ortstatic waits
    # for its marker /tmp/DIR.done (never wait on `pgrep -f`: the calling shell's own command line matches it).
    # It runs from its own copy of the package: each device call copies the working tree again, and a module
    # imported lazily mid-copy failed the export once (ImportError, docs/benchmarks.md h200-splice/)
    start=$SECONDS
    rm -f "/tmp/$1.done"; touch "/tmp/$1.started"
    src="/tmp/apet-src-$1"; rm -rf "$src"; mkdir -p "$src"; cp -r apet "$src/"
    PYTHONPATH="/tmp/ortgpu:$src" python3 -m apet.cli export --model llava-shapes --ratio 0.11 --stages 2 --dtype fp16 --attention op \
      --kv-cache static --max-batch 1 --max-context 512 --device cuda --out "/tmp/$1" --overwrite 2>&1 | tail -5
    echo "ortstatic-export $1: $((SECONDS - start)) s"; du -sh "/tmp/$1"; ls -la "/tmp/$1"; df -h /tmp | tail -1
    echo "$((SECONDS - start))" > "/tmp/$1.done"
    ;;
  ortstatic)  # ortstatic [DIR] [nocg|graph|-] [RUN]
    extra=() name=ortstatic
    if [ -n "${1:-}" ]; then
      extra+=(--ort-artifact "/tmp/$1")
      wait_export "$1" 480
    fi
    if [ "${2:-}" = "nocg" ]; then extra+=(--no-ort-cuda-graphs); name=ortstatic_nocg; fi
    if [ "${2:-}" = "graph" ]; then extra+=(--ort-decode-attention graph); name=ortstatic_graph; fi
    if [ -n "${3:-}" ]; then name="${name}_$3"; fi
    if [ -n "${4:-}" ]; then extra+=(--ort-rewrites "$4"); fi
    extra+=(--ort-process "${ORT_PROCESS:-own}")
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import onnxruntime as o; print('ort', o.__version__, o.get_available_providers())"
    python3 -m apet.cli bench --model llava-shapes --ratios 0.11 --stages 2 --batch 1 --repeats 10 --new-tokens 32 \
      --backends torch,onnxruntime --attention op --kv-cache static --baselines "" "${extra[@]}" \
      --out "/tmp/bench-$name" 2>&1 | tail -12
    cp "/tmp/bench-$name/results.json" "$OUT/$name.json" 2>/dev/null
    python3 scripts/ort_static_summary.py "/tmp/bench-$name/results.json" --out "$OUT/${name}_summary.json" 2>&1 \
      || echo "no results: see the bench output above"
    ;;
  ortvision)  # ortvision DIR: the graphed vision session's forms (scripts/ort_vision_variants.py), after the export
    wait_export "$1" 540
    python3 scripts/ort_vision_variants.py "/tmp/$1" --out "$OUT/ort_vision_variants.json" 2>&1 | grep -v USDT \
      | tail -45
    python3 scripts/ort_ttft_parts.py "/tmp/$1" --out "$OUT/ort_ttft_parts.json" --no-ungraphed \
      --sets "${2:-none;default;default,vision-skip-norms}" 2>&1 \
      | grep -v "W:onnxruntime" | tail -5
    ;;
  ortfidelity)  # ortfidelity DIR: each ORT vision form (default, + vision-skip-norms) against the float32 torch path
    wait_export "$1" 540
    python3 scripts/ort_vision_fidelity.py "/tmp/$1" --model llava-shapes --images "${2:-8}" \
      --out "$OUT/ort_vision_fidelity.json" 2>&1 | grep -v "W:onnxruntime" | tail -5
    ;;
  firsttoken)  # the first-token graph against the two sessions on a tiny fp16 artifact (CUDA kernels, CUDA graphs)
    python3 scripts/ort_first_token_check.py --out "$OUT/ort_first_token_check.json" 2>&1 | grep -v "W:onnxruntime" \
      | grep -E "batch|graphs|agree|DISAGREE|Error" | cut -c1-600
    ;;
  orttime)  # orttime DIR [SETS]: the first token's parts (ort_ttft_parts) and where each phase's wall time goes
    # around its GPU work (ort_gpu_kernels' timeline); prefix ORT_ENABLE_XQA=0 etc. to try a kernel choice
    wait_export "$1" 540
    python3 scripts/ort_ttft_parts.py "/tmp/$1" --out "$OUT/ort_ttft_parts.json" --no-ungraphed \
      --sets "${2:-default;default,vision-skip-norms}" 2>&1 | grep -v "W:onnxruntime" | cut -c1-600 | tail -5
    python3 scripts/ort_gpu_kernels.py "/tmp/$1" --out "$OUT/ort_kernels_timeline.json" 2>&1 | grep -v USDT \
      | grep -v "W:onnxruntime" | tail -16
    ;;
  ortprocess)  # ortprocess DIR: issue 28's open question, the bench's ONNX Runtime first token above the same code
    # timed alone: the bench with ONNX Runtime in its own torch-free process and in the bench's, between two
    # ort_ttft_parts runs of the same form
    wait_export "$1" 540
    parts() { python3 scripts/ort_ttft_parts.py "/tmp/$1" --out "$OUT/ort_ttft_parts_$2.json" --no-ungraphed \
      --sets default 2>&1 | grep -v "W:onnxruntime" | cut -c1-700 | tail -1; }
    parts "$1" before
    for process in own shared; do
      ORT_PROCESS=$process bash "$0" ortstatic "$1" - "process_$process"
    done
    parts "$1" after
    ;;
  ortkernels-env)  # ortkernels-env DIR [SETTING ...]: the first token apart under ONNX Runtime's attention kernel
    # switches, environment variables it reads when a session is made (default: cuDNN's prefill attention off, XQA
    # decode off, both); each SETTING is VAR=VALUE[,VAR=VALUE] -> $OUT/ort_ttft_parts_env_SETTING.json
    wait_export "$1" 540
    dir="$1"; shift
    settings=("$@")
    [ ${#settings[@]} -gt 0 ] || settings=(ORT_ENABLE_CUDNN_FLASH_ATTENTION=0 ORT_ENABLE_XQA=0 \
      ORT_ENABLE_XQA=0,ORT_ENABLE_CUDNN_FLASH_ATTENTION=0)
    for setting in "${settings[@]}"; do
      IFS=, read -ra vars <<< "$setting"
      name="${setting//=/-}"; name="${name//,/+}"  # the device tool returns no file whose name holds = or ,
      env "${vars[@]}" python3 scripts/ort_ttft_parts.py "/tmp/$dir" --out "$OUT/ort_ttft_parts_env_$name.json" \
        --no-ungraphed --sets default 2>&1 | grep -v "W:onnxruntime" | tail -1 | python3 -c "import json, sys
r = json.loads(sys.stdin.read())
print('$setting', {k: r[k]['median_ms'] for k in ('vision', 'layout', 'prefill', 'vision_and_prefill', 'decode_step')})"
    done
    ;;
  flashdecode)  # flashdecode DIR: flash-decode's speed and run-to-run reproducibility against the default
    wait_export "$1" 540
    for run in fd1 fd2; do bash "$0" ortstatic "$1" - "$run" default,flash-decode 2>&1 | tail -3; done
    bash "$0" ortstatic "$1" - def default 2>&1 | tail -3
    python3 - "$OUT" <<'PY' | tee "$OUT/flashdecode_repeat.json"
import json, sys
out = sys.argv[1]
runs = {name: json.load(open(f"{out}/ortstatic_{name}.json"))["runs"][0]["onnxruntime"] for name in ("fd1", "fd2", "def")}
tokens = {name: [step[0] for step in run["greedy_tokens"]] for name, run in runs.items()}
diffs = {name: run["parity"]["abs_logit_diff_by_step"] for name, run in runs.items()}
print(json.dumps({"tokens_equal_fd1_fd2": tokens["fd1"] == tokens["fd2"], "logits_equal_fd1_fd2": diffs["fd1"] == diffs["fd2"],
                  "tokens_equal_fd1_def": tokens["fd1"] == tokens["def"],
                  "decode_ms": {name: run["decode_per_token"]["median_ms"] for name, run in runs.items()}}))
PY
    python3 scripts/ort_ttft_parts.py "/tmp/$1" --out "$OUT/ort_ttft_parts_flashdecode.json" --no-ungraphed \
      --sets "default;default,flash-decode" 2>&1 | grep -v "W:onnxruntime" | cut -c1-400 | tail -2
    ;;
  apetgraphs)  # apetgraphs DIR: ApET's stages alone in ONNX Runtime CUDA (graphed and not), the vision graph whole
    wait_export "$1" 540
    python3 scripts/ort_apet_graphs.py "/tmp/$1" --out "$OUT/ort_apet_graphs.json" 2>&1 | grep -v "W:onnxruntime" \
      | grep -v "^USDT" | tail -4
    ;;
  hostcaches)  # hostcaches DIR: the first token's host work with the caches and without, in turn, twice
    wait_export "$1" 540
    n=0
    for run in on off on off; do
      n=$((n + 1)); extra=(); [ "$run" = off ] && extra=(--no-host-caches)
      python3 scripts/ort_ttft_parts.py "/tmp/$1" --out "$OUT/ort_ttft_parts_hostcaches_${run}${n}.json" \
        --no-ungraphed --sets default "${extra[@]}" 2>&1 | grep -v "W:onnxruntime" | tail -1 | python3 -c "import json, sys
r = json.loads(sys.stdin.read())
print('host caches $run', {k: r[k]['median_ms'] for k in ('layout', 'vision_and_prefill', 'decode_step')},
      r['inside_first_token'])"
    done
    ;;
  ortthreads)  # ortthreads DIR: the first token apart with ONNX Runtime's intra-op thread pool (its default: one
    # worker per core, spinning between runs) and without (--threads 1)
    wait_export "$1" 540
    for threads in 0 1; do
      extra=(); [ "$threads" = 1 ] && extra=(--threads 1)
      python3 scripts/ort_ttft_parts.py "/tmp/$1" --out "$OUT/ort_ttft_parts_threads$threads.json" --no-ungraphed \
        --sets default "${extra[@]}" 2>&1 | grep -v "W:onnxruntime" | tail -1 | python3 -c "import json, sys
r = json.loads(sys.stdin.read())
print('threads $threads', {k: r[k]['median_ms'] for k in ('vision', 'layout', 'prefill', 'vision_and_prefill',
      'decode_step')}, r['inside_first_token'])"
    done
    ;;
  prefill)  # the new kernels' GPU tests; the prefill attention forms alone, then in the path (pairs in one process)
    timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gemv.py tests/test_decoder_fused.py \
      tests/test_rotary_once.py 2>&1 | tail -3
    python3 scripts/gpu_prefill_attention.py --out "$OUT/prefill_attention.json" 2>&1 | grep -v Warning | cut -c1-200
    python3 scripts/gpu_profile.py --out "$OUT/profile_llava_prefill.json" llava-shapes:b1:s2:compile \
      llava-shapes:b1:s2:compile:packed 2>&1 | grep -E "prefill|ttft|decode_step|failed"
    python3 scripts/gpu_profile.py --out "$OUT/profile_next_672.json" llava-next-shapes:672x672:r1.0 \
      llava-next-shapes:672x672:r1.0:packed llava-next-shapes:672x672:r1.0:cacheassign 2>&1 \
      | grep -E "prefill|ttft|failed"
    ;;
  prefill-qwen)  # Qwen2.5-VL-7B 1344²'s compiled prefill, rotary tables computed once or as Inductor decides
    for ratio in r1.0 r0.3; do
      python3 scripts/gpu_profile.py --out "$OUT/profile_qwen_${ratio}.json" "qwen2.5-vl-7b-shapes:1344x1344:$ratio:compile" \
        "qwen2.5-vl-7b-shapes:1344x1344:$ratio:compile:rotaryeach" 2>&1 | grep -E "prefill|ttft|failed"
    done
    ;;
  autotune)  # autotune llava|qwen: the compiled path in Inductor's default mode and in max-autotune, one process
    case="llava-shapes:1x1:b1:r0.11:s2"  # LLaVA-1.5-7B's 136-token prefill, its TTFT
    [ "${1:-llava}" = qwen ] && case="qwen2.5-vl-7b-shapes:1344x1344:r1.0"  # Qwen2.5-VL-7B's 2,065-token prefill
    timeout 580 python3 scripts/gpu_profile.py --out "$OUT/profile_autotune_${1:-llava}.json" "$case:compile" \
      "$case:autotune" 2>&1 | grep -E "prefill|ttft|vision|failed" | cut -c1-300
    ;;
  towerattn)  # Qwen2.5-VL-7B's tower attention kernels alone, every SDPA backend beside the fast path's
    python3 scripts/gpu_tower_attention.py --out "$OUT/tower_attention.json" 2>&1 | grep -v Warning | cut -c1-260
    ;;
  stagetests)  # the stage kernels' GPU tests alone (a fresh machine compiles for minutes first)
    timeout 450 python3 -m pytest -q -p no:cacheprovider tests/test_apet_stage.py 2>&1 | tail -6
    ;;
  ortmemory)  # ortmemory DIR: the decode sessions' device memory, each form in its own process
    wait_export "$1" 540
    python3 scripts/ort_decode_memory.py "/tmp/$1" --sessions per-batch --out "$OUT/ort_decode_memory_per-batch.json" \
      2>&1 | grep -v "W:onnxruntime" | cut -c1-900 | tail -2
    python3 scripts/ort_decode_memory.py "/tmp/$1" --sessions shared --out "$OUT/ort_decode_memory_shared.json" \
      --compare "$OUT/ort_decode_memory_per-batch.json" 2>&1 | grep -v "W:onnxruntime" | cut -c1-900 | tail -2
    python3 scripts/ort_decode_memory.py "/tmp/$1" --sessions shared --rewrites default,share-weights \
      --out "$OUT/ort_decode_memory_share-weights.json" --compare "$OUT/ort_decode_memory_per-batch.json" 2>&1 \
      | grep -v "W:onnxruntime" | cut -c1-900 | tail -2
    ;;
  norms)
    python3 scripts/ort_norm_precision.py --out "$OUT/ort_norm_precision.json" 2>&1 | grep -v "W:onnxruntime"
    ;;
  ortkernels)  # ortkernels DIR [SUFFIX [ARGS...]]: one profile per call ($OUT/ort_kernels_SUFFIX.json)
    dir="$1" suffix="${2:-cg}"; shift 2 || shift $#
    python3 scripts/ort_gpu_kernels.py "/tmp/$dir" --out "$OUT/ort_kernels_$suffix.json" "$@" 2>&1 | grep -v USDT \
      | tail -25
    ;;
  floor)
    # on a fresh machine Triton's and Inductor's first compiles alone took tests/test_apet_stage.py past 200 s
    timeout 450 python3 -m pytest -q -p no:cacheprovider tests/test_apet_stage.py tests/test_decoder_fused.py \
      tests/test_packed_prefill.py 2>&1 | tail -8
    python3 scripts/gpu_floor.py --out "$OUT/floor.json" "$@" 2>&1 | tail -60
    ;;
  new-families)  # one JSON per run, named for it; the markdown tables of all runs in one file
    run() {  # NAME SECONDS ARGS...
      local name="$1" limit="$2"; shift 2
      timeout "$limit" python3 -m apet.cli bench "$@" --batch 1 --repeats 3 --new-tokens 16 --baselines hf \
        --out "/tmp/bench-$name" 2>&1 | tail -4
      cp "/tmp/bench-$name/results.json" "$OUT/$name.json" 2>/dev/null
      { echo "## $name"; cat "/tmp/bench-$name/results.md" 2>/dev/null; } >> "$OUT/new_families.md"
    }
    run qwen3-vl-8b-1024 150 --model qwen3-vl-8b-shapes --ratios 1.0,0.5,0.25 --image-size 1024x1024
    run qwen3-vl-8b-2048 190 --model qwen3-vl-8b-shapes --ratios 1.0,0.5,0.25 --image-size 2048x2048
    run internvl3.5-8b-1tile 80 --model internvl3.5-8b-shapes --ratios 1.0,0.25,0.11 --image-size 448x448
    run internvl3.5-8b-6tiles 80 --model internvl3.5-8b-shapes --ratios 1.0,0.25,0.11 --image-size 1344x896
    run internvl3.5-8b-12tiles 90 --model internvl3.5-8b-shapes --ratios 1.0,0.25,0.11 --image-size 1792x1344
    ;;
  towers)
    name="towers$(echo "$*" | tr -c 'a-z0-9' '_' | tr -s '_' | cut -c1-60)"  # one JSON per argument set
    timeout 540 python3 scripts/gpu_towers.py --out "$OUT/$name.json" "$@" 2>&1 | grep -v "Loading weights" | tail -80
    ;;
  issue31)  # issue31 llava|qwen|qwen4: one part of issue 31's table per call (scripts/issue31_table.py reads them)
    case "${1:-llava}" in
      llava) cases=(llava-shapes:b1:s2:compile llava-shapes:b4:s2:compile llava-next-shapes:672x672:r1.0) ;;
      qwen) cases=(qwen2.5-vl-7b-shapes:1344x1344:r0.3:compile qwen2.5-vl-7b-shapes:1344x1344:r1.0:compile) ;;
      qwen4) cases=(qwen2.5-vl-7b-shapes:1344x1344:b4:r0.3:compile qwen2.5-vl-7b-shapes:1344x1344:b4:r1.0:compile) ;;
      *) echo "issue31 takes llava, qwen or qwen4"; exit 2 ;;
    esac
    timeout 580 python3 scripts/gpu_profile.py --out "$OUT/issue31_${1:-llava}.json" "${cases[@]}" 2>&1 \
      | grep -E "decode_step|prefill|ttft|apet_stage|failed" | cut -c1-200
    ;;
  profile)
    python3 scripts/gpu_profile.py --out "$OUT/profile.json" "$@" 2>&1 | grep -v -i warn
    ;;
  gemv)
    python3 -m pytest -q -p no:cacheprovider tests/test_gemv.py tests/test_decode_attention.py \
      tests/test_fused_gemv.py 2>&1 | tail -3
    python3 scripts/gpu_gemv.py --out "$OUT/gemv.json" "$@" 2>&1 | tail -24
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
