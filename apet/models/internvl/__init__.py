"""InternVL3 / InternVL3.5: 448-px tiles (+ thumbnail) through InternViT, pixel shuffle and an MLP projector into
Qwen2.5 / Qwen3; ApET per tile (docs/algorithm.md)."""

from apet.models.internvl.family import InternVLFamily
from apet.models.registry import register_family

register_family(InternVLFamily())
