"""``llm.onnx`` (decoder + KV cache [+ stage 2]) and the token-embedding table."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from apet.contracts.compression import Stage2Config
from apet.contracts.files import EMBEDDINGS_TENSOR
from apet.contracts.io import INJECTED_DIM, INJECTED_EMBEDS, INJECTED_ROWS, llm_io_names
from apet.export.decoder import DecoderGraph
from apet.export.onnx_utils import export_onnx
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.blocks import empty_past


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


def export_llm(adapter: VisionLanguageAdapter, stage2: Stage2Config | None, path: Path, *, opset: int,
               all_logits: bool = False, attention: str = "pattern", lm_head_slices: int = 1) -> Path:
    """Trace the decoder at a prefill shape (P = 0) with every length axis dynamic."""
    spec = adapter.spec.decoder
    batch = 2
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
    args += tuple(empty_past(adapter, batch))
    inputs, outputs = llm_io_names(spec.num_layers, stage2 is not None, injected)
    graph = DecoderGraph(adapter, stage2, all_logits, attention, lm_head_slices).eval()
    return export_onnx(graph, args, path, input_names=inputs, output_names=outputs,
                       dynamic_axes=_dynamic_axes(spec.num_layers, stage2, all_logits, spec.position_rank, injected),
                       opset=opset)


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
