"""Video-LLaVA-7B's architecture config for the random-weight ``video-llava-shapes`` model (speed work on a GPU)."""

from __future__ import annotations

from typing import Any

from apet.adapters.shared.shapes import clip_vit_l14, vicuna


def shapes_config(name: str) -> Any:
    """LanguageBind video/image towers (CLIP ViT-L/14 at 224 px) + 2-layer MLP + Vicuna-7B, 8 frames."""
    from transformers import VideoLlavaConfig

    vision = clip_vit_l14(224)
    text = vicuna()
    return VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, video_token_index=32001,
                            projector_hidden_act="gelu", vision_feature_select_strategy="default",
                            vision_feature_layer=-2, image_seq_length=256, video_seq_length=8 * 257)
