"""One decoder layer of the language model, around an attention the caller supplies: the one home of what a
layer computes, used by the exported graph (:mod:`apet.export.decoder`, KV cache by concatenation) and the
static-cache GPU path (:mod:`apet.runtime.static_decoder`), so the two cannot drift apart.

input norm -> q/k/v projection (separate, or fused: :mod:`apet.runtime.fusion`) -> q/k RMSNorm per head (when the
model has it: ``DecoderSpec.qk_norm``) -> rotary -> [attention: the caller's] -> o_proj + residual ->
post-attention norm -> MLP + residual. After the layer, a family that declares ``DecoderSpec.injected_layers``
gets its per-layer visual inputs added at the visual rows (:func:`add_injected`).

The layer's weights stay in the family's Hugging Face modules (Llama / Mistral / Qwen2 / Qwen3 names); they are
looked up at call time, so weight-only quantization may replace projections after a block is made.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch
from torch import nn

from apet.modeling.blocks import HeadLayout, Rotate, apply_rotary, merge_heads, split_heads

# (q [B, heads, T, d], k, v [B, kv_heads, T, d]) -> (attention output [B, heads, T, d], what the caller keeps)
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, Any]]


class FusedProjections(Protocol):
    """A layer's projections fused for the GPU fast path (:class:`apet.runtime.fusion.FusedLayer`): the input norm
    and q/k/v projections as one packed output, and everything after attention."""

    def project_qkv(self, h: torch.Tensor) -> torch.Tensor: ...

    def qkv_rotated(self, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None: ...

    def split_qkv(self, projected: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def finish(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor: ...


def has_qk_norm(layer: nn.Module) -> bool:
    """Whether a Hugging Face decoder layer normalises q and k per head (Qwen3's ``q_norm``/``k_norm``)."""
    attn = layer.self_attn
    return isinstance(getattr(attn, "q_norm", None), nn.Module) and isinstance(getattr(attn, "k_norm", None),
                                                                                nn.Module)


class DecoderBlock:
    """One decoder layer (a plain object, not a module: node-name scopes stay the caller's ``layers.i``)."""

    def __init__(self, layer: nn.Module, layout: HeadLayout, *, qk_norm: bool = False,
                 fused: FusedProjections | None = None) -> None:
        if qk_norm != has_qk_norm(layer):
            have = "has" if has_qk_norm(layer) else "has no"
            raise ValueError(f"the decoder layer {have} q/k norms but the model spec says qk_norm={qk_norm}: the "
                             "family's DecoderSpec must match its checkpoint")
        self.layer = layer
        self.layout = layout
        self.qk_norm = qk_norm
        self.fused = fused

    def qkv(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            rotate: Rotate = apply_rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, projections, q/k norm and rotary: q [B, heads, T, d], k and v [B, kv_heads, T, d]."""
        attn = self.layer.self_attn
        if self.fused is not None:
            projected = self.fused.project_qkv(h)
            if not self.qk_norm and rotate is apply_rotary:
                layout = self.layout
                done = self.fused.qkv_rotated(projected, cos, sin, layout.num_heads, layout.num_kv_heads,
                                              layout.head_dim)
                if done is not None:
                    return done
            q, k, v = self.fused.split_qkv(projected)
        else:
            normed = self.layer.input_layernorm(h)
            q, k, v = attn.q_proj(normed), attn.k_proj(normed), attn.v_proj(normed)
        norms = (attn.q_norm, attn.k_norm) if self.qk_norm else (None, None)
        return split_heads(q, k, v, cos, sin, self.layout, rotate, *norms)

    def finish(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Output projection and residual, then the MLP half of the layer."""
        if self.fused is not None:  # the residual adds and the post-attention norm fused on the GPU
            return self.fused.finish(h, merge_heads(attended))
        h = h + self.layer.self_attn.o_proj(merge_heads(attended))
        return h + self.layer.mlp(self.layer.post_attention_layernorm(h))

    def __call__(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend,
                 rotate: Rotate = apply_rotary) -> tuple[torch.Tensor, Any]:
        """The layer on hidden states [B, T, H]; returns the new hidden states and what ``attend`` kept."""
        q, k, v = self.qkv(h, cos, sin, rotate)
        attended, kept = attend(q, k, v)
        return self.finish(h, attended), kept


def decoder_blocks(layers: list[nn.Module], layout: HeadLayout, qk_norm: bool,
                   fused: list[FusedProjections] | None = None) -> list[DecoderBlock]:
    """One block per Hugging Face layer (``fused``: one FusedProjections per layer, the GPU fast path)."""
    return [DecoderBlock(layer, layout, qk_norm=qk_norm, fused=None if fused is None else fused[i])
            for i, layer in enumerate(layers)]


def add_injected(h: torch.Tensor, injected: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """h [B, T, H] + the injected row of every visual token: ``injected`` [N, H] is one layer's inputs in the
    order of the flattened visual rows, ``rows`` [B, T] the row of each token (-1 = not visual, adds zero).

    In the graph: ``h + Gather(Concat([zeros(1, H), injected]), rows + 1)`` — no data-dependent shapes, and N
    may be 0 (decode)."""
    table = torch.cat([injected.new_zeros((1, injected.shape[-1])), injected])
    return h + table[rows + 1]
