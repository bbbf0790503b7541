"""The full-size towers the LLaVA-family ``*-shapes`` models share (random weights at real sizes, GPU speed work):
CLIP ViT-L/14 and Vicuna-7B/13B as Hugging Face configs."""

from __future__ import annotations

from typing import Any


def clip_vit_l14(image_size: int) -> Any:
    """CLIP ViT-L/14 at ``image_size`` px (336: LLaVA-1.5/NeXT; 224: Video-LLaVA's LanguageBind towers)."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=image_size, patch_size=14, projection_dim=768, hidden_act="quick_gelu")


def vicuna(big: bool = False) -> Any:
    """Vicuna-7B (or 13B) with LLaVA's 32,064-token vocabulary (the image/video tokens appended)."""
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=5120 if big else 4096, intermediate_size=13824 if big else 11008,
                       num_hidden_layers=40 if big else 32, num_attention_heads=40 if big else 32,
                       num_key_value_heads=40 if big else 32, vocab_size=32064, max_position_embeddings=4096,
                       rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
