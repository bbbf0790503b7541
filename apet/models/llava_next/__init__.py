"""LLaVA-NeXT (v1.6): AnyRes views through CLIP + MLP projector + Vicuna/Mistral/Yi; ApET per view
(docs/algorithm.md)."""

from apet.models.llava_next.family import LlavaNextFamily
from apet.models.registry import register_family

register_family(LlavaNextFamily())
