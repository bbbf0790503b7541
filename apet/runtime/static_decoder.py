"""The language model with a preallocated, static KV cache: every step has fixed shapes and no
host syncs, so prefill and decode can be captured as CUDA graphs (the GPU fast path).

Same math as :class:`apet.export.decoder.DecoderGraph` (the same :mod:`apet.modeling.decoder_block` per layer),
but keys and values are written in place into ``[B, kv, max_context, d]`` buffers and decode
attends over a prefix of the buffer (a *span*, see :func:`decode_span`) with a validity mask instead of growing
tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from apet import switches
from apet.contracts.cache import CacheLayout
from apet.contracts.compression import Stage2Config
from apet.kernels import cache_write, decode_attention
from apet.kernels.varlen import (
    PromptPadding,
    causal_attention,
    flash_varlen_available,
    left_pad_segments,
    packed_causal_attention,
    prompt_padding,
)
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.blocks import HeadLayout, additive_mask, repeat_kv, stage2_rebuild
from apet.modeling.decoder_block import add_injected, decoder_blocks


def grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor,
                             groups: int) -> torch.Tensor:
    """Grouped-query attention for one new token per row: q [B, Hq, 1, d] over a cache [B, Hkv, T, d].

    Each kv head's ``groups`` query heads become rows of one query block, so the cache is read once. ``repeat_kv``
    would first copy the whole static buffer ``groups`` times (7x for Qwen2.5-VL-7B), every layer, every step.
    Same dot products and softmax: the mask [B, 1, 1, T] is per row and key, identical for every head. On the GPU
    (fp16/bf16/fp32, power-of-two head size) the Triton flash-decoding kernel computes the same
    (:mod:`apet.kernels.decode_attention`): SDPA ran it as a 64-row prefill tile."""
    if decode_attention.available(q, keys):
        return decode_attention.decode_attention(q, keys, values, bias)
    batch, heads, _, dim = q.shape
    folded = q.reshape(batch, heads // groups, groups, dim)
    return F.scaled_dot_product_attention(folded, keys, values, attn_mask=bias).reshape(batch, heads, 1, dim)


@torch.library.custom_op("apet::computed_once", mutates_args=())
def _computed_once(table: torch.Tensor) -> torch.Tensor:
    return table.clone()


@_computed_once.register_fake
def _(table: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(table)


# on since timed on the H200 (docs/benchmarks.md, "Prefill levers timed"); ``APET_ROTARY_ONCE=0``
# (scripts/gpu_profile.py ``:rotaryeach``) leaves the tables to Inductor, as before
ROTARY_ONCE = {"value": switches.enabled("APET_ROTARY_ONCE")}


def computed_once(*tables: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tables`` as they are eagerly; under ``torch.compile`` (with :data:`ROTARY_ONCE` on) each passed through an
    opaque copy, so that Inductor computes it once into a buffer instead of recomputing it inside every kernel that
    reads it.

    Why: on the GPU, Inductor inlines a pointwise producer with few reads into each of its consumers (on the CPU a
    reuse heuristic realizes it). The rotary tables (cos, sin of the positions; M-RoPE's sections selected and
    concatenated) are read by every layer's q and k rotation, so the compiled prefill took sin and cos per
    element of q and k in every layer: at Qwen2.5-VL-7B's 2,065-token prompt the two kernels that carry them took
    3.5 of the prefill's 48.4 ms on the H200, 0.66 ms once computed, and the prefill ran 1.8 ms faster
    (docs/benchmarks.md, "Prefill levers timed"). The copy is of [B, T, head_dim] values, the same values computed
    once. The prefill only: a decode step's one row per layer costs less than the copy's launch."""
    if not (ROTARY_ONCE["value"] and torch.compiler.is_compiling()):
        return tables
    return tuple(_computed_once(table) for table in tables)


SPAN_QUANTUM = 256


def decode_span(positions_used: int, capacity: int, quantum: int = SPAN_QUANTUM) -> int:
    """How much of a static cache one decode step attends over: the smallest ``quantum · 2^n`` that holds the
    ``positions_used`` positions (the new token's included), capped at the buffer's capacity.

    Why: every position in the span is read every layer and step, masked or not; reading the whole buffer cost
    LLaVA-1.5-7B ~0.45 ms per row and step (2,472 positions) for a ~200-token context. Doubling spans keep the number
    of captured decode graphs (one per span) to a handful while reading at most twice what is used."""
    if positions_used > capacity:
        raise ValueError(f"decode needs {positions_used} cache positions, the buffer holds {capacity}")
    span = quantum
    while span < positions_used:
        span *= 2
    return min(span, capacity)


PREFILL_ATTENTION = ("auto", "masked", "packed", "causal")


class StaticDecoder:
    """Prefill (whole prompt, empty cache) and single-token decode over static caches.

    ``prefill_attention``: how a prefill attends (:meth:`prefill_form`). ``masked`` is SDPA with the [B, 1, T, T]
    padding + causal bias (a mask keeps SDPA off its fused kernels); ``packed`` runs each left-padded row as two
    causal segments [pads | tokens] through :func:`apet.kernels.varlen.varlen_attention` with no mask
    (FlashAttention varlen on CUDA fp16, a block-diagonal SDPA elsewhere); ``causal`` attends a prompt without
    padding through SDPA's own causal kernels (:func:`apet.kernels.varlen.causal_attention`: cuDNN's on Hopper) and
    packs a left-padded one; ``auto`` (default) is ``causal`` where FlashAttention runs and ``masked`` elsewhere,
    so CPU results are those of the masked form bit for bit."""

    def __init__(self, adapter: VisionLanguageAdapter, stage2: Stage2Config | None, max_batch: int,
                 max_context: int, fuse: bool = False, prefill_attention: str = "auto") -> None:
        from apet.runtime.fusion import FusedLayer, norm_then_head

        if prefill_attention not in PREFILL_ATTENTION:
            raise ValueError(f"prefill_attention={prefill_attention!r}: use one of {', '.join(PREFILL_ATTENTION)}")
        self.prefill_attention = prefill_attention

        self.layers = list(adapter.decoder_layers())
        self.fused = [FusedLayer(layer) for layer in self.layers] if fuse else None
        self.norm, self.head, self.rotary = adapter.final_norm(), adapter.lm_head(), adapter.rotary
        self.kernels: dict[str, int] = {}  # weight-only GEMM kernels in use (quantized LLMs, apet.quant)
        if fuse:
            from apet.quant.kernels import attach_static

            self.kernels = attach_static(self.layers, self.fused, self.head, adapter.dtype)
        self.project_logits = norm_then_head(self.norm, self.head) if fuse else lambda h: self.head(self.norm(h))
        self.layout = HeadLayout.of(adapter)
        self.blocks = decoder_blocks(self.layers, self.layout, adapter.spec.decoder.qk_norm, self.fused)
        self.injected_layers = adapter.spec.decoder.injected_layers
        if stage2 is not None and self.injected_layers:
            raise ValueError("ApET's second stage and injected per-layer inputs are not combined yet")
        self.stage2 = stage2
        self.cache_layout = CacheLayout(len(self.layers), stage2.layer if stage2 else None,
                                        stage2.removed if stage2 else 0)
        self.removed = self.cache_layout.removed
        self.split = stage2.layer if stage2 else len(self.layers)
        dtype, device = adapter.dtype, adapter.device
        capacity = [max_context, self.cache_layout.capacity(self.split, max_context)]
        shape = (max_batch, self.layout.num_kv_heads)
        self.keys = [torch.zeros(*shape, capacity[self._group(i)], self.layout.head_dim, dtype=dtype, device=device)
                     for i in range(len(self.layers))]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.valid = [torch.zeros(max_batch, c, dtype=torch.bool, device=device) for c in capacity]
        self.length = torch.zeros(1, dtype=torch.long, device=device)  # cache positions used by group 0
        self.min_value = torch.finfo(dtype).min

    def _group(self, layer: int) -> int:
        return 0 if layer < self.split else 1

    def _block(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor | None,
               write: slice | torch.Tensor, span: int | None = None,
               segments: torch.Tensor | None = None) -> torch.Tensor:
        """One layer; prefill attends with ``bias`` [B, 1, T, T], packed over ``segments`` (cu_seqlens), or, with
        neither (an unpadded prompt), causally."""
        keys, values = self.keys[i][:h.shape[0]], self.values[i][:h.shape[0]]
        groups = self.layout.groups

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, None]:
            if isinstance(write, slice):  # prefill: the prompt's keys are the whole attention context
                cache_write.write_rows(keys, k, write.start or 0)
                cache_write.write_rows(values, v, write.start or 0)
                if segments is not None:
                    return packed_causal_attention(q, k, v, segments), None
                if bias is None:
                    return causal_attention(q, k, v), None
                return F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                                      attn_mask=bias), None
            # decode: write at the cache position, attend over the span (the buffer's first positions)
            keys.index_copy_(2, write, k)
            values.index_copy_(2, write, v)
            return grouped_decode_attention(q, keys[:, :, :span], values[:, :, :span], bias, groups), None

        return self.blocks[i](h, cos, sin, attend)[0]

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.project_logits(h[:, -1])

    def prefill_form(self, embeds: torch.Tensor, padding: PromptPadding) -> str:
        """How a prefill of ``embeds`` with ``padding`` attends: ``causal``, ``packed`` or ``masked`` (see the
        class docstring); only a left-padded (or unpadded) mask maps onto segments, only an unpadded one is causal
        without a mask."""
        form = self.prefill_attention
        if form == "auto":
            form = "causal" if flash_varlen_available(embeds, self.layout.head_dim) else "masked"
        if form == "masked" or padding == "other":
            return "masked"
        return "causal" if form == "causal" and padding == "none" else "packed"

    def _attention_inputs(self, mask: torch.Tensor, length: int, dtype: torch.dtype,
                          form: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bias, segments): the [B, 1, T, T] bias of the masked form, the cu_seqlens of the packed form, neither
        for the causal form."""
        if form == "causal":
            return None, None
        if form == "packed":
            return None, left_pad_segments(mask)
        return additive_mask(mask, length, dtype), None

    @torch.no_grad()
    def prefill(self, embeds: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                image_start: torch.Tensor | None, injected: torch.Tensor | None = None,
                rows: torch.Tensor | None = None, padding: PromptPadding | None = None) -> torch.Tensor:
        """[B, T, H] prompt embeddings, [B, T] left-padded mask, positions -> logits [B, V]; resets the cache.
        ``injected`` [L, N, H] and ``rows`` [B, T] (flattened visual row per token, -1 for text): the family's
        per-layer visual inputs, added after each layer i < L (``DecoderSpec.injected_layers``).
        ``padding``: the caller's word on how the mask pads its rows (read on its host copy, see
        :func:`apet.kernels.varlen.prompt_padding`); None reads the mask here when no graph is being captured, and
        attends masked while one is. Stage 2 keeps a left pad a left pad and no pad no pad (it drops the same
        number of real tokens from every row)."""
        batch, length = embeds.shape[:2]
        if padding is None:
            capturing = torch.compiler.is_compiling() or (embeds.is_cuda and torch.cuda.is_current_stream_capturing())
            padding = "other" if capturing else prompt_padding(mask)
        form = self.prefill_form(embeds, padding)
        for valid in self.valid:
            valid[:batch].zero_()
        self.valid[0][:batch, :length] = mask.bool()
        h = embeds
        cos, sin = computed_once(*self.rotary(h, positions))
        bias, segments = self._attention_inputs(mask, length, h.dtype, form)
        for i in range(len(self.layers)):
            if i == self.split:
                h, positions, mask, _ = stage2_rebuild(self.stage2, h, positions, mask, image_start)
                cos, sin = computed_once(*self.rotary(h, positions))
                bias, segments = self._attention_inputs(mask, h.shape[1], h.dtype, form)
                self.valid[1][:batch, : h.shape[1]] = mask.bool()
            h = self._block(i, h, cos, sin, bias, slice(0, h.shape[1]), segments=segments)
            if injected is not None and rows is not None and i < self.injected_layers:
                h = add_injected(h, injected[i], rows)
        self.length.fill_(length)
        return self._logits(h)

    def span(self, context: int) -> int:
        """The decode span for a step that writes cache position ``context`` (group 0; stage 2's shortened group
        attends over the same span less the removed tokens)."""
        return decode_span(context + 1, self.valid[0].shape[1])

    @torch.no_grad()
    def decode(self, embeds: torch.Tensor, positions: torch.Tensor, span: int | None = None) -> torch.Tensor:
        """[B, 1, H] and full-sequence positions [B, 1] -> logits [B, V]; appends to the cache.

        ``span`` (from :meth:`span`, a Python int so each value is its own captured graph) limits attention to the
        buffer's first positions; it must cover the position written now. None attends over the whole buffer."""
        batch = embeds.shape[0]
        zero = torch.zeros((), dtype=embeds.dtype, device=embeds.device)
        groups = []  # per cache group: (cos, sin), attention bias, write index, span
        for shift, valid in zip((0, self.removed), self.valid[: 2 if self.stage2 else 1]):
            index = self.length - shift
            group_span = None if span is None else min(span - shift, valid.shape[1])
            valid[:batch].index_fill_(1, index, True)
            bias = torch.where(valid[:batch, :group_span], zero, self.min_value)[:, None, None, :]
            groups.append((self.rotary(embeds, positions - shift), bias, index, group_span))
        h = embeds
        for i in range(len(self.layers)):
            cos_sin, bias, index, group_span = groups[self._group(i)]
            h = self._block(i, h, *cos_sin, bias, index, group_span)
        self.length.add_(1)
        return self._logits(h)

    def snapshot(self) -> list[torch.Tensor]:
        """The small state a warm-up run would disturb (cache contents beyond it are masked)."""
        return [self.length.clone()] + [v.clone() for v in self.valid]

    def restore(self, state: list[torch.Tensor]) -> None:
        for target, saved in zip([self.length, *self.valid], state):
            target.copy_(saved)

    def cache_lengths(self) -> list[int]:
        return self.cache_layout.lengths(int(self.length.item()))
