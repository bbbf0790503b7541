"""The CLIP tower of the LLaVA family (1.5, NeXT, Video-LLaVA) and its vision graph (torch).

``clip_features`` runs only the encoder layers the select layer needs; :class:`ClipProjectorStages`
is the vision graph ``CLIP -> ApET stage 1 -> projector`` over a stack of square images. LLaVA-1.5
stacks one image per request (axis ``batch``), LLaVA-NeXT every view of every request (axis
``views``). The projector runs on the kept tokens only: it is per-token, so this equals the
reference's project-then-select at K1/N of the cost.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from apet.kernels import activations
from apet.modeling.fast_path import fast_tower, fused_linear
from apet.modeling.vision import VisionStages

QKV = ("q_proj", "k_proj", "v_proj")


def _takes_causal_mask(layer: nn.Module) -> bool:
    """Older transformers' CLIP encoder layers require a positional causal_attention_mask."""
    return "causal_attention_mask" in inspect.signature(layer.forward).parameters


def clip_attention(tower: nn.Module) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """The tower's attention modules with the q/k/v linears the fast path fuses (VisionStages.fast_linears)."""
    tower = getattr(tower, "vision_model", tower)
    return [(layer.self_attn, QKV) for layer in tower.encoder.layers]


def clip_features(tower: nn.Module, pixel_values: torch.Tensor, select_layer: int, strategy: str) -> torch.Tensor:
    """Run only the CLIP encoder layers the select layer needs (LLaVA skips the last one): equal to
    ``tower(..., output_hidden_states=True).hidden_states[select_layer]`` at a fraction of the cost.
    ``default`` drops CLS (LLaVA images), ``full`` keeps it (Video-LLaVA's video features)."""
    tower = getattr(tower, "vision_model", tower)  # older transformers wrap CLIPVisionTransformer
    layers = tower.encoder.layers
    depth = select_layer if select_layer >= 0 else len(layers) + 1 + select_layer
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    if fast_tower(hidden):
        for layer in layers[:depth]:
            hidden = _fast_layer(layer, hidden)
    else:
        extra = {"causal_attention_mask": None} if _takes_causal_mask(layers[0]) else {}
        for layer in layers[:depth]:
            out = layer(hidden, None, **extra)
            hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, 1:] if strategy == "default" else hidden


def _fast_layer(layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``CLIPEncoderLayer`` on the GPU fast path (:mod:`apet.modeling.fast_path`): q, k and v as one matmul over
    the concatenated weights (three small-M GEMMs fill the GPU poorly at one image), mask-free SDPA (flash), the
    layer's own norms and MLP (quick_gelu as one Triton pass when not compiled); the other epilogues are
    torch.compile's to fuse."""
    attn = layer.self_attn
    batch, tokens = hidden.shape[0], hidden.shape[1]
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    q, k, v = (t.view(batch, tokens, heads, head_dim).transpose(1, 2)
               for t in fused_linear(attn, QKV, layer.layer_norm1(hidden)))
    out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
    hidden = hidden + attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, heads * head_dim))
    mlp = layer.mlp
    inner = mlp.fc1(layer.layer_norm2(hidden))
    if type(mlp.activation_fn).__name__ == "QuickGELUActivation" and activations.available(inner):
        inner = activations.quick_gelu(inner)  # eagerly on a GPU: one Triton pass instead of three
    else:
        inner = mlp.activation_fn(inner)
    return hidden + mlp.fc2(inner)


class ClipProjectorStages(VisionStages):
    """pixel_values [axis, 3, H, W] -> visual_embeds [axis, K1, H_llm], keep_index [axis, K1]."""

    input_names = ["pixel_values"]
    axis: ClassVar[str] = "batch"  # the symbolic name of the leading dim (what the family's vision_dims sizes)

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.adapter.vision_features(pixel_values)

    def finish(self, tokens: torch.Tensor, index: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.adapter.project(tokens), index

    def fast_linears(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        return clip_attention(self.adapter.vision_tower())

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        recipe = self.adapter.spec.processor
        return (torch.randn(batch, 3, recipe["crop_height"], recipe["crop_width"], dtype=self.adapter.dtype,
                            device=self.adapter.device),)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: self.axis} for name in ("pixel_values", "visual_embeds", "keep_index")}
