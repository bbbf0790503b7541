"""``apet-bench``: latency, memory and the cost of compression, against the baselines, in one run.

results.json schema (``schema: apet-bench/1``):
  environment   device, torch, transformers, dtype, ceilings {matmul_tflops, bandwidth_gbs}
  config        model, ratios, stages, batch sizes, prompt/new tokens, repeats
  runs[]        one per (batch, ratio): budgets {k1, stage2_layer, k2}, stages {name: timing}, generation
                {ttft, decode_per_token, end_to_end} (timings: median_ms, p90_ms, min_ms, repeats),
                peak_memory_mb, kv_cache_bytes, costs {stage: {flops, bytes}}, floors_ms {stage},
                measured_over_floor {stage}, jetson_floors_ms {device: {stage: ms}},
                paper_style {ttft, decode_per_token}, speedup {vs_hf_generate_ttft, vs_paper_style_ttft, ...}
  baselines     hf_generate[batch] {visual_tokens, ttft, end_to_end, decode_ms_per_token}
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from apet.bench import flops
from apet.bench.baselines import hf_generate, paper_style
from apet.bench.report import write_report
from apet.bench.stages import ApetPath, Request, summarize_generation
from apet.compression import CompressionConfig, Stage2Config
from apet.errors import UsageError
from apet.models.adapter import VisionLanguageAdapter
from apet.models.registry import get_family
from apet.plan import plan_compression

log = logging.getLogger(__name__)

SCHEMA = "apet-bench/1"


@dataclass(frozen=True)
class BenchConfig:
    model: str
    out: Path
    ratios: tuple[float, ...] = (1.0, 0.33, 0.22, 0.11)
    stages: int = 2
    batches: tuple[int, ...] = (1,)
    image_size: tuple[int, int] = (640, 480)  # (width, height) of the synthetic image (dynamic-resolution models)
    prompt_tokens: int = 40
    new_tokens: int = 64
    repeats: int = 10
    device: str = "auto"
    cuda_graphs: bool = True
    compile: bool = False
    baselines: bool = True

    def __post_init__(self) -> None:
        for r in self.ratios:
            if not 0 < r <= 1:
                raise UsageError(f"ratio {r} is outside (0, 1]", "pass --ratios like 1.0,0.33,0.22,0.11")
        if self.new_tokens < 2 or self.repeats < 1 or self.prompt_tokens < 1:
            raise UsageError("--new-tokens must be >= 2, --repeats and --prompt-tokens >= 1", "raise them")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise UsageError(f"--image-size {self.image_size} is invalid", "pass WIDTHxHEIGHT, e.g. 448x448")


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
    vision = family.vision_flops_shape(adapter, image_size) if family.dynamic_tokens and image_size else \
        family.vision_flops_shape(adapter)
    d = spec.decoder
    llm = flops.LlmShape(hidden=d.hidden_size, intermediate=d.intermediate_size, layers=d.num_layers,
                         heads=d.num_heads, kv_heads=d.num_kv_heads, head_dim=d.head_dim, vocab=d.vocab_size)
    return vision, llm


def stage_costs(adapter: VisionLanguageAdapter, stage1: CompressionConfig, stage2: Stage2Config | None,
                request: Request, basis: int, tokens: int, keep: int) -> tuple[dict[str, flops.Cost], list[int]]:
    """Costs at this request's ``tokens`` per image before ApET and ``keep`` after it."""
    vision, llm = shapes_of(adapter, request.image_size)
    spec, b = adapter.spec, request.batch
    prompt = request.prompt_tokens + keep
    per_layer = [prompt - (stage2.removed if stage2 and i >= stage2.layer else 0) for i in range(llm.layers)]
    costs = {"vision_tower": flops.vision_cost(vision, b),
             "apet_stage1": flops.apet_cost(tokens, spec.vision_dim, keep, basis, b)
             if keep < tokens else flops.Cost(0, 0),
             "projector": flops.projector_cost(keep, spec.vision_dim, llm.hidden, b) if vision.projector
             else flops.Cost(0, 0),
             "prefill": flops.prefill_cost(llm, per_layer, b),
             "decode_step": flops.decode_cost(llm, [n + request.new_tokens // 2 for n in per_layer], b)}
    if stage2 is not None:
        costs["apet_stage2"] = flops.apet_cost(stage1.keep, llm.hidden, stage2.compression.keep, basis, b)
    return costs, per_layer


def _plan(adapter: VisionLanguageAdapter, ratio: float, stages: int):
    spec = adapter.spec
    family = get_family(spec.family)
    return plan_compression(spec.n_tokens, spec.decoder.num_layers, ratio=ratio, stages=min(stages, family.max_stages),
                            stage1_placement=family.stage1_placement, per_image=family.dynamic_tokens)


def _max_context(adapter: VisionLanguageAdapter, cfg: "BenchConfig") -> int:
    """One cache size for every ratio: decode graphs (and compiled kernels) are shared across ratios."""
    return cfg.prompt_tokens + 4 * adapter.spec.n_tokens + cfg.new_tokens + 64


def bench_ratio(adapter: VisionLanguageAdapter, cfg: BenchConfig, ceilings: dict[str, float], ratio: float,
                batch: int) -> dict[str, Any]:
    request = Request(batch, cfg.prompt_tokens, cfg.new_tokens, cfg.image_size)
    plan = _plan(adapter, ratio, cfg.stages)
    stage1, stage2 = plan.stage1, plan.stage2
    device = adapter.device
    weights = sum(p.numel() * p.element_size() for p in adapter.model.parameters())
    leftover = 0
    if device.type == "cuda":
        torch.cuda.empty_cache()
        # graphs and compiled code of earlier budgets stay allocated: count only what this budget adds
        leftover = torch.cuda.memory_allocated(device) - weights
        torch.cuda.reset_peak_memory_stats(device)
    path = ApetPath(adapter, plan, request, graphs=cfg.cuda_graphs, compile=cfg.compile,
                    max_context=_max_context(adapter, cfg))
    path.generate()  # warm-up
    runs = [path.generate()[1] for _ in range(cfg.repeats)]
    stages = {k: v.to_json() for k, v in path.stage_timings(cfg.repeats * 3).items()}
    generation = summarize_generation(runs)
    tokens, keep = int(path.features.shape[1]), int(path.kept[1].shape[1])  # this image's N and K
    costs, per_layer = stage_costs(adapter, stage1, stage2, request, stage1.basis, tokens, keep)
    floors = {k: round(c.floor_ms(ceilings["matmul_tflops"], ceilings["bandwidth_gbs"]), 4) for k, c in costs.items()}
    measured = {**{k: v["median_ms"] for k, v in stages.items()},
                "decode_step": (generation["decode_per_token"] or {}).get("median_ms")}
    result = {
        "ratio": ratio, "batch": batch,
        "visual_tokens": tokens,
        "budgets": {"k1": keep, "stage2_layer": stage2.layer if stage2 else None,
                    "k2": stage2.keep if stage2 else None,
                    "mean_tokens": float(keep) if stage2 is None else
                    plan.mean_tokens(adapter.spec.decoder.num_layers)},
        "stages": stages, "generation": generation,
        "peak_memory_mb": round((torch.cuda.max_memory_allocated(device) - leftover) / 2**20, 1)
        if device.type == "cuda" else None,
        "weights_mb": round(weights / 2**20, 1),
        "kv_cache_bytes": flops.kv_bytes(shapes_of(adapter)[1], [n + cfg.new_tokens for n in per_layer], batch,
                                         2 if adapter.dtype == torch.float16 else 4),
        "costs": {k: c.to_json() for k, c in costs.items()}, "floors_ms": floors,
        "measured_over_floor": {k: round(measured[k] / floors[k], 2) for k in floors
                                if measured.get(k) and floors[k] > 0},
        "jetson_floors_ms": flops.project(costs),
    }
    if cfg.baselines:
        result["paper_style"] = paper_style(adapter, plan, request, max(2, cfg.repeats // 3),
                                            _max_context(adapter, cfg))
    del path
    return result


def _speedups(runs: list[dict[str, Any]], baselines: dict[str, Any]) -> None:
    for run in runs:
        ttft = run["generation"]["ttft"]["median_ms"]
        decode = (run["generation"]["decode_per_token"] or {}).get("median_ms")
        hf = baselines.get("hf_generate", {}).get(str(run["batch"]))
        speed: dict[str, float] = {}
        if hf:
            speed["vs_hf_generate_ttft"] = round(hf["ttft"]["median_ms"] / ttft, 2)
            if decode:
                speed["vs_hf_generate_decode"] = round(hf["decode_ms_per_token"] / decode, 2)
        paper = run.get("paper_style")
        if paper:
            speed["vs_paper_style_ttft"] = round(paper["ttft"]["median_ms"] / ttft, 2)
            if decode and paper.get("decode_per_token"):
                speed["vs_paper_style_decode"] = round(paper["decode_per_token"]["median_ms"] / decode, 2)
        full = next((r for r in runs if r["batch"] == run["batch"] and r["ratio"] == 1.0), None)
        if full:
            speed["ttft_over_ratio_1"] = round(ttft / full["generation"]["ttft"]["median_ms"], 3)
        run["speedup"] = speed


def run_bench(cfg: BenchConfig, adapter: VisionLanguageAdapter | None = None) -> dict[str, Any]:
    from apet.models.registry import load_adapter

    device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if cfg.device == "auto" else cfg.device))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    adapter = adapter or load_adapter(cfg.model, dtype=dtype, device=str(device))
    ceilings = measure_ceilings(device, dtype)
    log.info("ceilings: %s", ceilings)
    runs, baselines = [], {"hf_generate": {}}
    work = [(b, r) for b in cfg.batches for r in cfg.ratios]
    for batch, ratio in tqdm(work, desc="apet-bench", unit="config", disable=None):
        runs.append(bench_ratio(adapter, cfg, ceilings, ratio, batch))
    if cfg.baselines:
        for batch in cfg.batches:
            request = Request(batch, cfg.prompt_tokens, cfg.new_tokens, cfg.image_size)
            baselines["hf_generate"][str(batch)] = hf_generate(adapter, request, max(2, cfg.repeats // 2),
                                                               _max_context(adapter, cfg))
    _speedups(runs, baselines)
    import transformers

    results = {
        "schema": SCHEMA,
        "environment": {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else
                        platform.processor() or platform.machine(), "torch": torch.__version__,
                        "transformers": transformers.__version__, "dtype": str(dtype).split(".")[-1],
                        "ceilings": ceilings},
        "config": {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
                   "out": str(cfg.out), "n_tokens": adapter.spec.n_tokens,
                   "num_layers": adapter.spec.decoder.num_layers},
        "runs": runs, "baselines": baselines,
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(results, indent=1))
    write_report(results, cfg.out)
    return results
