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


# -- the static-KV form of the LLM (apet-export --kv-cache static, docs/architecture.md) -------------------
KV_CACHE_FORMS = ("dynamic", "static")  # dynamic: llm.onnx grows the cache by concatenation (the default)
# how ONNX Runtime runs a static-KV decode step: the exported graph, or rewritten for its GroupQueryAttention
# (apet/runtime/backends/ort_gqa.py); auto picks per device and artifact (apet/runtime/backends/ort_static.py)
DECODE_ATTENTION = ("auto", "gqa", "graph")
CACHE_POSITION = "cache_position"  # [1] int64: the cache position a decode step writes (group 0; see CacheLayout)
LLM_PREFILL, LLM_DECODE = "llm_prefill", "llm_decode"  # the static form's two graphs (manifest keys; files .onnx)


def llm_graphs(kv_cache: str) -> tuple[str, ...]:
    """The manifest's LLM graph names of a cache form."""
    return (LLM_PREFILL, LLM_DECODE) if kv_cache == "static" else ("llm",)


def decode_io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """(inputs, outputs) of the static form's ``llm_decode.onnx``: one token per row over preallocated caches; the
    mask is the validity of every cache position [B, max_context], no stage 2, no injected inputs."""
    inputs = LLM_INPUTS + [CACHE_POSITION] + past_names(num_layers)
    return inputs, [LOGITS] + present_names(num_layers)
