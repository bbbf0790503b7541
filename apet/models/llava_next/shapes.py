"""llava-v1.6-vicuna-7b's architecture for the random-weight ``llava-next-shapes`` model (GPU speed work)."""

from __future__ import annotations

from typing import Any

VICUNA_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def shapes_config(name: str) -> Any:
    """CLIP ViT-L/14-336 + 2-layer MLP + Vicuna-7B, AnyRes over the v1.6 grid pinpoints."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlavaNextConfig(vision_config=vision, text_config=text, image_token_index=32000,
                           projector_hidden_act="gelu", vision_feature_select_strategy="default",
                           vision_feature_layer=-2, image_grid_pinpoints=VICUNA_PINPOINTS, image_seq_length=576)
