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
from typing import Any

import numpy as np
import torch

from apet.bench.stages import Request, synthetic_request
from apet.bench.timing import summarize
from apet.contracts.io import KEEP_INDEX, VISUAL_EMBEDS
from apet.contracts.plan import CompressionPlan
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.reference import Reference
from apet.modeling.vision import injected_of


def _tokens_arg(plan: CompressionPlan) -> str:
    return f"{plan.stage1_keep},{plan.stage2.keep}" if plan.stage2 else str(plan.stage1_keep)


def export_for_bench(adapter: VisionLanguageAdapter, plan: CompressionPlan, out: Path, max_batch: int,
                     max_context: int, attention: str = "pattern") -> tuple[Path, float]:
    from apet.export.artifact import ExportConfig, export_artifact

    dtype = "fp16" if adapter.dtype == torch.float16 else "fp32"
    start = time.perf_counter()
    export_artifact(ExportConfig(model="loaded", out=out, tokens=_tokens_arg(plan), stages=2 if plan.stage2 else 1,
                                 dtype=dtype, max_batch=max_batch, max_context=max_context, attention=attention,
                                 device=str(adapter.device), stage2_layer=plan.stage2.layer if plan.stage2 else None),
                    adapter=adapter)
    return out, time.perf_counter() - start


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ort_run(adapter: VisionLanguageAdapter, plan: CompressionPlan, request: Request, max_context: int,
            repeats: int, parity_steps: int = 32, workdir: Path | None = None,
            attention: str = "pattern") -> dict[str, Any]:
    """Export (``attention``: pattern | op graphs), then TTFT / decode timings of ONNX Runtime and its parity
    with the torch reference; the greedy tokens are kept so two runs of different forms can be compared."""
    from apet.manifest import read_manifest
    from apet.runtime.pipeline import make_backend

    device = "cuda" if adapter.device.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory(dir=workdir, prefix="apet-bench-ort-") as scratch:
        artifact, export_s = export_for_bench(adapter, plan, Path(scratch) / "artifact", request.batch, max_context,
                                              attention)
        # the backend alone: random-weight *-shapes artifacts have no tokenizer, the synthetic request needs none
        backend = make_backend("onnxruntime", artifact, read_manifest(artifact), device)
        processor, inputs, make_layout = synthetic_request(adapter, plan, request, max_context)

        def first_token():
            visual = backend.encode(inputs)
            layout = make_layout(visual.keep_index)
            return visual, layout, backend.prefill(layout, visual)

        first_token()  # warm-up (ORT builds its kernels on first use)
        ttfts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            visual, layout, logits = first_token()
            ttfts.append((time.perf_counter() - t0) * 1e3)
        tokens, steps, mask, ort_logits = [], [], layout.attention_mask, [logits]
        for _ in range(parity_steps):
            token = logits.argmax(-1)
            tokens.append(token.tolist())
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            t0 = time.perf_counter()
            logits = backend.decode(token.astype(np.int64), mask, processor.decode_positions(layout, mask))
            steps.append((time.perf_counter() - t0) * 1e3)
            ort_logits.append(logits)
        parity = _parity(adapter, plan, inputs, layout, visual, backend.stage2_index, tokens, ort_logits, processor)
        files = {p.name: p.stat().st_size for p in artifact.iterdir() if p.suffix in (".onnx", ".data")}
    return {"attention": attention, "execution_provider": "CUDA" if device == "cuda" else "CPU",
            "greedy_tokens": tokens, "export_s": round(export_s, 1), "files_bytes": files,
            "ttft": summarize(ttfts).to_json(), "decode_per_token": summarize(steps).to_json(), "parity": parity}


def _parity(adapter: VisionLanguageAdapter, plan: CompressionPlan, inputs, layout, ort_visual,
            stage2_index: np.ndarray | None, ort_tokens: list[list[int]], ort_logits: list[np.ndarray],
            processor) -> dict[str, Any]:
    """Teacher-forced on ONNX Runtime's tokens: the reference's kept indices and logits at every step."""
    from apet.runtime.backends.torch import embedding_table, splice

    reference = Reference(adapter, plan.stage1, plan.stage2)
    device = adapter.device
    names = reference.vision.input_names
    tensors = [torch.from_numpy(inputs.arrays[n]).to(device) for n in names]
    tensors = [t.to(adapter.dtype) if t.is_floating_point() else t for t in tensors]
    table = embedding_table(adapter)
    with torch.no_grad():
        outputs = reference.vision_outputs(*tensors)
        visual, index = outputs[VISUAL_EMBEDS], outputs[KEEP_INDEX]
        to = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in
              dict(ids=layout.token_ids, rows=layout.visual_rows, mask=layout.attention_mask,
                   start=layout.image_start, positions=layout.positions).items()}
        logits, state = reference.prefill(splice(table, to["ids"], visual, to["rows"]), to["mask"], to["start"],
                                          to["positions"], injected_of(outputs), to["rows"])
        torch_logits, torch_tokens, mask = [logits[:, -1].float().cpu().numpy()], [], layout.attention_mask
        for token in ort_tokens:
            torch_tokens.append(torch_logits[-1].argmax(-1).tolist())
            mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
            position = torch.from_numpy(processor.decode_positions(layout, mask)).to(device)
            step = reference.decode(table[torch.tensor(token, device=device)][:, None], state, position)
            torch_logits.append(step[:, -1].float().cpu().numpy())
    agree = [a == b for a, b in zip(ort_tokens, torch_tokens)]
    first_diff = next((i for i, same in enumerate(agree) if not same), None)
    deltas = [float(np.abs(a - b).max()) for a, b in zip(ort_logits, torch_logits)]
    return {"stage1_index_equal": bool(np.array_equal(ort_visual.keep_index, index.cpu().numpy())),
            "visual_token_diff": _token_diff(np.asarray(ort_visual.embeds), visual.float().cpu().numpy()),
            "stage2_index_equal": None if stage2_index is None else
            bool(np.array_equal(stage2_index, state.stage2_index.cpu().numpy())),
            "stage2_index_overlap": None if stage2_index is None else
            _overlap(stage2_index, state.stage2_index.cpu().numpy()),
            "greedy_steps": len(ort_tokens), "greedy_equal_steps": sum(agree), "first_different_step": first_diff,
            "max_abs_logit_diff": round(max(deltas), 4), "abs_logit_diff_by_step": [round(d, 4) for d in deltas],
            "logit_scale": round(float(np.abs(torch_logits[0]).max()), 4)}


def _token_diff(ort: np.ndarray, torch_: np.ndarray) -> dict[str, float | int]:
    """Per visual token, the largest |Δ| over its features. Rounding moves every token a little; a merge that picks
    another kept token (a near-tie) moves a few tokens a lot: ``outliers`` counts tokens over 10x the median."""
    per_token = np.abs(ort.reshape(-1, ort.shape[-1]).astype(np.float64)
                       - torch_.reshape(-1, torch_.shape[-1])).max(-1)
    median = float(np.median(per_token))
    return {"median": round(median, 5), "max": round(float(per_token.max()), 5),
            "outliers": int((per_token > 10 * median).sum()), "tokens": int(per_token.size),
            "scale": round(float(np.abs(torch_).max()), 4)}


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of kept positions two selections share, per row (near-ties swap a few, bugs most)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return round(float(np.mean([len(set(x.tolist()) & set(y.tolist())) / max(len(x), 1) for x, y in zip(a, b)])), 4)
