"""Attention math of a decoder step with explicit KV cache (masks, rotary, heads) and ApET's second stage, shared
by the exported graph (:mod:`apet.export.decoder`) and the static-cache GPU path
(:mod:`apet.runtime.static_decoder`), so both compute the same thing. The decoder layer around it (norms,
projections, MLP) is :mod:`apet.modeling.decoder_block`.

Attention is written out here (MatMul - additive mask - Softmax - MatMul in the graph dtype) so TensorRT
fuses it and no attention weights ever leave the graph; the exported graph can use the ONNX ``Attention`` op
instead (:mod:`apet.export.attention`). Prefill vs decode is decided from the
*shape* of the hidden states (T > 1 is a prefill that contains the image span), never from data:
TensorRT sees only shape arithmetic, and output lengths stay computable before execution. With
stage 2, a prefill must contain the whole image span (no chunked prefill), and the attention mask
must be left-padded (zeros only before the first real token); the runtime guarantees both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.onnx.operators

from apet.compression import compress_with
from apet.contracts.compression import Stage2Config
from apet.graph_ops import gather_rows

if TYPE_CHECKING:  # annotations only: the adapter module builds on this one's neighbours
    from apet.modeling.adapter import VisionLanguageAdapter

Norm = Callable[[torch.Tensor], torch.Tensor]

_BIG = 1 << 20  # larger than any sequence: (T + BIG - 2) // BIG is 1 for 2 <= T < BIG and 0 for T == 1


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def allowed_keys(attention_mask: torch.Tensor, query_len: int | torch.Tensor,
                 include_self: bool = False) -> torch.Tensor:
    """[B, S] 1/0 key mask -> [B, 1, T, S] boolean (True = attend), causal over the last T keys;
    ``include_self`` also lets every query see its own key (no row is all False, see apet.export.attention)."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device).unsqueeze(0)
    queries = (torch.arange(query_len, device=attention_mask.device) + (total - query_len)).unsqueeze(1)
    allowed = (keys <= queries).unsqueeze(0) & (attention_mask.unsqueeze(1) > 0)
    if include_self:
        allowed = allowed | (keys == queries).unsqueeze(0)
    return allowed.unsqueeze(1)


def additive_mask(attention_mask: torch.Tensor, query_len: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 1/0 key mask -> [B, 1, T, S] additive bias (0 or dtype.min), causal over the last T keys."""
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed_keys(attention_mask, query_len), zero, torch.finfo(dtype).min)


def _sequence_length(h: torch.Tensor) -> torch.Tensor | int:
    """T as a shape-derived tensor when tracing for ONNX (so TensorRT sees shape arithmetic), as an int
    under torch.compile (which specialises shapes)."""
    if torch.compiler.is_compiling():
        return int(h.shape[1])
    return torch.onnx.operators.shape_as_tensor(h)[1]


def _at_most(x: torch.Tensor, bound: torch.Tensor | int) -> torch.Tensor:
    return x.clamp(max=bound) if isinstance(bound, int) else torch.minimum(x, bound)


def stage2_rebuild(s2: Stage2Config, h: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                   image_start: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """ApET stage 2 at layer L: compress the image span and rebuild the sequence (prefill, T > 1);
    only shift positions (decode, T == 1). Returns hidden, positions, mask, stage-2 kept indices.

    The rebuilt sequence is one row gather from [h; kept tokens]: a position inside the kept span reads
    kept token (position - start), one before it reads h as is, one after it h shifted past the removed
    tokens. Sub-ranges are Gathers, not Slices (apet.graph_ops says why)."""
    span, keep, removed = s2.span, s2.compression.keep, s2.removed
    length = _sequence_length(h)
    is_prefill = (length + (_BIG - 2)) // _BIG
    new_length = length - removed * is_prefill

    start = image_start.clamp(min=0).unsqueeze(1)  # a garbage start must not index out of bounds
    span_index = _at_most(start + torch.arange(span, device=h.device), length - 1)
    kept = compress_with(s2.compression, gather_rows(h, span_index.unsqueeze(-1)))

    steps = torch.arange(new_length, device=h.device)
    offset = steps.unsqueeze(0) - start  # [B, T']
    in_span = (offset >= 0) & (offset < keep * is_prefill)
    from_h = _at_most(torch.where(offset < 0, steps, steps + removed * is_prefill), length - 1)
    source = torch.where(in_span, offset + length, from_h)
    rebuilt = gather_rows(torch.cat([h, kept.tokens], 1), source.unsqueeze(-1))
    new_positions = position_ids.index_select(1, steps) - removed * (1 - is_prefill)
    # left padding: dropping R real tokens keeps the pads and shortens the run of ones -> a prefix
    mask = attention_mask.index_select(1, torch.arange(attention_mask.shape[1] - removed, device=h.device))
    return rebuilt, new_positions, mask, kept.index


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, adapter: "VisionLanguageAdapter") -> "HeadLayout":
        spec = adapter.spec.decoder
        return cls(spec.num_heads, spec.num_kv_heads, spec.head_dim)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, d] rotated by cos/sin [B, T, d] (Hugging Face's rotate-half form)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + _rotate_half(x) * sin


Rotate = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layout: HeadLayout, rotate: Rotate = apply_rotary, q_norm: Norm | None = None,
                k_norm: Norm | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected [B, T, heads*d] tensors -> q [B, heads, T, d], k and v [B, kv_heads, T, d]; q and k normalised
    per head by ``q_norm``/``k_norm`` when given (Qwen3-style attention), then rotated by ``rotate``."""
    batch, length = q.shape[0], q.shape[1]
    q = q.view(batch, length, layout.num_heads, layout.head_dim)
    k = k.view(batch, length, layout.num_kv_heads, layout.head_dim)
    if q_norm is not None and k_norm is not None:
        q, k = q_norm(q), k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    v = v.view(batch, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    return rotate(q, cos, sin), rotate(k, cos, sin), v


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv, S, d] -> [B, kv * groups, S, d] for grouped-query attention."""
    if groups == 1:
        return x
    batch, kv, length, dim = x.shape
    return x.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, kv * groups, length, dim)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> [B, T, heads * d] (what the output projection takes)."""
    batch, heads, length, dim = out.shape
    return out.transpose(1, 2).reshape(batch, length, heads * dim)


def empty_past(adapter: "VisionLanguageAdapter", batch: int, lengths: Sequence[int] | int = 0,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per-layer (key, value) tensors of the given past lengths, flattened like the graph's inputs."""
    spec = adapter.spec.decoder
    lengths = [lengths] * spec.num_layers if isinstance(lengths, int) else list(lengths)
    dtype = dtype or adapter.dtype
    device = device or adapter.device
    return [torch.zeros(batch, spec.num_kv_heads, lengths[i], spec.head_dim, dtype=dtype, device=device)
            for i in range(spec.num_layers) for _ in range(2)]
