"""Adapter for Hugging Face ``LlavaForConditionalGeneration`` (LLaVA-1.5: CLIP ViT + MLP projector + Llama)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from apet.contracts.specs import ModelSpec
from apet.errors import UsageError
from apet.models.adapter import VisionLanguageAdapter, describe_decoder
from apet.models.llava.templates import DEFAULT_IMAGE_FIT, DEFAULT_TEMPLATE, PROMPT_TEMPLATES
from apet.models.shared.clip import IMAGE_FITS, processor_settings, recipe_from_settings
from apet.models.shared.clip_tower import clip_features
from apet.models.shared.hf_files import copy_text_assets, read_json, require_safetensors

log = logging.getLogger(__name__)


class LlavaAdapter(VisionLanguageAdapter):
    family = "llava"
    prompt_templates = PROMPT_TEMPLATES
    image_fits = IMAGE_FITS
    model_class = "LlavaForConditionalGeneration"

    @classmethod
    def load(cls, path: Path, *, dtype: torch.dtype = torch.float32, device: str = "cpu") -> "LlavaAdapter":
        import transformers

        path = Path(path)
        model_type = read_json(path / "config.json").get("model_type")
        if model_type != cls.family.replace("-", "_"):
            raise UsageError(f"{path} holds a {model_type!r} checkpoint, not {cls.family}",
                             f"pass a {cls.family} checkpoint directory")
        require_safetensors(path)
        model = getattr(transformers, cls.model_class).from_pretrained(path, dtype=dtype, use_safetensors=True)
        return cls.wrap(model.to(device).eval(), source=str(path), source_dir=path)

    @classmethod
    def random_init(cls, config: Any, *, dtype: torch.dtype, device: str) -> "LlavaAdapter":
        import transformers

        with torch.device(device):
            model = getattr(transformers, cls.model_class)._from_config(config, dtype=dtype)
        return cls.wrap(model.eval(), source="random-init", source_dir=None)

    @classmethod
    def wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "LlavaAdapter":
        config = model.config
        strategy = config.vision_feature_select_strategy
        layer = config.vision_feature_layer
        if strategy not in ("default", "full") or not isinstance(layer, int):
            raise UsageError(f"LLaVA vision_feature_select_strategy={strategy!r} / layer={layer!r} is unsupported",
                             "LLaVA checkpoints use a single feature layer with 'default' or 'full'")
        vision, text = config.vision_config, config.text_config
        grid = vision.image_size // vision.patch_size
        eos = text.eos_token_id if text.eos_token_id is not None else 2
        recipe = recipe_from_settings(processor_settings(source_dir), vision.image_size, DEFAULT_IMAGE_FIT)
        spec = ModelSpec(
            family=cls.family, source=source, n_tokens=grid * grid + (1 if strategy == "full" else 0),
            patch_grid=(grid, grid), vision_dim=vision.hidden_size, image_token_id=int(config.image_token_index),
            bos_token_id=text.bos_token_id, eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
            pad_token_id=text.pad_token_id, prompt_template=PROMPT_TEMPLATES[DEFAULT_TEMPLATE],
            prompt_template_name=DEFAULT_TEMPLATE, image_placeholder="<image>",
            decoder=describe_decoder(text), processor=recipe.to_json(),
            extra={"vision_feature_layer": layer, "vision_feature_select_strategy": strategy},
        )
        return cls(model, spec, source_dir)

    # -- vision ------------------------------------------------------------------------------------
    def _inner(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "model") else self.model

    def vision_tower(self) -> nn.Module:
        return self._inner().vision_tower

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, N, D_vision]: the select layer's patch tokens (CLS removed for 'default')."""
        extra = self.spec.extra
        return clip_features(self.vision_tower(), pixel_values.to(self.dtype), extra["vision_feature_layer"],
                             extra["vision_feature_select_strategy"])

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """[B, K, D_vision] -> [B, K, H_llm]; per token, so it may run after compression."""
        return self._inner().multi_modal_projector(features)

    # -- language ----------------------------------------------------------------------------------
    def _language_model(self) -> nn.Module:
        return self.model.model.language_model if hasattr(self.model, "model") else self.model.language_model.model

    def decoder_layers(self) -> Sequence[nn.Module]:
        return list(self._language_model().layers)

    def final_norm(self) -> nn.Module:
        return self._language_model().norm

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head if hasattr(self.model, "lm_head") else self.model.language_model.lm_head

    def embed_tokens(self) -> nn.Embedding:
        return self._language_model().embed_tokens

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._language_model().rotary_emb(hidden, position_ids)

    # -- text assets -------------------------------------------------------------------------------
    def save_text_assets(self, out_dir: Path) -> list[str]:
        return copy_text_assets(self.source_dir, out_dir)
