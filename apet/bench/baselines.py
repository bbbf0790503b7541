"""What a user would run without apet, measured in the same process: plain Hugging Face generate
(SDPA, all visual tokens) and the paper's reference style: the authors' code path, i.e. HF modules with
their default SDPA attention, ApET (the paper's placement and merging) in eager PyTorch, HF dynamic cache."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from apet.bench.stages import Request, synthetic_request
from apet.bench.timing import summarize
from apet.compression import selector
from apet.contracts.io import KEEP_INDEX, VISUAL_EMBEDS
from apet.contracts.plan import Budget, CompressionPlan, plan_for
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.reference import Reference
from apet.modeling.vision import injected_of
from apet.models.registry import get_family
from apet.runtime.backends.torch import embedding_table, splice


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tensors(arrays: dict[str, np.ndarray], adapter: VisionLanguageAdapter) -> dict[str, torch.Tensor]:
    out = {}
    for name, value in arrays.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(adapter.device)
        out[name] = tensor.to(adapter.dtype) if tensor.is_floating_point() else tensor
    return out


def hf_generate(adapter: VisionLanguageAdapter, request: Request, repeats: int, max_context: int,
                static: bool = False) -> dict[str, Any]:
    """Plain ``generate`` with every visual token: TTFT (max_new_tokens=1) and N-token end to end. ``static``:
    what a careful Hugging Face user turns on — ``cache_implementation="static"``, with which transformers
    compiles the decode step (the strongest plain-HF setup; its warm-up is the compilation)."""
    spec = adapter.spec
    family = get_family(spec.family)
    full = plan_for(spec, family, Budget(ratio=1.0, stages=1))
    _, inputs, make_layout = synthetic_request(adapter, full, request, max_context)
    stages = family.vision_stages(adapter, selector(full.stage1))
    with torch.no_grad():
        index = stages.named(stages(*_tensors(inputs.arrays, adapter).values()))[KEEP_INDEX]
    layout = make_layout(index.cpu().numpy())
    kwargs = _tensors({"input_ids": layout.token_ids, "attention_mask": layout.attention_mask,
                       **family.hf_generate_inputs(inputs, layout)}, adapter)  # the family may rewrite the ids
    if static:
        kwargs["cache_implementation"] = "static"
    device, model = adapter.device, adapter.model

    def run(new_tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**kwargs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=spec.pad_token_id or 0)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    warmup_start = time.perf_counter()
    run(2)  # warm-up (with a static cache: the compilation)
    run(request.new_tokens)
    warmup_s = time.perf_counter() - warmup_start
    ttft = summarize([run(1) for _ in range(repeats)])
    e2e = summarize([run(request.new_tokens) for _ in range(max(3, repeats // 2))])
    per_token = (e2e.median_ms - ttft.median_ms) / max(1, request.new_tokens - 1)
    return {"visual_tokens": int(layout.visual_tokens[0]), "ttft": ttft.to_json(), "end_to_end": e2e.to_json(),
            "decode_ms_per_token": round(per_token, 4), "warmup_s": round(warmup_s, 1),
            "cache": "static" if static else "dynamic"}


def paper_style(adapter: VisionLanguageAdapter, plan: CompressionPlan, request: Request, repeats: int,
                max_context: int) -> dict[str, Any]:
    """The authors' code path: HF modules with SDPA attention (their default; their stage 2 does not even run
    with eager attention), ApET with the paper's semantics in eager PyTorch, HF dynamic cache."""
    processor, inputs, make_layout = synthetic_request(adapter, plan, request, max_context)
    reference = Reference(adapter, plan.stage1, plan.stage2)
    vision_inputs = tuple(_tensors(inputs.arrays, adapter)[n] for n in reference.vision.input_names)
    table, device = embedding_table(adapter), adapter.device
    with torch.no_grad():
        layout = make_layout(reference.visual_embeds(*vision_inputs)[1].cpu().numpy())
    ids, rows, mask, start, positions = (torch.from_numpy(np.ascontiguousarray(a)).to(device) for a in (
        layout.token_ids, layout.visual_rows, layout.attention_mask, layout.image_start, layout.positions))
    ttfts, decodes = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            outputs = reference.vision_outputs(*vision_inputs)
            logits, state = reference.prefill(splice(table, ids, outputs[VISUAL_EMBEDS], rows), mask, start, positions,
                                              injected_of(outputs), rows)
            token = logits[:, -1].argmax(-1)
            _sync(device)
            t1 = time.perf_counter()
            steps, step_mask = [], layout.attention_mask
            for _ in range(min(request.new_tokens - 1, 16)):
                s0 = time.perf_counter()
                step_mask = np.concatenate([step_mask, np.ones_like(step_mask[:, :1])], axis=1)
                position = torch.from_numpy(processor.decode_positions(layout, step_mask)).to(device)
                token = reference.decode(table[token][:, None], state, position)[:, -1].argmax(-1)
                _sync(device)
                steps.append((time.perf_counter() - s0) * 1e3)
            if i > 0:  # the first round is warm-up
                ttfts.append((t1 - t0) * 1e3)
                decodes += steps
    out = {"ttft": summarize(ttfts).to_json()}
    out["decode_per_token"] = summarize(decodes).to_json() if decodes else None
    return out
