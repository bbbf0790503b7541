"""Adapter for Hugging Face ``InternVLForConditionalGeneration`` (InternViT + 0.5 pixel shuffle + MLP projector +
Qwen2.5 / Qwen3): InternVL3 and InternVL3.5 ``-hf`` checkpoints."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from apet.adapters.shared.hf_model import HfCheckpointAdapter
from apet.contracts.specs import ModelSpec
from apet.errors import UsageError
from apet.modeling.adapter import describe_decoder
from apet.models.internvl.family import AFTER, BEFORE
from apet.models.internvl.preprocess import TileRecipe, recipe_from_settings
from apet.models.internvl.templates import IMAGE_PLACEHOLDER, PROMPT_TEMPLATES, prompt_template
from apet.models.shared.clip import processor_settings
from apet.models.shared.hf_files import chatml_eos_ids, special_token_ids

log = logging.getLogger(__name__)

FAMILY = "internvl"


def tokens_per_view(config: Any) -> tuple[int, int]:
    """(tokens per view, pixel-shuffle factor): (image / patch)² patches, shuffled by 1/downsample_ratio per side."""
    vision = config.vision_config
    side = int(vision.image_size[0]) // int(vision.patch_size[0])
    factor = round(1 / float(config.downsample_ratio))
    if side % factor or abs(factor * float(config.downsample_ratio) - 1) > 1e-6:
        raise UsageError(f"downsample_ratio {config.downsample_ratio} does not divide the {side}x{side} patch grid",
                         "InternVL checkpoints use 0.5 on 448-px tiles of 14-px patches")
    return (side // factor) ** 2, factor


class InternVLAdapter(HfCheckpointAdapter):
    family = FAMILY
    prompt_templates = PROMPT_TEMPLATES
    model_class = "InternVLForConditionalGeneration"
    checkpoint_name = "InternVL"

    @classmethod
    def wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "InternVLAdapter":
        config = model.config
        vision, text = config.vision_config, config.text_config
        if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
            raise UsageError(f"{source}: vision_feature_select_strategy={config.vision_feature_select_strategy!r} / "
                             f"layer={config.vision_feature_layer!r} is unsupported",
                             "InternVL checkpoints use one feature layer with 'default' (CLS dropped)")
        if tuple(vision.image_size)[0] != tuple(vision.image_size)[1]:
            raise UsageError(f"{source}: non-square tiles {tuple(vision.image_size)} are unsupported",
                             "InternVL checkpoints use square 448-px tiles")
        n_tokens, factor = tokens_per_view(config)
        recipe = recipe_from_settings(processor_settings(source_dir), int(vision.image_size[0]))
        if recipe.tile != int(vision.image_size[0]):
            raise UsageError(f"{source}: the image processor's {recipe.tile}-px tiles do not match the vision "
                             f"tower's {vision.image_size[0]} px", "use the processor files saved with the checkpoint")
        template, name = prompt_template(source_dir)
        ids = special_token_ids(source_dir, ["<|endoftext|>", "<img>", "</img>"])
        grid = int(n_tokens ** 0.5)
        spec = ModelSpec(
            family=FAMILY, source=source, n_tokens=n_tokens, patch_grid=(grid, grid),
            vision_dim=text.hidden_size, image_token_id=int(config.image_token_id), bos_token_id=None,
            eos_token_ids=chatml_eos_ids(text.eos_token_id, source_dir, (151645,)),
            pad_token_id=ids.get("<|endoftext|>", text.pad_token_id),
            prompt_template=template, prompt_template_name=name, image_placeholder=IMAGE_PLACEHOLDER,
            decoder=describe_decoder(text), processor=recipe.to_json(),
            extra={"vision_feature_layer": int(config.vision_feature_layer), "shuffle_factor": factor,
                   "apet_at": AFTER, "text_model_type": str(getattr(text, "model_type", ""))},
        )
        return cls(model, spec, source_dir)

    # -- export options (apet.models.internvl.family.OPTIONS) ------------------------------------------
    def set_apet_at(self, where: str) -> None:
        """ApET on the projector's output (the LLM space, ``vision_dim`` = the LLM width) or on its input (the
        pixel-shuffled ViT features, 4x the ViT width; the projector then runs on the kept tokens only)."""
        if where not in (AFTER, BEFORE):
            raise UsageError(f"--apet-at {where!r} is unknown", f"use {AFTER} or {BEFORE}")
        config = self.model.config
        dim = config.text_config.hidden_size if where == AFTER else \
            config.vision_config.hidden_size * self.spec.extra["shuffle_factor"] ** 2
        self.spec = replace(self.spec, vision_dim=int(dim), extra={**self.spec.extra, "apet_at": where})

    def set_max_tiles(self, max_tiles: int) -> None:
        """At most ``max_tiles`` tiles per image (plus the thumbnail): smaller vision profiles and contexts, at the
        price of coarser tiles for images the checkpoint would cut more finely."""
        recipe = TileRecipe.from_json(self.spec.processor)
        if not recipe.min_tiles <= max_tiles <= recipe.checkpoint_max_tiles:
            raise UsageError(f"--max-tiles {max_tiles} is outside [{recipe.min_tiles}, "
                             f"{recipe.checkpoint_max_tiles}] for this checkpoint (its processor's min/max patches)",
                             f"pass --max-tiles between {recipe.min_tiles} and {recipe.checkpoint_max_tiles} "
                             f"(default {recipe.checkpoint_max_tiles})")
        self.spec = replace(self.spec, processor=recipe.with_max_tiles(max_tiles).to_json())

    # -- vision ------------------------------------------------------------------------------------
    def vision_tower(self) -> nn.Module:
        return self._inner().vision_tower

    def projector(self) -> nn.Module:
        return self._inner().multi_modal_projector
