"""Video-LLaVA-7B's architecture config for the random-weight ``video-llava-shapes`` model (speed work on a GPU)."""

from __future__ import annotations

from typing import Any


def shapes_config(name: str) -> Any:
    """LanguageBind video/image towers (CLIP ViT-L/14 at 224 px) + 2-layer MLP + Vicuna-7B, 8 frames."""
    from transformers import CLIPVisionConfig, LlamaConfig, VideoLlavaConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=224, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return VideoLlavaConfig(vision_config=vision, text_config=text, image_token_index=32000, video_token_index=32001,
                            projector_hidden_act="gelu", vision_feature_select_strategy="default",
                            vision_feature_layer=-2, image_seq_length=256, video_seq_length=8 * 257)
