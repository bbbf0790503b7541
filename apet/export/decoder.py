"""The language model as one exportable graph: prefill and decode with explicit KV cache,
plus ApET's second stage after layer L-1 (DESIGN §4-§5).

Attention is written out (MatMul - additive mask - Softmax - MatMul in the
graph dtype) so TensorRT fuses it and no attention weights ever leave the
graph. Norms, MLPs and the rotary tables come from the Hugging Face modules of
the adapter, so any Llama-style decoder works.

Prefill vs decode is decided from the *shape* of ``inputs_embeds`` (T > 1 is
a prefill that contains the image span), never from data: TensorRT sees only
shape arithmetic, and output lengths stay computable before execution. With
stage 2, a prefill must contain the whole image span (no chunked prefill),
and the attention mask must be left-padded (zeros only before the first real
token); the runtime guarantees both.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from apet.compression import Stage2Config, compress, gather_tokens
from apet.export.scope import Scope
from apet.models.base import VisionLanguageAdapter

_BIG = 1 << 20  # larger than any sequence: (T + BIG - 2) // BIG is 1 for 2 <= T < BIG and 0 for T == 1


def past_names(num_layers: int) -> list[str]:
    return [f"past_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    return [f"present_{kind}.{i}" for i in range(num_layers) for kind in ("key", "value")]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def additive_mask(attention_mask: torch.Tensor, query_len: int | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, S] 1/0 key mask -> [B, 1, T, S] additive bias (0 or dtype.min), causal over the last T keys."""
    total = attention_mask.shape[1]
    keys = torch.arange(total, device=attention_mask.device)
    queries = torch.arange(query_len, device=attention_mask.device) + (total - query_len)
    allowed = (keys.unsqueeze(0) <= queries.unsqueeze(1)).unsqueeze(0) & (attention_mask.unsqueeze(1) > 0)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min).unsqueeze(1)


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
    only shift positions (decode, T == 1). Returns hidden, positions, mask, stage-2 kept indices."""
    span, keep, removed = s2.span, s2.compression.keep, s2.removed
    length = _sequence_length(h)
    is_prefill = (length + (_BIG - 2)) // _BIG
    new_length = length - removed * is_prefill

    start = image_start.clamp(min=0).unsqueeze(1)  # a garbage start must not index out of bounds
    offsets = torch.arange(span, device=h.device)
    span_index = _at_most(start + offsets, length - 1)
    c = s2.compression
    kept = compress(gather_tokens(h, span_index), keep=keep, basis=c.basis, method=c.method, merge=c.merge,
                    seed=c.seed)

    positions = torch.arange(new_length, device=h.device).unsqueeze(0)
    before = positions < start
    in_span = (positions >= start) & (positions < start + keep * is_prefill)
    source = _at_most(torch.where(before, positions, positions + removed * is_prefill), length - 1)
    rebuilt = torch.where(in_span.unsqueeze(-1),
                          gather_tokens(kept.tokens, (positions - start).clamp(0, keep - 1)),
                          gather_tokens(h, source))
    new_positions = position_ids[:, :new_length] - removed * (1 - is_prefill)
    # left padding: dropping R real tokens keeps the pads and shortens the run of ones -> a prefix
    return rebuilt, new_positions, attention_mask[:, : attention_mask.shape[1] - removed], kept.index


@dataclass(frozen=True)
class HeadLayout:
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def groups(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def of(cls, adapter: VisionLanguageAdapter) -> "HeadLayout":
        spec = adapter.spec.decoder
        return cls(spec.num_heads, spec.num_kv_heads, spec.head_dim)


def project_qkv(attn: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layout: HeadLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [B, heads, T, d], k and v [B, kv_heads, T, d], rotary embedding applied to q and k."""
    return split_heads(attn.q_proj(h), attn.k_proj(h), attn.v_proj(h), cos, sin, layout)


def split_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                layout: HeadLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected [B, T, heads*d] tensors -> per-head layout with the rotary embedding applied."""
    batch, length = q.shape[0], q.shape[1]
    q = q.view(batch, length, layout.num_heads, layout.head_dim).transpose(1, 2)
    k = k.view(batch, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    v = v.view(batch, length, layout.num_kv_heads, layout.head_dim).transpose(1, 2)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin, v


def repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, kv, S, d] -> [B, kv * groups, S, d] for grouped-query attention."""
    if groups == 1:
        return x
    batch, kv, length, dim = x.shape
    return x.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, kv * groups, length, dim)


def merge_heads(attn: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] -> o_proj([B, T, heads * d])."""
    batch, heads, length, dim = out.shape
    return attn.o_proj(out.transpose(1, 2).reshape(batch, length, heads * dim))


class DecoderGraph(nn.Module):
    """What ``llm.onnx`` computes. Inputs: inputs_embeds [B,T,H], position_ids [B,T], attention_mask
    [B,P+T] (left-padded), image_start [B] (stage 2 only), then past_key.i / past_value.i per layer.
    Outputs: logits, stage2_index (stage 2 only), present_key.i / present_value.i."""

    def __init__(self, adapter: VisionLanguageAdapter, stage2: Stage2Config | None = None,
                 all_logits: bool = False) -> None:
        super().__init__()
        self.hf_layers = list(adapter.decoder_layers())  # a plain list: their scope is the Scope below
        # attribute names are the node-name scopes of apet.scopes: layers.i/..., apet_stage2/..., mask/...
        self.layers = nn.ModuleList(Scope(partial(self._layer, layer)) for layer in self.hf_layers)
        self.apet_stage2 = Scope(partial(stage2_rebuild, stage2)) if stage2 is not None else None
        self.mask = Scope(additive_mask)
        self.model = adapter.model  # registered so tracing sees the weights
        self.norm = adapter.final_norm()
        self.head = adapter.lm_head()
        self.rotary = adapter.rotary_embedding()
        self.layout = HeadLayout.of(adapter)
        self.stage2 = stage2
        self.all_logits = all_logits

    # -- blocks ------------------------------------------------------------------------------------
    def _attention(self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        q, k, v = project_qkv(layer.self_attn, h, cos, sin, self.layout)
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        groups = self.layout.groups
        scores = (q * self.layout.head_dim**-0.5) @ repeat_kv(keys, groups).transpose(2, 3) + bias
        out = F.softmax(scores, dim=-1) @ repeat_kv(values, groups)
        return merge_heads(layer.self_attn, out), keys, values

    def _layer(self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
               past_k: torch.Tensor, past_v: torch.Tensor):
        attn_out, keys, values = self._attention(layer, layer.input_layernorm(h), cos, sin, bias, past_k, past_v)
        h = h + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, keys, values

    # -- graph -------------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_start, past = (rest[0], rest[1:]) if self.stage2 is not None else (None, rest)
        h = inputs_embeds
        cos, sin = self.rotary(h, position_ids)
        bias = self.mask(attention_mask, h.shape[1], h.dtype)
        presents: list[torch.Tensor] = []
        stage2_index = None
        for i, layer in enumerate(self.layers):
            if self.apet_stage2 is not None and self.stage2 is not None and i == self.stage2.layer:
                h, position_ids, attention_mask, stage2_index = self.apet_stage2(h, position_ids, attention_mask,
                                                                                 image_start)
                cos, sin = self.rotary(h, position_ids)
                bias = self.mask(attention_mask, h.shape[1], h.dtype)
            h, keys, values = layer(h, cos, sin, bias, past[2 * i], past[2 * i + 1])
            presents += [keys, values]
        if not self.all_logits:
            h = h[:, -1:]
        logits = self.head(self.norm(h))
        head = (logits,) if stage2_index is None else (logits, stage2_index)
        return head + tuple(presents)


def empty_past(adapter: VisionLanguageAdapter, batch: int, lengths: Sequence[int] | int = 0,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> list[torch.Tensor]:
    """Per-layer (key, value) tensors of the given past lengths, flattened like the graph's inputs."""
    spec = adapter.spec.decoder
    lengths = [lengths] * spec.num_layers if isinstance(lengths, int) else list(lengths)
    dtype = dtype or adapter.dtype
    device = device or adapter.device
    return [torch.zeros(batch, spec.num_kv_heads, lengths[i], spec.head_dim, dtype=dtype, device=device)
            for i in range(spec.num_layers) for _ in range(2)]
