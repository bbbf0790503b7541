"""LLaVA-1.5: CLIP ViT-L/14-336 + MLP projector + Vicuna; ApET before the projector (docs/algorithm.md)."""

from apet.models.llava.family import LlavaFamily
from apet.models.registry import register_family

register_family(LlavaFamily())
