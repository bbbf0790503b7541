"""The seeded, randomly initialised tiny LLaVA-1.5 checkpoint (README demo and tests)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from apet.models.shared.clip import CLIP_MEAN, CLIP_STD
from apet.models.shared.tiny import ensure_cached, llama_tokenizer, write_checkpoint

TINY_FORMAT_VERSION = 1
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]


@dataclass(frozen=True)
class TinyLlavaConfig:
    """Shapes of the tiny model: 256 patch tokens (224/14), a 4-layer GQA Llama."""

    image_size: int = 224
    patch_size: int = 14
    vision_hidden: int = 64
    vision_layers: int = 3
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 160
    vocab_target: int = 512
    max_positions: int = 1024
    init_std: float = 0.25  # large enough that generations depend on image and prompt


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained offline, with Llama-style BOS handling and the ``<image>`` token."""
    return llama_tokenizer(vocab_size, SPECIAL_TOKENS, {"image_token": "<image>"})


def _build(path: Path, seed: int, cfg: TinyLlavaConfig) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = build_tokenizer(cfg.vocab_target)
    vocab = len(tokenizer)
    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                       num_key_value_heads=cfg.text_kv_heads, vocab_size=vocab,
                       max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       initializer_range=cfg.init_std, tie_word_embeddings=False)
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
