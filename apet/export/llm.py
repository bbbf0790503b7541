"""``llm.onnx`` (decoder + KV cache [+ stage 2]) and the token-embedding table."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from apet.contracts.cache import CacheLayout
from apet.contracts.compression import Stage2Config
from apet.contracts.files import EMBEDDINGS_TENSOR
from apet.contracts.io import (
    INJECTED_DIM,
    INJECTED_EMBEDS,
    INJECTED_ROWS,
    LLM_DECODE,
    LLM_PREFILL,
    decode_io_names,
    llm_io_names,
    past_names,
    present_names,
)
from apet.errors import UsageError
from apet.export.decoder import DecoderGraph, StaticDecodeGraph
from apet.export.onnx_utils import export_onnx
from apet.export.shared_weights import share_weights
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.blocks import empty_past

EXAMPLE_BATCH = 2


def _dynamic_axes(num_layers: int, stage2: Stage2Config | None, all_logits: bool,
                  position_rank: int, injected: bool = False) -> dict[str, dict[int, str]]:
    position_axes = {0: "batch", 1: "seq"} if position_rank == 1 else {1: "batch", 2: "seq"}
    axes: dict[str, dict[int, str]] = {
        "inputs_embeds": {0: "batch", 1: "seq"}, "position_ids": position_axes,
        "attention_mask": {0: "batch", 1: "total"},
        "logits": {0: "batch", 1: "seq_out"} if all_logits else {0: "batch"},
    }
    if stage2:
        axes["image_start"] = {0: "batch"}
        axes["stage2_index"] = {0: "batch"}
    if injected:
        axes[INJECTED_EMBEDS] = {1: INJECTED_DIM}
        axes[INJECTED_ROWS] = {0: "batch", 1: "seq"}
    for i in range(num_layers):
        after = stage2 is not None and i >= stage2.layer
        past, total = ("past_after", "total_after") if after else ("past", "total")
        for kind in ("key", "value"):
            axes[f"past_{kind}.{i}"] = {0: "batch", 2: past}
            axes[f"present_{kind}.{i}"] = {0: "batch", 2: total}
    return axes


def _prefill_args(adapter: VisionLanguageAdapter, stage2: Stage2Config | None) -> tuple:
    """Example prefill inputs before the past: embeds, positions, mask [, image_start] [, injected, rows]."""
    spec = adapter.spec.decoder
    batch = EXAMPLE_BATCH
    length = (stage2.span if stage2 else 0) + 8
    embeds = torch.randn(batch, length, spec.hidden_size, dtype=adapter.dtype, device=adapter.device)
    positions = torch.arange(length, device=adapter.device).expand(batch, -1).contiguous()
    if spec.position_rank == 3:  # M-RoPE: [3, B, T] (temporal, height, width)
        positions = positions.unsqueeze(0).expand(3, -1, -1).contiguous()
    mask = torch.ones(batch, length, dtype=torch.long, device=adapter.device)
    args: tuple = (embeds, positions, mask)
    if stage2:
        args += (torch.full((batch,), 3, dtype=torch.long, device=adapter.device),)
    injected = spec.injected_layers > 0
    if injected:  # N = 4 visual rows at the first positions of the second row
        rows = torch.full((batch, length), -1, dtype=torch.long, device=adapter.device)
        rows[1, 1:5] = torch.arange(4, device=adapter.device)
        args += (torch.randn(spec.injected_layers, 4, spec.hidden_size, dtype=adapter.dtype, device=adapter.device),
                 rows)
    return args


def export_llm(adapter: VisionLanguageAdapter, stage2: Stage2Config | None, path: Path, *, opset: int,
               all_logits: bool = False, attention: str = "pattern", lm_head_slices: int = 1) -> Path:
    """Trace the decoder at a prefill shape (P = 0) with every length axis dynamic."""
    spec = adapter.spec.decoder
    injected = spec.injected_layers > 0
    args = _prefill_args(adapter, stage2) + tuple(empty_past(adapter, EXAMPLE_BATCH))
    inputs, outputs = llm_io_names(spec.num_layers, stage2 is not None, injected)
    graph = DecoderGraph(adapter, stage2, all_logits, attention, lm_head_slices).eval()
    return export_onnx(graph, args, path, input_names=inputs, output_names=outputs,
                       dynamic_axes=_dynamic_axes(spec.num_layers, stage2, all_logits, spec.position_rank, injected),
                       opset=opset)


def _static_buffers(adapter: VisionLanguageAdapter, stage2: Stage2Config | None, max_context: int) -> list:
    """Zero caches [B, kv, capacity, d] per layer (key, value), capacities from :class:`CacheLayout`."""
    spec = adapter.spec.decoder
    layout = CacheLayout(spec.num_layers, stage2.layer if stage2 else None, stage2.removed if stage2 else 0)
    return empty_past(adapter, EXAMPLE_BATCH, [layout.capacity(i, max_context) for i in range(spec.num_layers)])


def export_static_llm(adapter: VisionLanguageAdapter, stage2: Stage2Config | None, directory: Path, *, opset: int,
                      max_context: int, attention: str = "pattern", lm_head_slices: int = 1) -> dict[str, Path]:
    """The static-KV form (``--kv-cache static``): ``llm_prefill.onnx`` (the prompt, stage 2 inside, written into
    the caches at 0..T-1) and ``llm_decode.onnx`` (one token per row, no stage 2, only the batch dynamic).
    Both take and return the caches [B, kv, capacity, d]; ``present_*`` has the shape of ``past_*``, so a runtime
    binds one buffer as both. Where the weights are external data, one copy serves both graphs
    (:mod:`apet.export.shared_weights`)."""
    spec = adapter.spec.decoder
    injected = spec.injected_layers > 0
    used = (stage2.span if stage2 else 0) + 8  # the example decode step writes position ``used``
    if used + 1 > max_context:
        raise UsageError(f"--max-context {max_context} cannot hold the image span of stage 2",
                         "raise --max-context")
    caches = {name: {0: "batch"} for name in past_names(spec.num_layers) + present_names(spec.num_layers)}
    prefill_axes = {**_dynamic_axes(spec.num_layers, stage2, False, spec.position_rank, injected), **caches}
    inputs, outputs = llm_io_names(spec.num_layers, stage2 is not None, injected)
    buffers = _static_buffers(adapter, stage2, max_context)
    prefill = DecoderGraph(adapter, stage2, False, attention, lm_head_slices, static=True).eval()
    paths = {LLM_PREFILL: export_onnx(prefill, _prefill_args(adapter, stage2) + tuple(buffers),
                                      directory / f"{LLM_PREFILL}.onnx", input_names=inputs, output_names=outputs,
                                      dynamic_axes=prefill_axes, opset=opset)}
    batch, device = EXAMPLE_BATCH, adapter.device
    positions = torch.full((batch, 1), used, device=device)
    if spec.position_rank == 3:
        positions = positions.unsqueeze(0).expand(3, -1, -1).contiguous()
    mask = torch.zeros(batch, max_context, dtype=torch.long, device=device)
    mask[:, :used + 1] = 1
    args = (torch.randn(batch, 1, spec.hidden_size, dtype=adapter.dtype, device=device), positions, mask,
            torch.tensor([used], device=device), *buffers)
    decode_axes = {name: {0: "batch"} for name in ["inputs_embeds", "attention_mask", "logits", *caches]}
    decode_axes["position_ids"] = {0: "batch"} if spec.position_rank == 1 else {1: "batch"}
    inputs, outputs = decode_io_names(spec.num_layers)
    decode = StaticDecodeGraph(adapter, stage2, max_context, attention, lm_head_slices).eval()
    paths[LLM_DECODE] = export_onnx(decode, args, directory / f"{LLM_DECODE}.onnx", input_names=inputs,
                                    output_names=outputs, dynamic_axes=decode_axes, opset=opset)
    share_weights(paths[LLM_PREFILL], paths[LLM_DECODE])  # the decode graph reads the prefill's weight file
    return paths


def save_embeddings(adapter: VisionLanguageAdapter, path: Path) -> dict[str, int]:
    """The token-embedding table as safetensors (the runtime looks tokens up itself: no engine needed), with
    the family's extra learned rows appended after the vocabulary; returns {name: row id} of those rows."""
    table = adapter.embed_tokens().weight.detach().to("cpu")
    extra = adapter.extra_embeddings()
    ids = adapter.extra_row_ids()
    if extra:
        rows = [row.detach().to("cpu", table.dtype).reshape(1, -1) for row in extra.values()]
        table = torch.cat([table, *rows])
    save_file({EMBEDDINGS_TENSOR: table.contiguous()}, str(path))
    path.chmod(0o644)
    return ids
