"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP ViT + MLP projector + Llama)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from apet.adapters.shared.llava_base import LlavaStyleAdapter, llava_spec
from apet.models.llava.templates import DEFAULT_IMAGE_FIT, DEFAULT_TEMPLATE, PROMPT_TEMPLATES
from apet.models.shared.clip import processor_settings, recipe_from_settings
from apet.models.shared.options import IMAGE_FITS


class LlavaAdapter(LlavaStyleAdapter):
    family = "llava"
    prompt_templates = PROMPT_TEMPLATES
    image_fits = IMAGE_FITS
    model_class = "LlavaForConditionalGeneration"

    @classmethod
    def wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "LlavaAdapter":
        vision = model.config.vision_config
        recipe = recipe_from_settings(processor_settings(source_dir), vision.image_size, DEFAULT_IMAGE_FIT)
        spec = llava_spec(cls.family, model.config, source, processor=recipe.to_json(),
                          template=(DEFAULT_TEMPLATE, PROMPT_TEMPLATES[DEFAULT_TEMPLATE]), extra={})
        return cls(model, spec, source_dir)
