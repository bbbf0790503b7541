"""Qwen2.5-VL-3B/7B-Instruct architecture configs for random-weight ``*-shapes`` models (speed work on a GPU)."""

from __future__ import annotations

from typing import Any

# (text hidden, intermediate, layers, heads, kv heads, vocab, tied embeddings)
_TEXT = {"qwen2.5-vl-3b-shapes": (2048, 11008, 36, 16, 2, 151936, True),
         "qwen2.5-vl-7b-shapes": (3584, 18944, 28, 28, 4, 152064, False)}


def shapes_config(name: str) -> Any:
    """The hub configs' sizes: a 32-block ViT (hidden 1280, 112-px windows, full attention in blocks 7, 15,
    23, 31) and a Qwen2 LLM with M-RoPE sections (16, 24, 24)."""
    from transformers import Qwen2_5_VLConfig

    hidden, intermediate, layers, heads, kv_heads, vocab, tied = _TEXT[name]
    vision = dict(depth=32, hidden_size=1280, num_heads=16, intermediate_size=3420, out_hidden_size=hidden,
                  fullatt_block_indexes=[7, 15, 23, 31], window_size=112, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, tokens_per_second=2, hidden_act="silu")
    text = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, rms_norm_eps=1e-6,
                max_position_embeddings=128000, bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=151655, video_token_id=151656,
                            vision_start_token_id=151652, vision_end_token_id=151653, tie_word_embeddings=tied)
