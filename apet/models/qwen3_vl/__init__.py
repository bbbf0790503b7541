"""Qwen3-VL: ViT with learned + 2-D rotary positions, 2x2 merger and DeepStack mergers + Qwen3 with interleaved
M-RoPE; ApET on the merger's output, the DeepStack levels following its assignment (docs/algorithm.md)."""

from apet.models.qwen3_vl.family import Qwen3Family
from apet.models.registry import register_family

register_family(Qwen3Family())
