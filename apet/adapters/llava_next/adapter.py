"""Adapter for Hugging Face ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / v1.6: AnyRes views through
CLIP ViT + MLP projector + Vicuna / Mistral / Yi, plus the learned ``image_newline`` row)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apet.adapters.shared.llava_base import LlavaStyleAdapter, llava_spec
from apet.errors import UsageError
from apet.models.llava_next.anyres import allowed_pinpoints, fewest_views, most_views
from apet.models.llava_next.processor import NEWLINE
from apet.models.llava_next.templates import PROMPT_TEMPLATES, default_template
from apet.models.shared.clip import processor_settings, recipe_from_settings

log = logging.getLogger(__name__)


def _pinpoints(config: Any, settings: dict[str, Any]) -> list[list[int]]:
    """The model's grid pinpoints (what its AnyRes layout was trained with); the image processor's must agree."""
    pinpoints = [[int(h), int(w)] for h, w in config.image_grid_pinpoints]
    theirs = settings.get("image_grid_pinpoints")
    if theirs is not None and [[int(h), int(w)] for h, w in theirs] != pinpoints:
        log.warning("the image processor's grid pinpoints %s differ from the model's %s; using the model's",
                    theirs, pinpoints)
    return pinpoints


class LlavaNextAdapter(LlavaStyleAdapter):
    family = "llava-next"
    prompt_templates = PROMPT_TEMPLATES
    model_class = "LlavaNextForConditionalGeneration"

    @classmethod
    def wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "LlavaNextAdapter":
        config = model.config
        vision = config.vision_config
        settings = processor_settings(source_dir)
        recipe = recipe_from_settings(settings, vision.image_size, "anyres")
        pinpoints = _pinpoints(config, settings)
        processor = {**recipe.to_json(), "image_grid_pinpoints": pinpoints,
                     "patches_per_side": vision.image_size // vision.patch_size}
        name = default_template(config.text_config, source_dir)
        spec = llava_spec(cls.family, config, source, processor=processor, template=(name, PROMPT_TEMPLATES[name]),
                          extra={"max_views": most_views(pinpoints, recipe.crop_height),
                                 "checkpoint_pinpoints": pinpoints})
        if spec.extra["vision_feature_select_strategy"] != "default":
            raise UsageError("LLaVA-NeXT with vision_feature_select_strategy='full' is unsupported",
                             "the v1.6 checkpoints use 'default' (CLS dropped)")
        return cls(model, spec, source_dir)

    def extra_embeddings(self) -> dict[str, torch.Tensor]:
        return {NEWLINE: self._inner().image_newline}

    def set_max_views(self, max_views: int) -> None:
        """Keep only the grid pinpoints of at most ``max_views`` views (base + tiles): smaller engines and
        contexts, at the price of a coarser grid for images the checkpoint would tile more finely."""
        pinpoints, tile = self.spec.extra["checkpoint_pinpoints"], self.spec.processor["crop_height"]
        smallest, largest = fewest_views(pinpoints, tile), most_views(pinpoints, tile)
        if not smallest <= max_views <= largest:
            raise UsageError(f"--max-views {max_views} is outside [{smallest}, {largest}] for this checkpoint "
                             f"(grid pinpoints {pinpoints}, {tile}-px tiles)",
                             f"pass --max-views between {smallest} and {largest} (default {largest})")
        allowed = allowed_pinpoints(pinpoints, tile, max_views)
        if len(allowed) < len(pinpoints):
            log.warning("--max-views %d drops the grid pinpoints %s: images the checkpoint would tile that finely "
                        "get a coarser grid", max_views, [p for p in pinpoints if p not in allowed])
        self.spec = replace(self.spec, processor={**self.spec.processor, "image_grid_pinpoints": allowed},
                            extra={**self.spec.extra, "max_views": max_views})
