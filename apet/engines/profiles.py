"""Optimization profiles derived from the manifest: vision (batch) and LLM (prefill, decode)."""

from __future__ import annotations

from dataclasses import dataclass

from apet.engines.trt import Profile
from apet.errors import UsageError
from apet.manifest import Manifest

DEFAULT_TEXT_TOKENS = 512  # prompt text budget on top of the visual tokens
OPT_TEXT_TOKENS = 40  # a typical VQA prompt


@dataclass(frozen=True)
class ShapeLimits:
    """The envelope the engines are built for (CLI: --max-batch, --max-context, --max-prompt)."""

    max_batch: int
    max_context: int
    max_prompt: int

    @classmethod
    def from_manifest(cls, manifest: Manifest, max_batch: int | None = None, max_context: int | None = None,
                      max_prompt: int | None = None) -> "ShapeLimits":
        batch = manifest.max_batch if max_batch is None else max_batch
        context = manifest.max_context if max_context is None else max_context
        prompt = min(context, manifest.visual_tokens + DEFAULT_TEXT_TOKENS) if max_prompt is None else max_prompt
        if not 1 <= batch <= manifest.max_batch:
            raise UsageError(f"--max-batch {batch} is outside [1, {manifest.max_batch}] (the export's max batch)",
                             f"pass --max-batch between 1 and {manifest.max_batch}, or re-export with a larger "
                             "--max-batch")
        if not manifest.visual_tokens + 2 <= context <= manifest.max_context:
            raise UsageError(f"--max-context {context} is outside [{manifest.visual_tokens + 2}, "
                             f"{manifest.max_context}] (the export's KV-cache capacity)",
                             f"pass --max-context up to {manifest.max_context}, or re-export with a larger "
                             "--max-context")
        if prompt > context:
            raise UsageError(f"--max-prompt {prompt} exceeds --max-context {context}", "lower --max-prompt")
        if prompt <= manifest.visual_tokens:
            raise UsageError(f"--max-prompt {prompt} leaves no room for text after {manifest.visual_tokens} "
                             "visual tokens", f"use at least {manifest.visual_tokens + 16}")
        return cls(batch, context, prompt)


def vision_profiles(manifest: Manifest, limits: ShapeLimits) -> list[Profile]:
    proc = manifest.model.processor
    image = (3, proc.crop_height, proc.crop_width)
    return [Profile("vision", {"pixel_values": ((1, *image), (1, *image), (limits.max_batch, *image))})]


def _llm_shapes(manifest: Manifest, batch: tuple[int, int, int], seq: tuple[int, int, int],
                past: tuple[int, int, int]) -> dict[str, tuple[tuple[int, ...], ...]]:
    spec = manifest.model.decoder
    stage2 = manifest.compression.stage2
    removed = manifest.removed_at_stage2()
    shapes: dict[str, tuple[tuple[int, ...], ...]] = {
        "inputs_embeds": tuple((b, t, spec.hidden_size) for b, t in zip(batch, seq)),
        "position_ids": tuple((b, t) for b, t in zip(batch, seq)),
        "attention_mask": tuple((b, p + t) for b, p, t in zip(batch, past, seq)),
    }
    if stage2 is not None:
        shapes["image_start"] = tuple((b,) for b in batch)
    for i in range(spec.num_layers):
        shortened = stage2 is not None and i >= stage2.layer
        lengths = tuple(max(0, p - removed) if shortened and p > 0 else p for p in past)
        for kind in ("key", "value"):
            shapes[f"past_{kind}.{i}"] = tuple((b, spec.num_kv_heads, p, spec.head_dim)
                                               for b, p in zip(batch, lengths))
    return shapes


def llm_profiles(manifest: Manifest, max_batch: int | None = None, max_context: int | None = None,
                 max_prompt: int | None = None) -> list[Profile]:
    """Profile 0 = prefill (whole prompt incl. the image span, empty cache); profile 1 = decode (T = 1)."""
    limits = ShapeLimits.from_manifest(manifest, max_batch, max_context, max_prompt)
    k1 = manifest.visual_tokens
    batch = (1, 1, limits.max_batch)
    shortest = k1 + 1 if manifest.compression.stage2 is not None else 2
    typical = min(limits.max_prompt, k1 + OPT_TEXT_TOKENS)
    prefill = _llm_shapes(manifest, batch, (shortest, typical, limits.max_prompt), (0, 0, 0))
    decode = _llm_shapes(manifest, batch, (1, 1, 1), (shortest, min(typical + 64, limits.max_context - 1),
                                                       limits.max_context - 1))
    return [Profile("prefill", prefill), Profile("decode", decode)]


def check_workspace(workspace_mb: int | None) -> None:
    """The builder workspace limit must be a positive number of MiB (or absent: TensorRT's default)."""
    if workspace_mb is not None and workspace_mb < 1:
        raise UsageError(f"--workspace {workspace_mb} MiB is not a positive size",
                         "pass a builder workspace limit in MiB (e.g. --workspace 4096), or leave it out")
