"""Qwen3-VL-8B-Instruct's architecture config for the random-weight ``qwen3-vl-8b-shapes`` model (speed work on a
GPU). The sizes are those of the published config.json of Qwen/Qwen3-VL-8B-Instruct as we know them (the hub is not
reachable from here to re-check): a 27-block ViT (hidden 1152, 16 heads, MLP 4304, 16-px patches, a 48x48 learned
position table, DeepStack after blocks 8, 16, 24) and a 36-layer Qwen3 LLM (hidden 4096, 32 heads, 8 KV heads of
128, MLP 12288, vocabulary 151,936, untied head, rope theta 5e6 with interleaved M-RoPE sections 24/20/20)."""

from __future__ import annotations

from typing import Any

_8B = {"vision": dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304, out_hidden_size=4096,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                      deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
       "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                    num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                    max_position_embeddings=262144, bos_token_id=151643, eos_token_id=151645,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                     "mrope_section": [24, 20, 20]}),
       "tied": False}
_SHAPES = {"qwen3-vl-8b-shapes": _8B}


def shapes_config(name: str) -> Any:
    from transformers import Qwen3VLConfig

    shape = _SHAPES[name]
    return Qwen3VLConfig(text_config=shape["text"], vision_config=shape["vision"], image_token_id=151655,
                         video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
                         tie_word_embeddings=shape["tied"])
