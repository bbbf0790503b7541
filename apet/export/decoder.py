"""The language model as one exportable graph (``llm.onnx``): prefill and decode with explicit KV cache,
plus ApET's second stage after layer L-1 (docs/algorithm.md). The blocks live in :mod:`apet.modeling.blocks`;
norms, MLPs and the rotary tables come from the adapter's Hugging Face modules, so any Llama-style
decoder works.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from apet.contracts.compression import Stage2Config
from apet.export.attention import attention_kernel
from apet.modeling.adapter import VisionLanguageAdapter
from apet.modeling.blocks import HeadLayout, merge_heads, project_qkv, stage2_rebuild
from apet.modeling.scope import Scope


class DecoderGraph(nn.Module):
    """What ``llm.onnx`` computes. Inputs: inputs_embeds [B,T,H], position_ids [B,T], attention_mask
    [B,P+T] (left-padded), image_start [B] (stage 2 only), then past_key.i / past_value.i per layer.
    Outputs: logits, stage2_index (stage 2 only), present_key.i / present_value.i. ``attention`` is the
    exported form (pattern | op, :mod:`apet.export.attention`); the KV cache is concatenated outside the
    attention in both."""

    def __init__(self, adapter: VisionLanguageAdapter, stage2: Stage2Config | None = None,
                 all_logits: bool = False, attention: str = "pattern", lm_head_slices: int = 1) -> None:
        super().__init__()
        self.hf_layers = list(adapter.decoder_layers())  # a plain list: their scope is the Scope below
        # attribute names are the node-name scopes of apet.scopes: layers.i/..., apet_stage2/..., mask/...
        self.layers = nn.ModuleList(Scope(partial(self._layer, layer)) for layer in self.hf_layers)
        self.apet_stage2 = Scope(partial(stage2_rebuild, stage2)) if stage2 is not None else None
        self.model = adapter.model  # registered so tracing sees the weights
        self.norm = adapter.final_norm()
        self.head = adapter.lm_head() if lm_head_slices == 1 else SlicedHead(adapter.lm_head(), lm_head_slices)
        self.rotary = adapter.rotary
        self.layout = HeadLayout.of(adapter)
        self.stage2 = stage2
        self.all_logits = all_logits
        self.kernel = attention_kernel(attention, self.layout)
        self.mask = Scope(self.kernel.mask)

    # -- blocks ------------------------------------------------------------------------------------
    def _attention(self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   mask: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor):
        q, k, v = project_qkv(layer.self_attn, h, cos, sin, self.layout, self.kernel.rotate)
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        return merge_heads(layer.self_attn, self.kernel.attend(q, keys, values, mask)), keys, values

    def _layer(self, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               past_k: torch.Tensor, past_v: torch.Tensor):
        attn_out, keys, values = self._attention(layer, layer.input_layernorm(h), cos, sin, mask, past_k, past_v)
        h = h + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
        return h, keys, values

    # -- graph -------------------------------------------------------------------------------------
    def forward(self, inputs_embeds: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        image_start, past = (rest[0], rest[1:]) if self.stage2 is not None else (None, rest)
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
            h, keys, values = layer(h, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [keys, values]
        if not self.all_logits:
            h = h[:, -1:]
        logits = self.head(self.norm(h))
        head = (logits,) if stage2_index is None else (logits, stage2_index)
        return head + tuple(presents)



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
