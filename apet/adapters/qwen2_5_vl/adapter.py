"""Adapter for Hugging Face ``Qwen2_5_VLForConditionalGeneration`` (window-attention ViT + 2x2 merger + Qwen2
with M-RoPE)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apet.adapters.shared.hf_model import HfCheckpointAdapter
from apet.contracts.specs import DecoderSpec, ModelSpec
from apet.errors import UsageError
from apet.modeling.adapter import describe_decoder
from apet.models.qwen2_5_vl.pixel_range import CHECKPOINT
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, processor_settings, recipe_from_settings
from apet.models.qwen2_5_vl.templates import IMAGE_PLACEHOLDER, PROMPT_TEMPLATES, prompt_template
from apet.models.shared.hf_files import chatml_eos_ids, special_token_ids

log = logging.getLogger(__name__)

FAMILY = "qwen2_5_vl"


class QwenAdapter(HfCheckpointAdapter):
    """Qwen2.5-VL; also the base of Qwen3-VL, which overrides the hooks below (its recipe, decoder, extra facts)."""

    family = FAMILY
    prompt_templates = PROMPT_TEMPLATES
    model_class = "Qwen2_5_VLForConditionalGeneration"
    checkpoint_name = "Qwen2.5-VL"
    read_prompt_template = staticmethod(prompt_template)  # checkpoint dir -> (template, name)
    default_mrope_section: tuple[int, ...] = (16, 24, 24)
    no_processor_files = "uses Hugging Face's defaults"  # what --pixel-range checkpoint means without them

    @classmethod
    def wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "QwenAdapter":
        config = model.config
        vision, text = config.vision_config, config.text_config
        recipe = cls.image_recipe(config, source_dir, source=source)
        if recipe.patch_size != vision.patch_size or recipe.merge_size != vision.spatial_merge_size or \
                recipe.temporal_patch_size != vision.temporal_patch_size:
            raise UsageError(f"{source}: the image processor's patch geometry does not match the vision config",
                             "use the processor files saved with the checkpoint")
        template, name = cls.read_prompt_template(source_dir)
        pad = special_token_ids(source_dir, ["<|endoftext|>"]).get("<|endoftext|>", text.pad_token_id)
        spec = ModelSpec(
            family=cls.family, source=source, n_tokens=recipe.max_tokens, patch_grid=(0, 0),  # dynamic resolution
            vision_dim=vision.out_hidden_size, image_token_id=int(config.image_token_id), bos_token_id=None,
            eos_token_ids=chatml_eos_ids(text.eos_token_id, source_dir, (151645, 151643)), pad_token_id=pad,
            prompt_template=template, prompt_template_name=name, image_placeholder=IMAGE_PLACEHOLDER,
            decoder=cls.decoder_spec(config), processor=recipe.to_json(),
            extra={"vision_start_token_id": int(config.vision_start_token_id),
                   "mrope_section": [int(s) for s in cls._mrope_section(text)], **cls.family_extra(config)},
        )
        return cls(model, spec, source_dir)

    # -- what the Qwen families differ in --------------------------------------------------------------
    @classmethod
    def image_recipe(cls, config: Any, source_dir: Path | None, pixel_range: str | None = None,
                     source: str = "the checkpoint") -> QwenImageRecipe:
        """The image recipe of the checkpoint's processor files; ``pixel_range`` None: the family's default."""
        settings, window = processor_settings(source_dir), config.vision_config.window_size
        if pixel_range is None:
            return recipe_from_settings(settings, window, source=source)
        return recipe_from_settings(settings, window, pixel_range, source=source)

    @classmethod
    def decoder_spec(cls, config: Any) -> DecoderSpec:
        return describe_decoder(config.text_config, position_rank=3)

    @classmethod
    def family_extra(cls, config: Any) -> dict[str, Any]:
        """The family's own facts in ``model.extra`` besides the vision-start token and the M-RoPE sections."""
        return {"fullatt_block_indexes": [int(i) for i in config.vision_config.fullatt_block_indexes]}

    @classmethod
    def _mrope_section(cls, text: Any) -> list[int]:
        rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
        return list(rope.get("mrope_section", cls.default_mrope_section))

    def set_pixel_range(self, pixel_range: str) -> None:
        """Image sizes from ``--pixel-range`` (parsed): the recipe's pixel bounds and the most merged tokens one
        image can have (``n_tokens``, which the compression plan and the profiles are sized from)."""
        recipe = self.image_recipe(self.model.config, self.source_dir, pixel_range, source=self.spec.source)
        if pixel_range == CHECKPOINT and self.source_dir is None:
            log.info("%s has no processor files: --pixel-range checkpoint %s", self.spec.source,
                     self.no_processor_files)
        self.spec = replace(self.spec, processor=recipe.to_json(), n_tokens=recipe.max_tokens)
        log.info("%s images: %s", self.checkpoint_name, recipe.range_summary())

    def fit_budget(self, plan: Any) -> None:
        """A fixed budget (--tokens K) needs every image to have at least K merged tokens: raise min_pixels."""
        stage1 = plan.stage1
        if stage1.per_image and stage1.keep_ratio is None:
            recipe = QwenImageRecipe.from_json(self.spec.processor).with_min_tokens(stage1.keep)
            self.spec = replace(self.spec, processor=recipe.to_json())

    # -- vision ------------------------------------------------------------------------------------
    def visual(self) -> nn.Module:
        """The ViT (patch embed, rotary, blocks, merger)."""
        inner = self._inner()
        return inner.visual if hasattr(inner, "visual") else self.model.visual

    # -- language ----------------------------------------------------------------------------------
    def hf_position_embeddings(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Any:
        return self._language_model().rotary_emb(hidden, position_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M-RoPE: cos/sin of the temporal, height and width positions [3, B, T], each owning its
        ``mrope_section`` of the frequencies, merged to [B, T, head_dim]. Transformers 5 merges inside the
        rotary module; older versions return [3, B, T, head_dim] and merge in the attention."""
        cos, sin = self.hf_position_embeddings(hidden, position_ids)
        if cos.dim() == 4:
            cos, sin = self._merge_sections(cos), self._merge_sections(sin)
        return cos, sin

    def _merge_sections(self, table: torch.Tensor) -> torch.Tensor:
        sections = list(self.spec.extra["mrope_section"]) * 2
        parts = table.split(sections, dim=-1)
        return torch.cat([part[i % 3] for i, part in enumerate(parts)], dim=-1)
