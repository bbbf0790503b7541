"""Names of the graphs' inputs and outputs: one home for what export writes and every backend binds."""

from __future__ import annotations

VISION_OUTPUTS = ["visual_embeds", "keep_index"]
LLM_INPUTS = ["inputs_embeds", "position_ids", "attention_mask"]
IMAGE_START = "image_start"
LOGITS = "logits"
STAGE2_INDEX = "stage2_index"


def past_names(num_layers: int) -> list[str]:
    return [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_to_past(name: str) -> str:
    return name.replace("present_", "past_", 1)


def llm_io_names(num_layers: int, stage2: bool) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of ``llm.onnx`` in graph order."""
    inputs = LLM_INPUTS + ([IMAGE_START] if stage2 else [])
    outputs = [LOGITS] + ([STAGE2_INDEX] if stage2 else [])
    return inputs + past_names(num_layers), outputs + present_names(num_layers)
