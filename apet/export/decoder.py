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

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from apet.compression import Stage2Config, compress, gather_tokens
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


class DecoderGraph(nn.Module):
    """What ``llm.onnx`` computes. Inputs: inputs_embeds [B,T,H], position_ids [B,T], attention_mask
    [B,P+T] (left-padded), image_start [B] (stage 2 only), then past_key.i / past_value.i per layer.
    Outputs: logits, stage2_index (stage 2 only), present_key.i / present_value.i."""

    def __init__(self, adapter: VisionLanguageAdapter, stage2: Stage2Config | None = None,
                 all_logits: bool = False) -> None:
        super().__init__()
        self.model = adapter.model  # registered so tracing sees the weights
        self.layers = list(adapter.decoder_layers())
        self.norm = adapter.final_norm()
        self.head = adapter.lm_head()
        self.rotary = adapter.rotary_embedding()
        spec = adapter.spec.decoder
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.stage2 = stage2
        self.all_logits = all_logits

    # -- blocks ------------------------------------------------------------------------------------
    def _attention(self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   bias: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        attn = layer.self_attn
        batch, length = h.shape[0], h.shape[1]
        q = attn.q_proj(h).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        groups = self.num_heads // self.num_kv_heads
        k_all, v_all = keys, values
        if groups > 1:
            k_all = keys.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, self.num_heads, -1, self.head_dim)
            v_all = values.unsqueeze(2).expand(-1, -1, groups, -1, -1).reshape(batch, self.num_heads, -1, self.head_dim)
        scores = (q * self.head_dim**-0.5) @ k_all.transpose(2, 3) + bias
        out = F.softmax(scores, dim=-1) @ v_all
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))
        return out, keys, values

    def _layer(self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
               past_k: torch.Tensor, past_v: torch.Tensor):
        attn_out, keys, values = self._attention(layer, layer.input_layernorm(h), cos, sin, bias, past_k, past_v)
        h = h + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, keys, values

    def _stage2(self, h: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                image_start: torch.Tensor):
        """Compress the image span and rebuild the sequence (prefill); only shift positions (decode)."""
        s2 = self.stage2
        assert s2 is not None
        span, keep, removed = s2.span, s2.compression.keep, s2.removed
        length = torch.onnx.operators.shape_as_tensor(h)[1]
        is_prefill = (length + (_BIG - 2)) // _BIG
        new_length = length - removed * is_prefill

        start = image_start.clamp(min=0).unsqueeze(1)  # a garbage start must not index out of bounds
        offsets = torch.arange(span, device=h.device)
        span_index = torch.minimum(start + offsets, length - 1)
        c = s2.compression
        kept = compress(gather_tokens(h, span_index), keep=keep, basis=c.basis, method=c.method, merge=c.merge,
                        seed=c.seed)

        positions = torch.arange(new_length, device=h.device).unsqueeze(0)
        before = positions < start
        in_span = (positions >= start) & (positions < start + keep * is_prefill)
        source = torch.minimum(torch.where(before, positions, positions + removed * is_prefill), length - 1)
        rebuilt = torch.where(in_span.unsqueeze(-1),
                              gather_tokens(kept.tokens, (positions - start).clamp(0, keep - 1)),
                              gather_tokens(h, source))
        new_positions = position_ids[:, :new_length] - removed * (1 - is_prefill)
        # left padding: dropping R real tokens keeps the pads and shortens the run of ones -> a prefix
        return rebuilt, new_positions, attention_mask[:, : attention_mask.shape[1] - removed], kept.index

    # -- graph -------------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_start, past = (rest[0], rest[1:]) if self.stage2 is not None else (None, rest)
        h = inputs_embeds
        cos, sin = self.rotary(h, position_ids)
        bias = additive_mask(attention_mask, h.shape[1], h.dtype)
        presents: list[torch.Tensor] = []
        stage2_index = None
        for i, layer in enumerate(self.layers):
            if self.stage2 is not None and i == self.stage2.layer:
                h, position_ids, attention_mask, stage2_index = self._stage2(h, position_ids, attention_mask,
                                                                             image_start)
                cos, sin = self.rotary(h, position_ids)
                bias = additive_mask(attention_mask, h.shape[1], h.dtype)
            h, keys, values = self._layer(layer, h, cos, sin, bias, past[2 * i], past[2 * i + 1])
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
