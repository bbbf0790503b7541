"""The seeded, randomly initialised tiny LLaVA-NeXT checkpoint (``--model tiny-llava-next``, tests).

112-px views of 16x16 patch tokens (7-px patches) and the v1.6 grid pinpoints scaled from 336-px to 112-px
tiles (1x2, 2x1, 2x2, 3x1, 1x3 tiles), so an image becomes 3 to 5 views and CPU tests stay fast. 256 tokens
per view (as the tiny LLaVA) give the README's budgets room: ``--ratio 0.11`` keeps K1 = 40 per view and
K2 = 16, both above the 10 basis tokens (with 64 tokens per view K1 would be 8).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
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

TINY_FORMAT_VERSION = 2  # 2: 16x16 tokens per view (was 8x8)


@dataclass(frozen=True)
class TinyLlavaNextConfig(TinyClipLlama):
    image_size: int = 112
    patch_size: int = 7
    max_positions: int = 2048  # up to 5 views x 256 tokens + 32 newlines at ratio 1.0
    pinpoints: tuple[tuple[int, int], ...] = field(
        default=((112, 224), (224, 112), (224, 224), (336, 112), (112, 336)))


def _build(path: Path, seed: int, cfg: TinyLlavaNextConfig) -> None:
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = llama_tokenizer(cfg.vocab_target)
    tokenizer.model_max_length = cfg.max_positions  # Hugging Face's processor expands every visual token
    vision, text = clip_llama_configs(cfg, tokenizer)
    pinpoints = [list(p) for p in cfg.pinpoints]
    config = LlavaNextConfig(vision_config=vision, text_config=text,
                             image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                             projector_hidden_act="gelu", vision_feature_select_strategy="default",
                             vision_feature_layer=-2, image_grid_pinpoints=pinpoints,
                             image_seq_length=(cfg.image_size // cfg.patch_size) ** 2)
    config.initializer_range = cfg.init_std
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    model.save_pretrained(path, safe_serialization=True)

    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": cfg.image_size}, crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_grid_pinpoints=pinpoints, do_resize=True, do_center_crop=True, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
        resample=3, do_convert_rgb=True, do_pad=True)
    # num_additional_image_tokens=1: CLIP's CLS, which the 'default' strategy drops (the processor's default of 0
    # makes Hugging Face's image-token count one short)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)


def create_tiny_llava_next(path: str | os.PathLike, seed: int = 0,
                           config: TinyLlavaNextConfig = TinyLlavaNextConfig()) -> Path:
    """Write a loadable tiny LLaVA-NeXT checkpoint to ``path`` (atomically) and return it."""
    return write_checkpoint(path, lambda scratch: _build(scratch, seed, config),
                            f"seed={seed} format={TINY_FORMAT_VERSION}")


def ensure_tiny_llava_next(seed: int = 0) -> Path:
    """The cached tiny checkpoint for ``seed``, created on first use."""
    return ensure_cached(f"tiny-llava-next-seed{seed}-v{TINY_FORMAT_VERSION}",
                         lambda p: create_tiny_llava_next(p, seed))
