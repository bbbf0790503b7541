"""LLaVA-1.5-7B/13B architecture configs for random-weight ``*-shapes`` models (speed work on a GPU)."""

from __future__ import annotations

from typing import Any

from apet.adapters.shared.shapes import clip_vit_l14, vicuna


def shapes_config(name: str) -> Any:
    """CLIP ViT-L/14-336 + 2-layer MLP + Vicuna-7B/13B."""
    from transformers import LlavaConfig

    big = name == "llava-13b-shapes"
    vision = clip_vit_l14(336)
    text = vicuna(big)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, projector_hidden_act="gelu",
                       vision_feature_select_strategy="default", vision_feature_layer=-2, image_seq_length=576)


def shallow_shapes_adapter(layers: int, vision_layers: int, dtype: Any, device: str) -> Any:
    """LLaVA-1.5-7B widths with ``layers`` LLM and ``vision_layers`` CLIP layers, random weights: a GPU experiment at
    real widths whose export takes seconds to a minute instead of ~8 minutes (per-layer costs scale to full depth)."""
    from apet.adapters.llava.adapter import LlavaAdapter

    config = shapes_config("llava-shapes")
    config.text_config.num_hidden_layers = layers
    config.vision_config.num_hidden_layers = vision_layers
    return LlavaAdapter.random_init(config, dtype=dtype, device=device)
