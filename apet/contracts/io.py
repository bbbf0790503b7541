"""Names of the graphs' inputs and outputs: one home for what export writes and every backend binds."""

from __future__ import annotations

VISUAL_EMBEDS = "visual_embeds"
KEEP_INDEX = "keep_index"
VISION_OUTPUTS = [VISUAL_EMBEDS, KEEP_INDEX]
LLM_INPUTS = ["inputs_embeds", "position_ids", "attention_mask"]
IMAGE_START = "image_start"
# per-layer injected inputs (DecoderSpec.injected_layers > 0): the vision graph's third output [L, N, H] (the
# same N rows, in the same order, as visual_embeds) and the LLM's inputs of that name plus the row of each token
INJECTED_EMBEDS = "injected_embeds"
INJECTED_ROWS = "injected_rows"  # [B, T] int64: flattened visual row of each token, -1 for text
INJECTED_DIM = "visual_rows"  # the symbolic N of injected_embeds (0 at decode)
LOGITS = "logits"
STAGE2_INDEX = "stage2_index"


def past_names(num_layers: int) -> list[str]:
    return [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_to_past(name: str) -> str:
    return name.replace("present_", "past_", 1)


def vision_output_names(injected: bool) -> list[str]:
    """Outputs of ``vision.onnx`` in graph order."""
    return VISION_OUTPUTS + ([INJECTED_EMBEDS] if injected else [])


def llm_io_names(num_layers: int, stage2: bool, injected: bool = False) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of ``llm.onnx`` in graph order."""
    inputs = LLM_INPUTS + ([IMAGE_START] if stage2 else []) + ([INJECTED_EMBEDS, INJECTED_ROWS] if injected else [])
    outputs = [LOGITS] + ([STAGE2_INDEX] if stage2 else [])
    return inputs + past_names(num_layers), outputs + present_names(num_layers)
