"""The shipped graphs in the benchmark: export the plan's artifact from the loaded weights, run it in ONNX Runtime
(CUDA execution provider on a GPU), time it, and check it against the torch reference on the same weights.

This is the closest proof on a GPU without TensorRT that ``vision.onnx`` / ``llm.onnx`` compute the right thing in
fp16: kept indices of both stages, greedy tokens and the largest logit difference against the HF-module reference
(:class:`apet.modeling.reference.Reference`, which shares no graph code with the export).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from apet.bench.ort_process import ORT_PROCESSES, OrtRunSpec, time_in_own_process
from apet.bench.ort_timing import time_backend
from apet.bench.stages import Request, request_tokenizer, synthetic_request
from apet.bench.timing import summarize
from apet.contracts.comparison import (
    DEFAULT_TOLERANCE,
    GREEDY,
    KEEP_INDEX,
    LOGITS,
    STAGE2_INDEX,
    STEP_LOGITS,
    StageRow,
    compare_outputs,
)
from apet.contracts.io import VISUAL_EMBEDS
from apet.contracts.plan import CompressionPlan
from apet.errors import UsageError
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.reference import Reference
from apet.modeling.vision import injected_of


def _tokens_arg(plan: CompressionPlan) -> str:
    return f"{plan.stage1_keep},{plan.stage2.keep}" if plan.stage2 else str(plan.stage1_keep)


def export_for_bench(adapter: VisionLanguageAdapter, plan: CompressionPlan, out: Path, max_batch: int,
                     max_context: int, attention: str = "pattern", kv_cache: str = "dynamic") -> tuple[Path, float]:
    from apet.export.artifact import ExportConfig, export_artifact

    dtype = "fp16" if adapter.dtype == torch.float16 else "fp32"
    start = time.perf_counter()
    export_artifact(ExportConfig(model="loaded", out=out, tokens=_tokens_arg(plan), stages=2 if plan.stage2 else 1,
                                 dtype=dtype, max_batch=max_batch, max_context=max_context, attention=attention,
                                 device=str(adapter.device), stage2_layer=plan.stage2.layer if plan.stage2 else None,
                                 kv_cache=kv_cache),
                    adapter=adapter)
    return out, time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ort_run(adapter: VisionLanguageAdapter, plan: CompressionPlan, request: Request, max_context: int,
            repeats: int, parity_steps: int = 32, workdir: Path | None = None,
            attention: str = "pattern", kv_cache: str = "dynamic", cuda_graphs: bool = True,
            artifact: Path | None = None, decode_attention: str = "auto",
            rewrites: str = "default", process: str = "own") -> dict[str, Any]:
    """Export (``attention``: pattern | op graphs; ``kv_cache``: dynamic | static LLM form), then TTFT / decode
    timings of ONNX Runtime (``cuda_graphs``: the static form's decode replayed as a CUDA graph) and its parity
    with the torch reference; the greedy tokens are kept so two runs of different forms can be compared.
    ``artifact``: one exported earlier from the same weights (its form and cache size are its own), not exported
    here. ``process``: own (ONNX Runtime timed in a torch-free process of its own, as the device runtime runs:
    :mod:`apet.bench.ort_process`) or shared (in this process, beside the torch path)."""
    from apet.manifest import read_manifest

    if process not in ORT_PROCESSES:
        raise UsageError(f"--ort-process {process} is unknown", f"choose from {', '.join(ORT_PROCESSES)}")
    device = "cuda" if adapter.device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(dir=workdir, prefix="apet-bench-ort-") as scratch:
        if artifact is None:
            artifact, export_s = export_for_bench(adapter, plan, Path(scratch) / "artifact", request.batch,
                                                  max_context, attention, kv_cache)
        else:
            export_s = 0.0
        manifest = read_manifest(artifact)
        _check_artifact(manifest, plan, request)
        attention, kv_cache, max_context = manifest.attention, manifest.kv_cache, manifest.max_context
        processor, inputs, make_layout = synthetic_request(adapter, plan, request, max_context)
        tokenizer = request_tokenizer(adapter)  # the child writes the prompt as the bench does
        spec = OrtRunSpec(str(artifact), device, cuda_graphs, decode_attention, rewrites, request.batch,
                          tuple(request.image_size), request.prompt_tokens, request.new_tokens, repeats, parity_steps,
                          None if tokenizer is None else str(tokenizer))
        if process == "own":
            timings, torch_imported = time_in_own_process(spec, inputs.arrays, make_layout)
        else:
            timings = time_backend(spec.backend(manifest), processor, inputs, make_layout, repeats, parity_steps)
            torch_imported = True
        layout = make_layout(timings.keep_index)
        visual = SimpleNamespace(keep_index=timings.keep_index, embeds=timings.visual_embeds)
        parity = _parity(adapter, plan, inputs, layout, visual, timings.stage2_index, timings.tokens,
                         timings.logits, processor)
        files = {p.name: p.stat().st_size for p in artifact.iterdir() if p.suffix in (".onnx", ".data")}
    return {"attention": attention, "kv_cache": kv_cache, "max_context": max_context,
            "cuda_graphs": cuda_graphs and kv_cache == "static" and device == "cuda",
            "process": process, "torch_in_process": torch_imported, **timings.backend,
            "execution_provider": "CUDA" if device == "cuda" else "CPU",
            "greedy_tokens": timings.tokens, "export_s": round(export_s, 1), "files_bytes": files,
            "ttft": summarize(timings.ttft_ms).to_json(),
            "ttft_parts": {name: summarize(values).to_json() for name, values in timings.parts_ms.items()},
            "decode_per_token": summarize(timings.decode_ms).to_json(), "parity": parity}


def _check_artifact(manifest, plan: CompressionPlan, request: Request) -> None:
    """An artifact given to the bench must hold the plan's budgets and the request's batch."""
    stage2 = manifest.compression.stage2
    same = manifest.compression.stage1_keep == plan.stage1_keep and (stage2 is None) == (plan.stage2 is None) and \
        (stage2 is None or (stage2.layer, stage2.keep) == (plan.stage2.layer, plan.stage2.keep))
    if not same or manifest.max_batch < request.batch:
        raise UsageError(f"the ONNX Runtime artifact holds budgets {_tokens_arg(manifest.compression)} and batch "
                         f"{manifest.max_batch}, the bench runs {_tokens_arg(plan)} at batch {request.batch}",
                         "export it with the bench's --ratios/--stages and a --max-batch that covers --batch")


def _parity(adapter: VisionLanguageAdapter, plan: CompressionPlan, inputs, layout, ort_visual,
            stage2_index: np.ndarray | None, ort_tokens: list[list[int]], ort_logits: list[np.ndarray],
            processor) -> dict[str, Any]:
    """Teacher-forced on ONNX Runtime's tokens: the reference's kept indices and logits at every step, compared
    by apet check's rule (:mod:`apet.contracts.comparison`)."""
    reference = _reference_outputs(adapter, plan, inputs, layout, ort_tokens, processor)
    candidate = {KEEP_INDEX: ort_visual.keep_index, "projector": ort_visual.embeds, GREEDY: ort_tokens,
                 LOGITS: ort_logits[0], STEP_LOGITS: np.stack(ort_logits)}
    if stage2_index is not None:
        candidate[STAGE2_INDEX] = stage2_index
    tolerance = DEFAULT_TOLERANCE["fp16" if adapter.dtype == torch.float16 else "fp32"]
    return parity_json(compare_outputs(reference, candidate, tolerance))


def _reference_outputs(adapter: VisionLanguageAdapter, plan: CompressionPlan, inputs, layout,
                       ort_tokens: list[list[int]], processor) -> dict[str, np.ndarray]:
    """The HF-module reference fed ONNX Runtime's tokens: its kept indices, visual tokens, the token it would
    have chosen and its logits at every step."""
    from apet.runtime.backends.torch import embedding_table, splice

    reference = Reference(adapter, plan.stage1, plan.stage2)
    device = adapter.device
    names = reference.vision.input_names
    tensors = [torch.from_numpy(inputs.arrays[n]).to(device) for n in names]
    tensors = [t.to(adapter.dtype) if t.is_floating_point() else t for t in tensors]
    table = embedding_table(adapter)
    with torch.no_grad():
        vision_out = reference.vision_outputs(*tensors)
        visual, index = vision_out[VISUAL_EMBEDS], vision_out[KEEP_INDEX]
        to = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in
              dict(ids=layout.token_ids, rows=layout.visual_rows, mask=layout.attention_mask,
                   start=layout.image_start, positions=layout.positions).items()}
        logits, state = reference.prefill(splice(table, to["ids"], visual, to["rows"]), to["mask"], to["start"],
                                          to["positions"], injected_of(vision_out), to["rows"])
        torch_logits, torch_tokens, mask = [logits[:, -1].float().cpu().numpy()], [], layout.attention_mask
        for token in ort_tokens:
            torch_tokens.append(torch_logits[-1].argmax(-1).tolist())
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            position = torch.from_numpy(processor.decode_positions(layout, mask)).to(device)
            step = reference.decode(table[torch.tensor(token, device=device)][:, None], state, position)
            torch_logits.append(step[:, -1].float().cpu().numpy())
    outputs = {KEEP_INDEX: index.cpu().numpy(), "projector": visual.float().cpu().numpy(), GREEDY: torch_tokens,
               LOGITS: torch_logits[0], STEP_LOGITS: np.stack(torch_logits)}
    if state.stage2_index is not None:
        outputs[STAGE2_INDEX] = state.stage2_index.cpu().numpy()
    return outputs


def parity_json(rows: dict[str, StageRow]) -> dict[str, Any]:
    """The benchmark's parity fields (``results.json``, ``apet-bench/2``) from apet check's rows."""
    stage2, greedy, steps = rows.get(STAGE2_INDEX), rows[GREEDY].metrics, rows[STEP_LOGITS].metrics
    return {"stage1_index_equal": rows[KEEP_INDEX].metrics["equal"],
            "visual_token_diff": rows["projector"].metrics["visual_token_diff"],
            "stage2_index_equal": None if stage2 is None else stage2.metrics["equal"],
            "stage2_index_overlap": None if stage2 is None else stage2.metrics["shared"],
            "greedy_steps": greedy["steps"], "greedy_equal_steps": greedy["equal_steps"],
            "first_different_step": greedy["first_different_step"],
            "max_abs_logit_diff": round(steps["max_abs"], 4),
            "abs_logit_diff_by_step": [round(d, 4) for d in steps["max_abs_by_step"]],
            "logit_scale": round(rows[LOGITS].metrics["scale"], 4)}
