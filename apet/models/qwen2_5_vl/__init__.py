"""Qwen2.5-VL: window-attention ViT + 2x2 merger + Qwen2 with M-RoPE; ApET on the merger's output
(docs/algorithm.md)."""

from apet.models.qwen2_5_vl.family import QwenFamily
from apet.models.registry import register_family

register_family(QwenFamily())
