"""Running a Hugging Face CLIP vision tower up to a select layer (torch), shared by every CLIP family
(LLaVA-1.5, LLaVA-NeXT tiles, Video-LLaVA's image and video towers)."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def _takes_causal_mask(layer: nn.Module) -> bool:
    """Older transformers' CLIP encoder layers require a positional causal_attention_mask."""
    return "causal_attention_mask" in inspect.signature(layer.forward).parameters


def clip_features(tower: nn.Module, pixel_values: torch.Tensor, select_layer: int, strategy: str) -> torch.Tensor:
    """Run only the CLIP encoder layers the select layer needs (LLaVA skips the last one): equal to
    ``tower(..., output_hidden_states=True).hidden_states[select_layer]`` at a fraction of the cost.
    ``default`` drops CLS (LLaVA images), ``full`` keeps it (Video-LLaVA's video features)."""
    tower = getattr(tower, "vision_model", tower)  # older transformers wrap CLIPVisionTransformer
    layers = tower.encoder.layers
    depth = select_layer if select_layer >= 0 else len(layers) + 1 + select_layer
    hidden = tower.pre_layrnorm(tower.embeddings(pixel_values))
    extra = {"causal_attention_mask": None} if _takes_causal_mask(layers[0]) else {}
    for layer in layers[:depth]:
        out = layer(hidden, None, **extra)
        hidden = out[0] if isinstance(out, tuple) else out
    return hidden[:, 1:] if strategy == "default" else hidden
