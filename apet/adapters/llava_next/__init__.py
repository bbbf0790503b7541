"""LLaVA-NeXT's torch half (apet/adapters/shared/half.py): checkpoints, random weights at real sizes, the tiny
checkpoint and the vision graph. :mod:`apet.models` reaches it through ``Family.torch_half()`` when export, the
torch backend or a benchmark asks; the device never imports it."""

from __future__ import annotations

from apet.adapters.llava_next.adapter import LlavaNextAdapter
from apet.adapters.llava_next.shapes import shapes_config
from apet.adapters.llava_next.tiny import ensure_tiny_llava_next
from apet.adapters.llava_next.vision import LlavaNextVisionStages
from apet.adapters.shared.half import TorchHalf
from apet.adapters.shared.llava_base import clip_flops_shape

HALF = TorchHalf(LlavaNextAdapter, shapes_config, ensure_tiny_llava_next, LlavaNextVisionStages, clip_flops_shape)
