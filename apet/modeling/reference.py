"""The PyTorch reference of the compressed model: the source model's own Hugging Face modules
with ApET applied exactly as docs/algorithm.md says (the paper's ``token_merging`` + PyramidDrop-style
``layer_prune``).

It is written independently of :mod:`apet.export.decoder` (per-row Python
rebuild of the sequence, HF attention and cache, masks and positions derived
from the compressed mask), so that tests comparing the exported graphs with it
can catch mistakes in either. The runtime's ``torch`` backend uses it too. The
vision side is the family's own :class:`~apet.modeling.vision.VisionStages` with
the selection rule plugged in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from apet.contracts.compression import CompressionConfig, Stage2Config
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.compat import cache_kwargs


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Hugging Face's convention: cumulative count of real tokens minus one; pads get 1."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)


def causal_bias(mask: torch.Tensor, query_len: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] key mask -> [B, 1, T, S] additive bias; query t sits at key position S - T + t and sees the real
    keys up to it. (Built in one broadcast: a per-query loop cost ~3 kernel launches per prompt token, which at
    LLaVA-NeXT's ~3k-token prompts would inflate the paper-style baseline's TTFT.)"""
    total = mask.shape[1]
    keys = torch.arange(total, device=mask.device)
    visible = mask.bool()[:, None, None, :] & (keys <= keys[total - query_len:, None])[None, None]
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(visible, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def inject_rows(hidden: torch.Tensor, injected: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, H] with ``injected[rows[b, t]]`` added where ``rows`` >= 0 (Hugging Face Qwen3-VL's
    ``_deepstack_process``: the visual positions' hidden states plus that layer's visual features)."""
    out = hidden.clone()
    where = rows >= 0
    out[where] = out[where] + injected[rows[where]].to(hidden.dtype)
    return out


@dataclass
class ReferenceState:
    """Decode-time state: HF cache plus the masks of the two layer groups."""

    cache: object
    mask: torch.Tensor  # full-length mask (layers < L)
    mask_after: torch.Tensor | None  # compressed mask (layers >= L)
    image_start: torch.Tensor
    stage2_index: torch.Tensor | None = None
    visible_lengths: list[int] = field(default_factory=list)


class Reference:
    """Vision + language model of ``adapter`` with ApET stage 1 (and optional stage 2)."""

    def __init__(self, adapter: VisionLanguageAdapter, stage1: CompressionConfig,
                 stage2: Stage2Config | None = None, rule: str = "apet") -> None:
        from apet.models.registry import get_family
        from apet.selection import get_rule

        self.adapter = adapter
        self.stage1 = stage1
        self.stage2 = stage2
        self.select = get_rule(rule)
        self.vision = get_family(adapter.family).vision_stages(adapter, lambda x: self.select(x, stage1))
        self.layers = list(adapter.decoder_layers())

    @torch.no_grad()
    def vision_outputs(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """The family's vision stages with the selection rule, by output name (visual_embeds, keep_index and, for
        a family with injected layers, injected_embeds: :func:`apet.modeling.vision.injected_of`)."""
        return self.vision.named(self.vision(*inputs))

    @torch.no_grad()
    def visual_embeds(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The family's vision stages with the selection rule: (visual embeddings, kept indices)."""
        return tuple(self.vision(*inputs)[:2])

    def _run_layers(self, hidden: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: object,
                    layers: range, injected: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
        cos_sin = self.adapter.hf_position_embeddings(hidden, positions)
        bias = causal_bias(mask, hidden.shape[1], hidden.dtype)
        for i in layers:
            out = self.layers[i](hidden, attention_mask=bias, position_ids=positions, use_cache=True,
                                 position_embeddings=cos_sin, **cache_kwargs(self.layers[i], cache))
            hidden = out[0] if isinstance(out, tuple) else out
            if injected is not None and rows is not None and i < injected.shape[0]:
                hidden = inject_rows(hidden, injected[i], rows)
        return hidden

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.adapter.lm_head()(self.adapter.final_norm()(hidden[:, -1:]))

    def _compress_span(self, hidden: torch.Tensor, mask: torch.Tensor, image_start: torch.Tensor):
        s2 = self.stage2
        assert s2 is not None
        c = s2.compression
        rows, masks, indices = [], [], []
        for b in range(hidden.shape[0]):
            s = int(image_start[b])
            kept = self.select(hidden[b:b + 1, s:s + s2.span], c)
            rows.append(torch.cat([hidden[b, :s], kept.tokens[0], hidden[b, s + s2.span:]]))
            masks.append(torch.cat([mask[b, :s], torch.ones_like(mask[b, :c.keep]), mask[b, s + s2.span:]]))
            indices.append(kept.index[0])
        return torch.stack(rows), torch.stack(masks), torch.stack(indices)

    @torch.no_grad()
    def prefill(self, inputs_embeds: torch.Tensor, mask: torch.Tensor, image_start: torch.Tensor,
                positions: torch.Tensor | None = None, injected: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> tuple[torch.Tensor, ReferenceState]:
        """Logits of the last position [B, 1, V] and the state to decode from. ``positions`` default to the
        1-D ones of the mask; M-RoPE families pass their [3, B, T] positions (no stage 2 there). ``injected``
        [L, N, H] is added after layer i < L to the tokens whose ``rows`` [B, T] entry is a visual row >= 0."""
        from transformers import DynamicCache

        cache = DynamicCache()
        split = self.stage2.layer if self.stage2 is not None else len(self.layers)
        positions = positions_from_mask(mask) if positions is None else positions
        hidden = self._run_layers(inputs_embeds, mask, positions, cache, range(split), injected, rows)
        state = ReferenceState(cache=cache, mask=mask, mask_after=None, image_start=image_start)
        if self.stage2 is not None:
            hidden, state.mask_after, state.stage2_index = self._compress_span(hidden, mask, image_start)
            hidden = self._run_layers(hidden, state.mask_after, positions_from_mask(state.mask_after), cache,
                                      range(split, len(self.layers)))
        return self._logits(hidden), state

    @torch.no_grad()
    def decode(self, token_embeds: torch.Tensor, state: ReferenceState,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        """One step for [B, 1, H] embeddings; updates ``state`` in place."""
        ones = torch.ones_like(state.mask[:, :1])
        state.mask = torch.cat([state.mask, ones], dim=1)
        split = self.stage2.layer if self.stage2 is not None else len(self.layers)
        positions = positions_from_mask(state.mask)[:, -1:] if positions is None else positions
        hidden = self._run_layers(token_embeds, state.mask, positions, state.cache, range(split))
        if self.stage2 is not None:
            state.mask_after = torch.cat([state.mask_after, ones], dim=1)
            hidden = self._run_layers(hidden, state.mask_after, positions_from_mask(state.mask_after)[:, -1:],
                                      state.cache, range(split, len(self.layers)))
        return self._logits(hidden)

    def cache_lengths(self, state: ReferenceState) -> list[int]:
        return [int(state.cache.layers[i].keys.shape[2]) for i in range(len(self.layers))]
