"""The bench's ONNX Runtime timing loop, torch-free: warm-up, back-to-back first tokens (each step timed apart),
then greedy decode steps whose tokens and logits the parity check reads. One loop for both places it runs:
inside the bench's own process (``--ort-process shared``) and in a process of its own that never imports torch
(:mod:`apet.bench.ort_process`, the default: how the torch-free runtime runs on a device).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apet.bench.ort_profile import timed_first_token


@dataclass
class OrtTimings:
    """Raw wall-clock ms (host clock; each ONNX Runtime run returns synchronized) and what parity needs."""

    ttft_ms: list[float]
    parts_ms: dict[str, list[float]]  # each first-token step (ort_profile.FIRST_TOKEN_STEPS)
    decode_ms: list[float]
    tokens: list[list[int]]  # greedy token per step, per row
    logits: list[np.ndarray]  # the prefill's last-row logits, then each decode step's
    keep_index: np.ndarray
    visual_embeds: np.ndarray
    stage2_index: np.ndarray | None
    backend: dict[str, Any] = field(default_factory=dict)  # what the backend chose (forms, graphs, rewrites)


def backend_choices(backend: Any) -> dict[str, Any]:
    """The forms an ONNX Runtime backend runs, as the bench reports them."""
    return {"decode_attention": backend.decode_attention(), "rewrites": sorted(backend.rewrites),
            "vision_cuda_graph": backend.vision_graphed(), "prompt_cuda_graph": backend.prompt_graphed(),
            "first_token_cuda_graph": backend.first_token_graphed()}


def time_backend(backend: Any, processor: Any, inputs: Any, make_layout: Any, repeats: int,
                 parity_steps: int) -> OrtTimings:
    """Warm up (ORT builds kernels on first use; a prompt's CUDA graph is bound on its second prefill and captured
    on the third; decode's session and graph likewise), then ``repeats`` first tokens and ``parity_steps`` greedy
    decode steps, timed."""
    parts: dict[str, list[float]] = {}

    def first_token():
        return timed_first_token(backend, inputs, make_layout, parts)

    for _ in range(3):
        _, layout, logits = first_token()
    mask = layout.attention_mask
    for _ in range(2):
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        logits = backend.decode(logits.argmax(-1).astype(np.int64), mask, processor.decode_positions(layout, mask))
    ttfts: list[float] = []
    parts.clear()  # the warm-up's steps are not timed
    for _ in range(repeats):
        t0 = time.perf_counter()
        visual, layout, logits = first_token()
        ttfts.append((time.perf_counter() - t0) * 1e3)
    tokens, steps, mask, all_logits = [], [], layout.attention_mask, [logits]
    for _ in range(parity_steps):
        token = logits.argmax(-1)
        tokens.append(token.tolist())
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        t0 = time.perf_counter()
        logits = backend.decode(token.astype(np.int64), mask, processor.decode_positions(layout, mask))
        steps.append((time.perf_counter() - t0) * 1e3)
        all_logits.append(logits)
    return OrtTimings(ttfts, parts, steps, tokens, all_logits, np.asarray(visual.keep_index),
                      np.asarray(visual.embeds), backend.stage2_index, backend_choices(backend))
