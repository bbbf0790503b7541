"""llava-v1.6-vicuna-7b's architecture for the random-weight ``llava-next-shapes`` model (GPU speed work)."""

from __future__ import annotations

from typing import Any

from apet.adapters.shared.shapes import clip_vit_l14, vicuna

VICUNA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def shapes_config(name: str) -> Any:
    """CLIP ViT-L/14-336 + 2-layer MLP + Vicuna-7B, AnyRes over the v1.6 grid pinpoints."""
    from transformers import LlavaNextConfig

    vision = clip_vit_l14(336)
    text = vicuna()
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           projector_hidden_act="gelu", vision_feature_select_strategy="default",
                           vision_feature_layer=-2, image_grid_pinpoints=VICUNA_PINPOINTS, image_seq_length=576)
