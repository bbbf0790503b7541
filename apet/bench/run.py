"""``apet-bench``: latency, memory and the cost of compression, against the baselines, in one run.

results.json schema (``schema: apet-bench/1``):
  environment   device, torch, transformers, dtype, ceilings {matmul_tflops, bandwidth_gbs}
  config        model, ratios, stages, batch sizes, prompt/new tokens, repeats
  runs[]        one per (batch, ratio): budgets {k1, stage2_layer, k2}, stages {name: timing}, generation
                {ttft, decode_per_token, end_to_end} (timings: median_ms, p10_ms, p90_ms, min_ms, repeats),
                vision_warmup_s (compile with --compile, warm-up runs and graph capture of the vision stage),
                peak_memory_mb, kv_cache_bytes, costs {stage: {flops, bytes}}, floors_ms {stage},
                measured_over_floor {stage}, jetson_floors_ms {device: {stage: ms}}, apet_layers {stage: parsed
                TensorRT layers}, jetson_apet_ms {device: {stage: {layers, layer_us, launch_ms, floor_ms, ms}}},
                paper_style {ttft, decode_per_token}, speedup {vs_hf_generate_ttft, vs_paper_style_ttft, ...}
  baselines     hf_generate[batch] {visual_tokens, ttft, end_to_end, decode_ms_per_token}
  noisy_timings {path: p90/median} of every timing above noisy_spread (apet.bench.timing.NOISY_SPREAD)
"""

from __future__ import annotations

import gc
import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from apet.atomic import write_atomic
from apet.bench import apet_layers, flops
from apet.bench.baselines import hf_generate, paper_style
from apet.bench.report import write_report
from apet.bench.stages import ApetPath, Request, bench_manifest, summarize_generation
from apet.bench.timing import NOISY_SPREAD, noisy_timings
from apet.contracts.budget_options import check_ratios
from apet.contracts.compression import CompressionConfig, Stage2Config
from apet.contracts.io import KV_CACHE_FORMS
from apet.contracts.plan import Budget, plan_for
from apet.contracts.targets import resolve_form
from apet.errors import UsageError
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.devices import check_torch_device
from apet.models.registry import get_family

log = logging.getLogger(__name__)

SCHEMA = "apet-bench/2"
BASELINES = ("hf", "hf-static", "paper")  # plain HF generate, HF with static cache + compiled decode, authors' path


@dataclass(frozen=True)
class BenchConfig:
    model: str
    out: Path
    ratios: tuple[float, ...] = (1.0, 0.33, 0.22, 0.11)
    stages: int = 2
    batches: tuple[int, ...] = (1,)
    prompt_tokens: int = 40
    new_tokens: int = 64
    repeats: int = 10
    device: str = "auto"
    cuda_graphs: bool = True
    compile: bool = False
    compile_mode: str = "default"  # apet.runtime.compiled.COMPILE_MODES (with compile)
    baselines: tuple[str, ...] = BASELINES
    backends: tuple[str, ...] = ("torch",)
    # (width, height) of the synthetic image: sets LLaVA-NeXT's views and Qwen2.5-VL's token count
    image_size: tuple[int, int] = (640, 480)
    weights: tuple[str, ...] = ("fp16",)  # LLM weight formats, each benched in turn (RTN: same speed as AWQ)
    group_size: int | None = None
    attention: str = "pattern"  # form of the graphs the onnxruntime backend exports (apet.contracts.targets)
    kv_cache: str = "dynamic"  # the LLM cache form it exports (apet-export --kv-cache; static: CUDA graphs)
    # an artifact exported earlier from the same (seeded) weights, run instead of exporting one (7B exports take
    # minutes); its budgets must be the plan's
    ort_artifact: Path | None = None
    ort_cuda_graphs: bool = True  # ONNX Runtime's static decode as a CUDA graph (with cuda_graphs)
    ort_decode_attention: str = "auto"  # its decode attention: auto | gqa | graph (apet-run --decode-attention)
    ort_rewrites: str = "default"  # its optional graph rewrites (apet-run --ort-rewrites)
    ort_process: str = "own"  # own: ONNX Runtime timed in a torch-free process, as on a device; shared: this one
    layer_us: dict[str, float] | None = None  # per-layer cost per Jetson (flops.LAYER_US, an assumption) overridden

    def __post_init__(self) -> None:
        from apet.contracts.weights import WEIGHT_FORMATS

        if not self.weights or any(w not in WEIGHT_FORMATS for w in self.weights):
            raise UsageError(f"--weights {','.join(self.weights)}: unknown format", "e.g. --weights fp16,int8,int4")
        check_ratios(self.ratios)
        if self.new_tokens < 2 or self.repeats < 1 or self.prompt_tokens < 1:
            raise UsageError("--new-tokens must be >= 2, --repeats and --prompt-tokens >= 1", "raise them")
        if not self.batches or any(b < 1 for b in self.batches):
            raise UsageError(f"--batch {','.join(map(str, self.batches))} must list batch sizes >= 1",
                             "e.g. --batch 1 or --batch 1,4,8")
        check_torch_device(self.device, allow_auto=True)
        for name, chosen, allowed in (("--baselines", self.baselines, BASELINES),
                                      ("--backends", self.backends, ("torch", "onnxruntime"))):
            unknown = [c for c in chosen if c not in allowed]
            if unknown:
                raise UsageError(f"{name} {','.join(unknown)} is unknown", f"choose from {', '.join(allowed)}")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise UsageError(f"--image-size {self.image_size} is not WIDTHxHEIGHT", "e.g. --image-size 672x672")
        resolve_form(attention=self.attention)
        if self.kv_cache not in KV_CACHE_FORMS:
            raise UsageError(f"--kv-cache {self.kv_cache!r} is unknown", f"use one of {', '.join(KV_CACHE_FORMS)}")


def measure_ceilings(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Matmul throughput (large GEMM) and memory bandwidth (device copy, read + write) of this device."""
    from apet.bench.timing import time_call

    size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    gemm = time_call(lambda: a @ b, device=device, warmup=3, repeats=10)
    elements = (1 << 30 if device.type == "cuda" else 1 << 26) // 2
    src = torch.randn(elements, device=device, dtype=torch.float16)
    dst = torch.empty_like(src)
    copy = time_call(lambda: dst.copy_(src), device=device, warmup=3, repeats=10)
    return {"matmul_tflops": round(2 * size**3 / (gemm.median_ms * 1e-3) / 1e12, 2),
            "bandwidth_gbs": round(2 * src.numel() * 2 / (copy.median_ms * 1e-3) / 1e9, 1)}


def shapes_of(adapter: VisionLanguageAdapter,
              image_size: tuple[int, int] | None = None) -> tuple[flops.VisionShape, flops.LlmShape]:
    spec = adapter.spec
    family = get_family(spec.family)
    # dynamic-resolution ViTs cost what the request's image needs
    vision = family.vision_flops_shape(adapter, image_size=image_size) if family.dynamic_tokens and image_size else \
        family.vision_flops_shape(adapter)
    d = spec.decoder
    llm = flops.LlmShape(hidden=d.hidden_size, intermediate=d.intermediate_size, layers=d.num_layers,
                         heads=d.num_heads, kv_heads=d.num_kv_heads, head_dim=d.head_dim, vocab=d.vocab_size)
    return vision, llm


def stage_costs(adapter: VisionLanguageAdapter, stage1: CompressionConfig, stage2: Stage2Config | None,
                request: Request, basis: int, tokens: int, keep: int, visual_tokens: int, views: int = 1,
                weight_bytes: float | None = None) -> tuple[dict[str, flops.Cost], list[int]]:
    """Costs of one request batch: ``tokens`` per view before ApET and ``keep`` after it, ``visual_tokens`` per
    request at the LLM input, ``views`` vision-graph rows per request (LLaVA-NeXT: base + tiles, each compressed
    to K1), ``weight_bytes`` per LLM weight (quantized)."""
    vision, llm = shapes_of(adapter, request.image_size)
    spec, b = adapter.spec, request.batch
    prompt = request.prompt_tokens + visual_tokens
    per_layer = [prompt - (stage2.removed if stage2 and i >= stage2.layer else 0) for i in range(llm.layers)]
    costs = {"vision_tower": flops.vision_cost(vision, b * views),
             "apet_stage1": flops.apet_cost(tokens, spec.vision_dim, keep, basis, b * views)
             if keep < tokens else flops.Cost(0, 0),
             "projector": flops.projector_cost(keep, spec.vision_dim, llm.hidden, b * views) if vision.projector
             else flops.Cost(0, 0),
             "prefill": flops.prefill_cost(llm, per_layer, b, weight_bytes=weight_bytes),
             "decode_step": flops.decode_cost(llm, [n + request.new_tokens // 2 for n in per_layer], b,
                                              weight_bytes=weight_bytes)}
    if stage2 is not None:
        costs["apet_stage2"] = flops.apet_cost(stage1.keep, llm.hidden, stage2.compression.keep, basis, b)
    return costs, per_layer


def _plan(adapter: VisionLanguageAdapter, ratio: float, stages: int):
    spec = adapter.spec
    family = get_family(spec.family)
    return plan_for(spec, family, Budget(ratio=ratio, stages=stages), clamp_stages=True)


def _max_context(adapter: VisionLanguageAdapter, cfg: "BenchConfig") -> int:
    """One cache size for every ratio: decode graphs (and compiled kernels) are shared across ratios."""
    probe = bench_manifest(adapter, _plan(adapter, 1.0, 1), Request(1, cfg.prompt_tokens, cfg.new_tokens), 0)
    visual = max(4 * adapter.spec.n_tokens, get_family(adapter.family).max_visual_tokens(probe))
    return cfg.prompt_tokens + visual + cfg.new_tokens + 64


def _release_memory(device: torch.device, weights: int) -> int:
    """Free what earlier configurations left (graph pools, caches) and reset the peak; returns the bytes that
    are still allocated beyond the weights (0 when everything was released)."""
    if device.type != "cuda":
        return 0
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return max(0, torch.cuda.memory_allocated(device) - weights)


def dtype_name(dtype: torch.dtype) -> str:
    """A torch dtype in the manifest's words (fp16 / fp32 / bf16): the one name the header and rows use."""
    return {torch.float16: "fp16", torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))


def _weight_format(adapter: VisionLanguageAdapter) -> tuple[str, float | None]:
    """(format, bytes per LLM weight) of the adapter as quantized by :func:`run_bench`; unquantized weights
    are named by the network dtype they are in."""
    spec = getattr(adapter, "weight_spec", None)
    if spec is None or not spec.quantized:
        return dtype_name(adapter.dtype), None
    from apet.contracts.weights import weight_bytes_per_param

    return spec.format, weight_bytes_per_param(spec.format, spec.group_size)


def bench_ratio(adapter: VisionLanguageAdapter, cfg: BenchConfig, ceilings: dict[str, float], ratio: float,
                batch: int) -> dict[str, Any]:
    request = Request(batch, cfg.prompt_tokens, cfg.new_tokens, cfg.image_size)
    plan = _plan(adapter, ratio, cfg.stages)
    stage1, stage2 = plan.stage1, plan.stage2
    device = adapter.device
    weights = sum(t.numel() * t.element_size() for t in list(adapter.model.parameters())
                  + list(adapter.model.buffers()))
    fmt, per_weight = _weight_format(adapter)
    leftover = _release_memory(device, weights)
    path = ApetPath(adapter, plan, request, graphs=cfg.cuda_graphs, compile=cfg.compile,
                    max_context=_max_context(adapter, cfg), compile_mode=cfg.compile_mode)
    path.generate()  # warm-up
    runs = [path.generate()[1] for _ in range(cfg.repeats)]
    stages = {k: v.to_json() for k, v in path.stage_timings(cfg.repeats * 3).items()}
    generation = summarize_generation(runs)
    # host arrays to a token on the host: the span ONNX Runtime's TTFT covers (ApetPath.request_logits)
    generation["request_ttft"] = path.request_ttft(cfg.repeats).to_json()
    tokens, keep = int(path.features.shape[1]), int(path.kept[1].shape[1])  # this view's N and K
    costs, per_layer = stage_costs(adapter, stage1, stage2, request, stage1.basis, tokens, keep, path.visual_tokens,
                                   path.views, per_weight)
    floors = {k: round(c.floor_ms(ceilings["matmul_tflops"], ceilings["bandwidth_gbs"]), 4) for k, c in costs.items()}
    measured = {**{k: v["median_ms"] for k, v in stages.items()},
                "decode_step": (generation["decode_per_token"] or {}).get("median_ms")}
    result = {
        "ratio": ratio, "batch": batch, "weights": fmt, "kernels": dict(path.decoder.kernels),
        "llm_weight_bytes": flops.llm_weight_bytes(shapes_of(adapter)[1], per_weight or adapter.dtype.itemsize),
        # per-image budgets (Qwen2.5-VL) are this image's K; fixed budgets are the plan's
        "budgets": {"k1": keep if stage1.per_image else plan.stage1_keep,
                    "stage2_layer": stage2.layer if stage2 else None, "k2": stage2.keep if stage2 else None,
                    "mean_tokens": float(keep) if stage1.per_image else
                    plan.mean_tokens(adapter.spec.decoder.num_layers),
                    "tokens_per_view": tokens, "visual_tokens": path.visual_tokens, "views": path.views},
        "stages": stages, "generation": generation, "vision_warmup_s": round(path.vision_warmup_s, 3),
        "peak_memory_mb": round((torch.cuda.max_memory_allocated(device) - leftover) / 2**20, 1)
        if device.type == "cuda" else None, "leftover_before_mb": round(leftover / 2**20, 1),
        "visual_tokens": path.visual_tokens,
        "weights_mb": round(weights / 2**20, 1),
        "kv_cache_bytes": flops.kv_bytes(shapes_of(adapter)[1], [n + cfg.new_tokens for n in per_layer], batch,
                                         2 if adapter.dtype == torch.float16 else 4),
        "costs": {k: c.to_json() for k, c in costs.items()}, "floors_ms": floors,
        "measured_over_floor": {k: round(measured[k] / floors[k], 2) for k in floors
                                if measured.get(k) and floors[k] > 0},
        "jetson_floors_ms": flops.project(costs),
        "apet_layers": apet_layers.stage_layers(stage1, stage2, tokens),
    }
    result["jetson_apet_ms"] = flops.project_apet(result["apet_layers"], result["jetson_floors_ms"], cfg.layer_us)
    del path
    if "paper" in cfg.baselines and per_weight is None:  # unquantized
        result["paper_style"] = paper_style(adapter, plan, request, max(2, cfg.repeats // 3),
                                            _max_context(adapter, cfg))
    if "onnxruntime" in cfg.backends:
        from apet.bench.ort_path import ort_run

        _release_memory(device, weights)
        result["onnxruntime"] = ort_run(adapter, plan, request, _max_context(adapter, cfg), cfg.repeats,
                                        attention=cfg.attention, kv_cache=cfg.kv_cache,
                                        cuda_graphs=cfg.cuda_graphs and cfg.ort_cuda_graphs,
                                        artifact=cfg.ort_artifact, decode_attention=cfg.ort_decode_attention,
                                        rewrites=cfg.ort_rewrites, process=cfg.ort_process)
    return result


def _quantized(cfg: BenchConfig, fmt: str, dtype: torch.dtype, device: torch.device) -> VisionLanguageAdapter:
    """A fresh copy of the model with round-to-nearest weights (AWQ changes the values, not the speed)."""
    from apet.contracts.weights import WeightSpec
    from apet.models.registry import load_adapter
    from apet.quant.apply import quantize_model

    model = load_adapter(cfg.model, dtype=dtype, device=str(device))
    result = quantize_model(model, WeightSpec(fmt, cfg.group_size if fmt == "int4" else None, "rtn"))
    model.weight_spec = result.spec  # read by bench_ratio
    return model


def _timings(node: Any, path: str = "") -> dict[str, dict[str, Any]]:
    """Every timing (a dict with median_ms and p90_ms) in the results, by its JSON path."""
    if isinstance(node, dict):
        if "median_ms" in node and "p90_ms" in node:
            return {path: node}
        return {k: v for key, child in node.items() for k, v in _timings(child, f"{path}.{key}" if path
                                                                          else str(key)).items()}
    if isinstance(node, list):
        return {k: v for i, child in enumerate(node) for k, v in _timings(child, f"{path}[{i}]").items()}
    return {}


def _flag_noise(results: dict[str, Any]) -> None:
    """Record and warn about timings whose repeats disagree (p90/median > NOISY_SPREAD): on a loaded
    machine the medians cannot be compared, and nothing else would say so."""
    timings = _timings({"runs": results["runs"], "baselines": results["baselines"]})
    noisy = noisy_timings(timings)
    results["noisy_spread"], results["noisy_timings"] = NOISY_SPREAD, noisy
    if noisy:
        worst = max(noisy, key=noisy.get)
        log.warning("%d of %d timings are noisy: p90 above %.1fx the median (worst %s: %.2fx); another process was "
                    "probably busy on this machine (%s). Rerun it idle, or with more --repeats, before comparing them",
                    len(noisy), len(timings), NOISY_SPREAD, worst, noisy[worst], results["environment"]["device"])


def _speedups(runs: list[dict[str, Any]], baselines: dict[str, Any]) -> None:
    for run in runs:
        ttft = run["generation"]["ttft"]["median_ms"]
        decode = (run["generation"]["decode_per_token"] or {}).get("median_ms")
        speed: dict[str, float] = {}
        for key in ("hf_generate", "hf_static"):
            hf = baselines.get(key, {}).get(str(run["batch"]))
            if hf:
                speed[f"vs_{key}_ttft"] = round(hf["ttft"]["median_ms"] / ttft, 2)
                if decode:
                    speed[f"vs_{key}_decode"] = round(hf["decode_ms_per_token"] / decode, 2)
        paper = run.get("paper_style")
        if paper:
            speed["vs_paper_style_ttft"] = round(paper["ttft"]["median_ms"] / ttft, 2)
            if decode and paper.get("decode_per_token"):
                speed["vs_paper_style_decode"] = round(paper["decode_per_token"]["median_ms"] / decode, 2)
        full = next((r for r in runs if r["batch"] == run["batch"] and r["ratio"] == 1.0
                     and r.get("weights") == run.get("weights")), None)
        if full:
            speed["ttft_over_ratio_1"] = round(ttft / full["generation"]["ttft"]["median_ms"], 3)
        run["speedup"] = speed


PARTIAL = "results.partial.json"  # what a run cut short had measured (removed when results.json is written)


def _results(cfg: BenchConfig, adapter: VisionLanguageAdapter, device: torch.device, dtype: torch.dtype,
             ceilings: dict[str, float], runs: list[dict[str, Any]],
             baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import transformers

    return {
        "schema": SCHEMA,
        "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                        platform.processor() or platform.machine(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "dtype": dtype_name(dtype),
                        "ceilings": ceilings},
        "config": {**{k: (list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v)
                      for k, v in asdict(cfg).items()},
                   "out": str(cfg.out), "n_tokens": adapter.spec.n_tokens,
                   "num_layers": adapter.spec.decoder.num_layers},
        "runs": runs, "baselines": baselines,
    }


def run_bench(cfg: BenchConfig, adapter: VisionLanguageAdapter | None = None) -> dict[str, Any]:
    """Every (weights, batch, ratio) run, then the baselines. After each step the results so far are written to
    ``results.partial.json``, so a bench stopped by a time limit (a GPU lease, a CI job) keeps what it measured."""
    from apet.models.registry import load_adapter

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    adapter = adapter or load_adapter(cfg.model, dtype=dtype, device=str(device))
    ceilings = measure_ceilings(device, dtype)
    log.info("ceilings: %s", ceilings)
    runs: list[dict[str, Any]] = []
    baselines: dict[str, dict[str, Any]] = {"hf_generate": {}, "hf_static": {}}
    cfg.out.mkdir(parents=True, exist_ok=True)

    def save_partial() -> None:
        write_atomic(cfg.out / PARTIAL, json.dumps(_results(cfg, adapter, device, dtype, ceilings, runs, baselines),
                                                   indent=1))

    work = [(b, r) for b in cfg.batches for r in cfg.ratios]
    for fmt in cfg.weights:
        model = adapter if fmt == "fp16" else _quantized(cfg, fmt, dtype, device)
        for batch, ratio in tqdm(work, desc=f"apet-bench {fmt}", unit="config", disable=None):
            runs.append(bench_ratio(model, cfg, ceilings, ratio, batch))
            save_partial()
        if model is not adapter:
            del model
            _release_memory(device, 0)
    weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
    for batch in cfg.batches:
        request = Request(batch, cfg.prompt_tokens, cfg.new_tokens, cfg.image_size)
        for name, key, static in (("hf", "hf_generate", False), ("hf-static", "hf_static", True)):
            if name in cfg.baselines:
                _release_memory(adapter.device, weights)
                baselines[key][str(batch)] = hf_generate(adapter, request, max(2, cfg.repeats // 2),
                                                         _max_context(adapter, cfg), static=static)
                save_partial()
    _speedups(runs, baselines)
    results = _results(cfg, adapter, device, dtype, ceilings, runs, baselines)
    _flag_noise(results)
    write_atomic(cfg.out / "results.json", json.dumps(results, indent=1))
    write_report(results, cfg.out)
    (cfg.out / PARTIAL).unlink(missing_ok=True)
    return results
