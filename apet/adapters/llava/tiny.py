"""The seeded, randomly initialised tiny LLaVA-1.5 checkpoint (README demo and tests)."""

from __future__ import annotations

import os
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

TinyLlavaConfig = TinyClipLlama  # 256 patch tokens (224/14), a 4-layer GQA Llama


def _build(path: Path, seed: int, cfg: TinyLlavaConfig) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = llama_tokenizer(cfg.vocab_target)
    vision, text = clip_llama_configs(cfg, tokenizer)
    config = LlavaConfig(vision_config=vision, text_config=text,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                         projector_hidden_act="gelu", vision_feature_select_strategy="default",
                         vision_feature_layer=-2, image_seq_length=(cfg.image_size // cfg.patch_size) ** 2)
    config.initializer_range = cfg.init_std
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)


def create_tiny_llava(path: str | os.PathLike, seed: int = 0, config: TinyLlavaConfig = TinyLlavaConfig()) -> Path:
    """Write a loadable tiny LLaVA checkpoint to ``path`` (atomically) and return it."""
    return write_checkpoint(path, lambda scratch: _build(scratch, seed, config),
                            f"seed={seed} format={TINY_FORMAT_VERSION}")


def ensure_tiny_llava(seed: int = 0) -> Path:
    """The cached tiny checkpoint for ``seed``, created on first use."""
    return ensure_cached(f"tiny-llava-seed{seed}-v{TINY_FORMAT_VERSION}", lambda p: create_tiny_llava(p, seed))
