"""What LLaVA-1.5 and LLaVA-NeXT adapters share: the CLIP select layer, the projector and
the Llama-style language model of Hugging Face's ``Llava*ForConditionalGeneration`` classes (torch).

A subclass names its transformers class and builds its :class:`ModelSpec` in ``wrap`` (loading:
:class:`~apet.adapters.shared.hf_model.HfCheckpointAdapter`);
:func:`llava_spec` fills in everything the two families record the same way.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import nn

from apet.adapters.shared.clip_tower import clip_features
from apet.adapters.shared.hf_model import HfCheckpointAdapter
from apet.contracts.specs import ModelSpec
from apet.errors import UsageError
from apet.modeling.adapter import VisionLanguageAdapter, describe_decoder


def feature_settings(config: Any) -> tuple[int, str]:
    """(vision_feature_layer, vision_feature_select_strategy), validated."""
    strategy, layer = config.vision_feature_select_strategy, config.vision_feature_layer
    if strategy not in ("default", "full") or not isinstance(layer, int):
        raise UsageError(f"vision_feature_select_strategy={strategy!r} / layer={layer!r} is unsupported",
                         "LLaVA checkpoints use a single feature layer with 'default' or 'full'")
    return layer, strategy


def llava_spec(family: str, config: Any, source: str, *, processor: dict[str, Any], template: tuple[str, str],
               extra: dict[str, Any]) -> ModelSpec:
    """The spec of a CLIP + projector + Llama-style checkpoint; ``template`` is (name, text)."""
    layer, strategy = feature_settings(config)
    vision, text = config.vision_config, config.text_config
    grid = vision.image_size // vision.patch_size
    eos = text.eos_token_id if text.eos_token_id is not None else 2
    return ModelSpec(
        family=family, source=source, n_tokens=grid * grid + (1 if strategy == "full" else 0),
        patch_grid=(grid, grid), vision_dim=vision.hidden_size, image_token_id=int(config.image_token_index),
        bos_token_id=text.bos_token_id, eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]),
        pad_token_id=text.pad_token_id, prompt_template=template[1], prompt_template_name=template[0],
        image_placeholder="<image>", decoder=describe_decoder(text), processor=processor,
        extra={"vision_feature_layer": layer, "vision_feature_select_strategy": strategy, **extra},
    )


class LlavaStyleAdapter(HfCheckpointAdapter):
    """A loaded ``Llava*ForConditionalGeneration``: CLIP tower, MLP projector, Llama-style decoder."""

    image_fits: ClassVar[tuple[str, ...]] = ()  # --image-fit choices, if the family has any

    def set_image_fit(self, image_fit: str) -> None:
        """``--image-fit``: how an image becomes the CLIP tower's square (:attr:`image_fits`)."""
        if image_fit not in self.image_fits:
            raise UsageError(f"--image-fit {image_fit!r} is not available for {self.family}",
                             f"use one of {', '.join(self.image_fits) or '(none: drop the option)'}")
        self.spec = replace(self.spec, processor={**self.spec.processor, "image_fit": image_fit})

    # -- vision ------------------------------------------------------------------------------------
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

    def lm_head(self) -> nn.Linear:
        return self.model.lm_head if hasattr(self.model, "lm_head") else self.model.language_model.lm_head


def clip_flops_shape(adapter: VisionLanguageAdapter) -> Any:
    """The CLIP tower's shape up to the select layer, for the benchmarks' FLOP and byte counts (per view)."""
    from apet.contracts.specs import VisionShape

    tower = adapter.model.config.vision_config
    select = adapter.spec.extra.get("vision_feature_layer", -1)
    depth = select if select >= 0 else tower.num_hidden_layers + 1 + select
    return VisionShape(tokens=adapter.spec.n_tokens + 1, dim=tower.hidden_size, mlp_dim=tower.intermediate_size,
                       layers=depth, patch=tower.patch_size)
