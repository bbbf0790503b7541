"""The language model as exportable graphs: prefill and decode with explicit KV cache, plus ApET's second stage
after layer L-1 (docs/algorithm.md). Each layer is :class:`apet.modeling.decoder_block.DecoderBlock` (the static
GPU path computes the same one) with the exported attention form around it; the rotary tables come from the
adapter, so any Llama-style decoder works.

Two cache forms (``apet-export --kv-cache``, docs/architecture.md): ``dynamic`` is one graph (``llm.onnx``) whose
cache grows by concatenation; ``static`` is two graphs over preallocated caches [B, kv_heads, capacity, d] written
in place with ``ScatterElements`` — :class:`DecoderGraph` with ``static=True`` is the prefill (stage 2 inside),
:class:`StaticDecodeGraph` the fixed-shape decode step (no stage 2: ONNX Runtime can replay it as a CUDA graph).
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from apet.contracts.compression import Stage2Config
from apet.errors import UsageError
from apet.export.attention import attention_kernel
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.blocks import HeadLayout, stage2_rebuild
from apet.modeling.decoder_block import DecoderBlock, add_injected, decoder_blocks
from apet.modeling.scope import Scope


class DecoderGraph(nn.Module):
    """What ``llm.onnx`` computes. Inputs: inputs_embeds [B,T,H], position_ids [B,T], attention_mask
    [B,P+T] (left-padded), image_start [B] (stage 2 only), injected_embeds [L,N,H] and injected_rows [B,T]
    (``DecoderSpec.injected_layers`` L > 0 only), then past_key.i / past_value.i per layer.
    Outputs: logits, stage2_index (stage 2 only), present_key.i / present_value.i. ``attention`` is the
    exported form (pattern | op, :mod:`apet.export.attention`); the KV cache is concatenated outside the
    attention in both."""

    def __init__(self, adapter: VisionLanguageAdapter, stage2: Stage2Config | None = None,
                 all_logits: bool = False, attention: str = "pattern", lm_head_slices: int = 1,
                 static: bool = False) -> None:
        super().__init__()
        spec = adapter.spec.decoder
        if stage2 is not None and spec.injected_layers:
            raise UsageError("ApET's second stage and injected per-layer inputs are not combined yet",
                             "export with --stages 1")
        self.layout = HeadLayout.of(adapter)
        # plain objects: their scope is the Scope below
        self.blocks = decoder_blocks(list(adapter.decoder_layers()), self.layout, spec.qk_norm)
        self.injected_layers = spec.injected_layers
        # attribute names are the node-name scopes of apet.scopes: layers.i/..., apet_stage2/..., mask/...
        self.layers = nn.ModuleList(Scope(partial(self._layer, i, block)) for i, block in enumerate(self.blocks))
        self.apet_stage2 = Scope(partial(stage2_rebuild, stage2)) if stage2 is not None else None
        self.model = adapter.model  # registered so tracing sees the weights
        self.norm = adapter.final_norm()
        self.head = adapter.lm_head() if lm_head_slices == 1 else SlicedHead(adapter.lm_head(), lm_head_slices)
        self.rotary = adapter.rotary
        self.stage2 = stage2
        self.all_logits = all_logits
        self.kernel = attention_kernel(attention, self.layout)
        self.mask = Scope(self.kernel.mask)
        self.static = static  # past_* are preallocated buffers: the prompt is written at positions 0..T-1

    # -- blocks ------------------------------------------------------------------------------------
    def _layer(self, index: int, block: DecoderBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, injected: torch.Tensor | None = None,
               rows: torch.Tensor | None = None):
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
            if self.static:  # a prefill over an empty static cache: attend over the prompt, write it at 0..T-1
                write = torch.arange(k.shape[2], device=k.device)
                return self.kernel.attend(q, k, v, mask), (write_at(past_k, k, write), write_at(past_v, v, write))
            keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)  # the cache grows
            return self.kernel.attend(q, keys, values, mask), (keys, values)

        h, (keys, values) = block(h, cos, sin, attend, self.kernel.rotate)
        if injected is not None and rows is not None:  # this layer's [N, H] slice, gathered in its scope
            h = add_injected(h, injected[index], rows)
        return h, keys, values

    # -- graph -------------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_start, past = (rest[0], rest[1:]) if self.stage2 is not None else (None, rest)
        injected, rows = (past[0], past[1]) if self.injected_layers else (None, None)
        past = past[2:] if self.injected_layers else past
        h = inputs_embeds
        cos, sin = self.kernel.tables(*self.rotary(h, position_ids))
        mask = self.mask(attention_mask, h.shape[1], h.dtype)
        presents: list[torch.Tensor] = []
        stage2_index = None
        for i, layer in enumerate(self.layers):
            if self.apet_stage2 is not None and self.stage2 is not None and i == self.stage2.layer:
                h, position_ids, attention_mask, stage2_index = self.apet_stage2(h, position_ids, attention_mask,
                                                                                 image_start)
                cos, sin = self.kernel.tables(*self.rotary(h, position_ids))
                mask = self.mask(attention_mask, h.shape[1], h.dtype)
            extra = (injected, rows) if injected is not None and i < self.injected_layers else ()
            h, keys, values = layer(h, cos, sin, mask, past[2 * i], past[2 * i + 1], *extra)
            presents += [keys, values]
        if not self.all_logits:
            h = h[:, -1:]
        logits = self.head(self.norm(h))
        head = (logits,) if stage2_index is None else (logits, stage2_index)
        return head + tuple(presents)


def write_at(buffer: torch.Tensor, new: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``buffer`` [B, kv, C, d] with ``new`` [B, kv, T, d] written at cache ``positions`` [T] (one ONNX
    ``ScatterElements`` on axis 2). Bound as both input and output, ONNX Runtime writes in place (it copies the
    input only when the two buffers differ)."""
    index = positions.view(1, 1, -1, 1).expand(new.shape)
    return buffer.scatter(2, index, new)


class StaticDecodeGraph(DecoderGraph):
    """``llm_decode.onnx``: one token per row over static caches, fixed shapes at a fixed batch. Inputs:
    inputs_embeds [B,1,H], position_ids [B,1] (M-RoPE: [3,B,1]) of the full sequence, attention_mask [B, C]
    (validity of every cache position of group 0, the new token's included; C = max_context), cache_position [1]
    (where group 0 writes: the sequence length so far), then the past buffers. Outputs: logits [B,1,V] and the
    buffers written.

    No stage 2 here: its compression runs once, in the prefill graph. Layers from L on hold R fewer positions
    (:class:`apet.contracts.cache.CacheLayout`): there the token is written at cache_position - R, rotated at its
    position - R, and attends over the first C - R positions of the same validity mask (dropping R real tokens
    leaves the left padding and shortens the run of ones: a prefix, up to the position written), as stage 2's decode
    branch does in the dynamic form."""

    def __init__(self, adapter: VisionLanguageAdapter, stage2: Stage2Config | None, max_context: int,
                 attention: str = "pattern", lm_head_slices: int = 1) -> None:
        super().__init__(adapter, None, False, attention, lm_head_slices)  # decode has no visual rows to inject
        self.split = stage2.layer if stage2 is not None else len(self.layers)
        self.removed = stage2.removed if stage2 is not None else 0
        self.capacity = (max_context, max_context - self.removed)
        self.mask = Scope(self.kernel.cache_mask)

    def _layer(self, index: int, block: DecoderBlock, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               mask: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, write: torch.Tensor):
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):  # write, then attend over the buffer
            keys, values = write_at(past_k, k, write), write_at(past_v, v, write)
            return self.kernel.attend(q, keys, values, mask), (keys, values)

        h, (keys, values) = block(h, cos, sin, attend, self.kernel.rotate)
        return h, keys, values

    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                cache_position: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = inputs_embeds
        groups = []  # per cache group: cos, sin, mask, write position
        for shift, capacity in zip((0, self.removed), self.capacity[: 2 if self.removed else 1]):
            cos, sin = self.kernel.tables(*self.rotary(h, position_ids - shift))
            write = cache_position - shift
            # positions after the one written now hold stale keys (group 1: the last R of the mask's ones too)
            written = torch.arange(capacity, device=h.device) <= write
            valid = attention_mask[:, :capacity] * written
            groups.append((cos, sin, self.mask(valid, h.dtype), write))
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            cos, sin, mask, write = groups[0 if i < self.split else 1]
            h, keys, values = layer(h, cos, sin, mask, past[2 * i], past[2 * i + 1], write)
            presents += [keys, values]
        return (self.head(self.norm(h)),) + tuple(presents)



class SlicedHead(nn.Module):
    """The LM head as N vocabulary slices concatenated in the graph (``--split-lm-head N``).

    A 151,936 x 3,584 fp16 head is one ~1 GiB weight; TensorRT's GEMM tactics want it contiguous, which an
    8 GB Jetson often cannot provide. N separate initializers of 1/N the size build there; the logits are
    the same (a concatenation of the slices' products).
    """

    def __init__(self, head: nn.Linear, slices: int) -> None:
        super().__init__()
        bounds = [round(i * head.out_features / slices) for i in range(slices + 1)]
        self.lm_head_slices = nn.ModuleList()
        for start, end in zip(bounds[:-1], bounds[1:]):
            part = nn.Linear(head.in_features, end - start, bias=head.bias is not None, dtype=head.weight.dtype,
                             device=head.weight.device)
            part.weight.data.copy_(head.weight.data[start:end])
            if head.bias is not None:
                part.bias.data.copy_(head.bias.data[start:end])
            self.lm_head_slices.append(part)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(h) for part in self.lm_head_slices], dim=-1)
