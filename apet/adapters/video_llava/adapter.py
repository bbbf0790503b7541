"""Adapter for Hugging Face ``VideoLlavaForConditionalGeneration``: the language side and checkpoint loading
are LLaVA-1.5's; the vision side has two towers with their own weights (video and image) sharing one projector.

As Hugging Face's ``get_video_features`` does, a frame's features are the select layer's hidden states
*with* CLS (257 tokens at 224 px) through the projector; the authors' ``encode_videos`` then sets CLS
aside and runs ApET on the 256 projected patch tokens of each frame.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apet.adapters.llava.adapter import LlavaAdapter
from apet.adapters.shared.clip_tower import clip_features
from apet.contracts.specs import ModelSpec
from apet.errors import UsageError
from apet.modeling.adapter import describe_decoder
from apet.models.shared.clip import processor_settings, recipe_from_settings, video_processor_settings
from apet.models.shared.options import IMAGE_FITS
from apet.models.video_llava.templates import (
    DEFAULT_FRAMES,
    DEFAULT_TEMPLATE,
    IMAGE_PLACEHOLDER,
    MAX_FRAMES,
    MEDIA,
    PROMPT_TEMPLATES,
    VIDEO_PLACEHOLDER,
    templates_for,
)


def checkpoint_frames(config: Any, tokens_per_frame: int) -> int:
    """Frames the checkpoint was configured for: ``video_seq_length`` = frames x (patches + CLS)."""
    length = getattr(config, "video_seq_length", None)
    if isinstance(length, int) and length > 0 and length % tokens_per_frame == 0:
        return length // tokens_per_frame
    return DEFAULT_FRAMES


class VideoLlavaAdapter(LlavaAdapter):
    family = "video-llava"
    prompt_templates = PROMPT_TEMPLATES
    image_fits = ()  # frames are resized on the shortest edge and centre-cropped (authors and HF alike)
    model_class = "VideoLlavaForConditionalGeneration"

    @classmethod
    def wrap(cls, model: nn.Module, source: str, source_dir: Path | None) -> "VideoLlavaAdapter":
        config = model.config
        layer = config.vision_feature_layer
        if not isinstance(layer, int):
            raise UsageError(f"Video-LLaVA vision_feature_layer={layer!r} is unsupported",
                             "Video-LLaVA checkpoints use a single feature layer (-2)")
        vision, text = config.vision_config, config.text_config
        grid = vision.image_size // vision.patch_size
        eos = text.eos_token_id if text.eos_token_id is not None else 2
        recipe = recipe_from_settings(video_processor_settings(source_dir), vision.image_size, "crop")
        spec = ModelSpec(
            family=cls.family, source=source, n_tokens=grid * grid, patch_grid=(grid, grid),
            vision_dim=text.hidden_size,  # ApET sees projected features
            image_token_id=int(config.video_token_index), bos_token_id=text.bos_token_id,
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos]), pad_token_id=text.pad_token_id,
            prompt_template=PROMPT_TEMPLATES[DEFAULT_TEMPLATE], prompt_template_name=DEFAULT_TEMPLATE,
            image_placeholder=VIDEO_PLACEHOLDER, decoder=describe_decoder(text), processor=recipe.to_json(),
            extra={"vision_feature_layer": layer, "media": "video",
                   "frames": checkpoint_frames(config, grid * grid + 1),
                   "image_token_id": int(config.image_token_index), "video_token_id": int(config.video_token_index)},
        )
        return cls(model, spec, source_dir)

    def set_frames(self, frames: int) -> None:
        """``--frames``: T, static per artifact (the vision graph takes [B, T, 3, H, W])."""
        if self.media != "video":
            raise UsageError("--frames applies to video artifacts", "drop --frames, or drop --media image")
        if isinstance(frames, bool) or not isinstance(frames, int) or not 1 <= frames <= MAX_FRAMES:
            raise UsageError(f"--frames {frames!r} is outside the allowed range [1, {MAX_FRAMES}]",
                             f"pass --frames {DEFAULT_FRAMES} (the checkpoint's setting) or another count")
        self.spec = replace(self.spec, extra={**self.spec.extra, "frames": frames})

    def set_media(self, media: str) -> None:
        """``--media image``: an artifact for images through the image tower instead (one artifact serves one
        medium); apply it before ``--frames``, ``--image-fit`` and ``--prompt-template``."""
        if media not in MEDIA:
            raise UsageError(f"--media {media!r} is not available for {self.family}", f"use one of {', '.join(MEDIA)}")
        self.prompt_templates = templates_for(media)
        self.image_fits = () if media == "video" else IMAGE_FITS  # the authors pad images (image_aspect_ratio)
        token = int(self.spec.extra[f"{media}_token_id"])
        settings = video_processor_settings if media == "video" else processor_settings
        recipe = recipe_from_settings(settings(self.source_dir), self.model.config.vision_config.image_size,
                                      "crop" if media == "video" else "pad")
        self.spec = replace(self.spec, image_token_id=token, processor=recipe.to_json(),
                            image_placeholder=VIDEO_PLACEHOLDER if media == "video" else IMAGE_PLACEHOLDER,
                            prompt_template=self.prompt_templates[self.spec.prompt_template_name],
                            extra={**self.spec.extra, "media": media})

    @property
    def media(self) -> str:
        return str(self.spec.extra.get("media", "video"))

    @property
    def frames(self) -> int:
        return int(self.spec.extra["frames"])

    # -- vision ------------------------------------------------------------------------------------
    def video_tower(self) -> nn.Module:
        return self._inner().video_tower

    def image_tower(self) -> nn.Module:
        return self._inner().image_tower

    def vision_tower(self) -> nn.Module:
        return self.video_tower()

    def frame_features(self, frames: torch.Tensor) -> torch.Tensor:
        """[F, 3, H, W] frames -> projected [F, 1 + N, H_llm], CLS first (HF ``get_video_features``)."""
        hidden = clip_features(self.video_tower(), frames.to(self.dtype), self.spec.extra["vision_feature_layer"],
                               "full")
        return self.project(hidden)

    def vision_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] -> [B·T, 1 + N, H_llm]."""
        return self.frame_features(pixel_values.flatten(0, 1))

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected [B, N, H_llm] from the image tower, CLS dropped (HF ``get_image_features``
        with the checkpoint's ``default`` strategy)."""
        strategy = self.model.config.vision_feature_select_strategy
        hidden = clip_features(self.image_tower(), pixel_values.to(self.dtype),
                               self.spec.extra["vision_feature_layer"], strategy)
        return self.project(hidden)
