"""The seeded, randomly initialised tiny Video-LLaVA checkpoint (README demo and tests).

Transformers' ``VideoLlavaProcessor`` cannot be saved or loaded without torchvision (its video
processor needs it), so the processor files are written as ``save_pretrained`` would write them: a
nested ``processor_config.json`` with ``image_processor`` and ``video_processor`` sections.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from apet.adapters.shared.tiny import (
    TinyClipLlama,
    clip_llama_configs,
    ensure_cached,
    llama_tokenizer,
    write_checkpoint,
)
from apet.models.shared.clip import CLIP_MEAN, CLIP_STD

TINY_FORMAT_VERSION = 1
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>"]
TEMPLATES = ("USER: <video>\n{q}? ASSISTANT: {a}.", "USER: <image>\n{q}? ASSISTANT: {a}.")


@dataclass(frozen=True)
class TinyVideoLlavaConfig(TinyClipLlama):
    """The tiny CLIP + Llama shapes with 8 frames of 256 patch tokens + CLS (224/14)."""

    frames: int = 8
    max_positions: int = 4096  # 8 x 257 uncompressed frame tokens + a prompt


def _processor_files(path: Path, cfg: TinyVideoLlavaConfig) -> None:
    clip = {"do_resize": True, "size": {"shortest_edge": cfg.image_size}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": cfg.image_size, "width": cfg.image_size}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(CLIP_MEAN),
            "image_std": list(CLIP_STD), "do_convert_rgb": True}
    config = {"processor_class": "VideoLlavaProcessor", "patch_size": cfg.patch_size,
              "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1,
              "image_processor": {"image_processor_type": "VideoLlavaImageProcessor", **clip},
              "video_processor": {"video_processor_type": "VideoLlavaVideoProcessor", **clip,
                                  "do_sample_frames": False}}
    (path / "processor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _build(path: Path, seed: int, cfg: TinyVideoLlavaConfig) -> None:
    from transformers import VideoLlavaConfig, VideoLlavaForConditionalGeneration

    tokenizer = llama_tokenizer(cfg.vocab_target, SPECIAL_TOKENS, template_lines=TEMPLATES,
                                media_tokens={"image_token": "<image>", "video_token": "<video>"})
    vision, text = clip_llama_configs(cfg, tokenizer)
    patches = (cfg.image_size // cfg.patch_size) ** 2
    config = VideoLlavaConfig(vision_config=vision, text_config=text,
                              image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                              video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                              projector_hidden_act="gelu", vision_feature_select_strategy="default",
                              vision_feature_layer=-2, image_seq_length=patches,
                              video_seq_length=cfg.frames * (patches + 1))
    config.initializer_range = cfg.init_std
    torch.manual_seed(seed)
    model = VideoLlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    _processor_files(path, cfg)


def create_tiny_video_llava(path: str | os.PathLike, seed: int = 0,
                            config: TinyVideoLlavaConfig = TinyVideoLlavaConfig()) -> Path:
    """Write a loadable tiny Video-LLaVA checkpoint to ``path`` (atomically) and return it."""
    return write_checkpoint(path, lambda scratch: _build(scratch, seed, config),
                            f"seed={seed} format={TINY_FORMAT_VERSION}")


def ensure_tiny_video_llava(seed: int = 0) -> Path:
    """The cached tiny checkpoint for ``seed``, created on first use."""
    return ensure_cached(f"tiny-video-llava-seed{seed}-v{TINY_FORMAT_VERSION}",
                         lambda p: create_tiny_video_llava(p, seed))
