"""InternVL3.5-8B's architecture for the random-weight ``internvl3.5-8b-shapes`` model (GPU speed work).

The values are those of the ``OpenGVLab/InternVL3_5-8B-HF`` config as we know them (not read from the hub here):
InternViT-300M-448px-V2_5 (24 layers, width 1024, 16 heads, MLP 4096, LayerNorm, q/k/v bias, no q/k norm, layer
scale), a 0.5 pixel shuffle and a 4096 -> 4096 -> 4096 GELU projector, and Qwen3-8B (36 layers, width 4096, 32
query / 8 key-value heads of 128, MLP 12288, q/k norm, rope theta 1e6, untied head, vocabulary 151,936 with
InternVL's image tokens at 151,669.., <IMG_CONTEXT> = 151,671).
"""

from __future__ import annotations

from typing import Any


def shapes_config(name: str) -> Any:
    from transformers import InternVLConfig

    vision = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  image_size=[448, 448], patch_size=[14, 14], attention_bias=True, use_qk_norm=False,
                  norm_type="layer_norm", layer_norm_eps=1e-6, use_mean_pooling=True, hidden_act="gelu",
                  layer_scale_init_value=0.1)
    text = dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936, rms_norm_eps=1e-6,
                max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                bos_token_id=151643, eos_token_id=151645, pad_token_id=151643, tie_word_embeddings=False,
                hidden_act="silu")
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=151671, image_seq_length=256,
                          downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)
