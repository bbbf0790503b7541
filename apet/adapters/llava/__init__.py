"""LLaVA-1.5's torch half (apet/adapters/shared/half.py): checkpoints, random weights at real sizes, the tiny
checkpoint and the vision graph. :mod:`apet.models` reaches it through ``Family.torch_half()`` when export, the
torch backend or a benchmark asks; the device never imports it."""

from __future__ import annotations

from apet.adapters.llava.adapter import LlavaAdapter
from apet.adapters.llava.shapes import shapes_config
from apet.adapters.llava.tiny import ensure_tiny_llava
from apet.adapters.llava.vision import LlavaVisionStages
from apet.adapters.shared.half import TorchHalf
from apet.adapters.shared.llava_base import clip_flops_shape

HALF = TorchHalf(LlavaAdapter, shapes_config, ensure_tiny_llava, LlavaVisionStages, clip_flops_shape)
