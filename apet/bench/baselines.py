"""What a user would run without apet, measured in the same process: plain Hugging Face generate
(SDPA, all visual tokens) and the paper's reference style: the authors' code path, i.e. HF modules with
their default SDPA attention, ApET (the paper's placement and merging) in eager PyTorch, HF dynamic cache."""

from __future__ import annotations

import time
from typing import Any

import torch

from apet.bench.stages import Request, synthetic_inputs
from apet.bench.timing import summarize
from apet.compression import CompressionConfig, Stage2Config
from apet.models.base import VisionLanguageAdapter
from apet.reference import Reference


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_generate(adapter: VisionLanguageAdapter, request: Request, repeats: int) -> dict[str, Any]:
    """Plain ``generate`` with every visual token: TTFT (max_new_tokens=1) and N-token end to end."""
    n = adapter.spec.n_tokens
    pixels, ids, mask, _ = synthetic_inputs(adapter, request, n)
    device = pixels.device
    model = adapter.model

    def run(new_tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           pad_token_id=adapter.spec.pad_token_id or 0)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    run(2)  # warm-up
    ttft = summarize([run(1) for _ in range(repeats)])
    e2e = summarize([run(request.new_tokens) for _ in range(max(3, repeats // 2))])
    per_token = (e2e.median_ms - ttft.median_ms) / max(1, request.new_tokens - 1)
    return {"visual_tokens": n, "ttft": ttft.to_json(), "end_to_end": e2e.to_json(),
            "decode_ms_per_token": round(per_token, 4)}


def paper_style(adapter: VisionLanguageAdapter, stage1: CompressionConfig, stage2: Stage2Config | None,
                request: Request, repeats: int) -> dict[str, Any]:
    """The authors' code path: HF modules with SDPA attention (their default; their stage 2 does not even run
    with eager attention), ApET with the paper's semantics in eager PyTorch, HF dynamic cache."""
    pixels, ids, mask, start = synthetic_inputs(adapter, request, stage1.keep)
    device = pixels.device
    reference = Reference(adapter, stage1, stage2)
    table = adapter.embed_tokens().weight
    ttfts, decodes = [], []
    with torch.no_grad():
        for i in range(repeats + 1):
            _sync(device)
            t0 = time.perf_counter()
            visual, _ = reference.visual_embeds(pixels)
            embeds = table[ids].clone()
            embeds[:, int(start[0]):int(start[0]) + stage1.keep] = visual
            logits, state = reference.prefill(embeds, mask, start)
            token = logits[:, -1].argmax(-1)
            _sync(device)
            t1 = time.perf_counter()
            steps = []
            for _ in range(min(request.new_tokens - 1, 16)):
                s0 = time.perf_counter()
                token = reference.decode(table[token][:, None], state)[:, -1].argmax(-1)
                _sync(device)
                steps.append((time.perf_counter() - s0) * 1e3)
            if i > 0:  # the first round is warm-up
                ttfts.append((t1 - t0) * 1e3)
                decodes += steps
    out = {"ttft": summarize(ttfts).to_json()}
    out["decode_per_token"] = summarize(decodes).to_json() if decodes else None
    return out
