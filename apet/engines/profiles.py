"""Optimization profiles derived from the manifest: vision (the family's dims) and LLM (prefill, decode).

Shapes are never spelled out per tensor here: the manifest records every graph input with its
symbolic dims (``batch``, ``seq``, ``past``, ``past_after``, ...), the family sizes the vision
dims and the :class:`~apet.contracts.cache.CacheLayout` the LLM dims, and :func:`resolve_shape`
fills them in. The same holds for trtexec lines and the TensorRT backend's bindings.
"""

from __future__ import annotations

from dataclasses import dataclass

from apet.contracts.cache import DEFAULT_TEXT_TOKENS
from apet.contracts.specs import resolve_shape
from apet.engines.trt import Profile
from apet.errors import UsageError
from apet.manifest import Manifest
from apet.models.registry import family_of

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
        visual = family_of(manifest).max_visual_tokens(manifest)
        batch = manifest.max_batch if max_batch is None else max_batch
        context = manifest.max_context if max_context is None else max_context
        prompt = min(context, visual + DEFAULT_TEXT_TOKENS) if max_prompt is None else max_prompt
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
        if prompt <= visual:
            raise UsageError(f"--max-prompt {prompt} leaves no room for text after {visual} visual tokens",
                             f"use at least {visual + 16}")
        return cls(batch, context, prompt)


def _shapes(manifest: Manifest, graph: str, dims: tuple[dict[str, int], dict[str, int], dict[str, int]]):
    return {spec["name"]: tuple(resolve_shape(spec, d) for d in dims) for spec in manifest.graphs[graph].inputs}


def vision_profiles(manifest: Manifest, limits: ShapeLimits) -> list[Profile]:
    ranges = family_of(manifest).vision_dims(manifest, limits.max_batch)
    dims = tuple({name: r[i] for name, r in ranges.items()} for i in range(3))
    return [Profile("vision", _shapes(manifest, "vision", dims))]


def llm_profiles(manifest: Manifest, max_batch: int | None = None, max_context: int | None = None,
                 max_prompt: int | None = None) -> list[Profile]:
    """Profile 0 = prefill (whole prompt incl. the visual span, empty cache); profile 1 = decode (T = 1)."""
    limits = ShapeLimits.from_manifest(manifest, max_batch, max_context, max_prompt)
    layout = manifest.cache_layout
    typical = min(limits.max_prompt, family_of(manifest).typical_visual_tokens(manifest) + OPT_TEXT_TOKENS)
    # with stage 2 a prefill holds the whole K1 span; the removed tokens must leave at least one
    shortest = manifest.visual_tokens + 1 if manifest.compression.stage2 is not None else 2
    batch = (1, 1, limits.max_batch)
    # injected per-layer inputs (families that declare them): 0 visual rows (a text-only prompt) up to every
    # visual token of a full batch; decode steps have none
    family = family_of(manifest)
    rows = (0, family.typical_visual_tokens(manifest), limits.max_batch * family.max_visual_tokens(manifest))
    prefill = tuple(layout.dims(b, t, 0, n) for b, t, n in zip(batch, (shortest, typical, limits.max_prompt), rows))
    past = (shortest, min(typical + 64, limits.max_context - 1), limits.max_context - 1)
    decode = tuple(layout.dims(b, 1, p) for b, p in zip(batch, past))
    return [Profile("prefill", _shapes(manifest, "llm", prefill)), Profile("decode", _shapes(manifest, "llm", decode))]


def check_workspace(workspace_mb: int | None) -> None:
    """The builder workspace limit must be a positive number of MiB (or absent: TensorRT's default)."""
    if workspace_mb is not None and workspace_mb < 1:
        raise UsageError(f"--workspace {workspace_mb} MiB is not a positive size",
                         "pass a builder workspace limit in MiB (e.g. --workspace 4096), or leave it out")
