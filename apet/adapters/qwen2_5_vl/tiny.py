"""The seeded, randomly initialised tiny Qwen2.5-VL checkpoint (README demo and tests).

A real Hugging Face directory: config + safetensors, a byte-level BPE tokenizer with Qwen's special
tokens and chat template, and the processor files ``save_pretrained`` of transformers 5 writes
(nested ``processor_config.json`` + ``chat_template.jinja``; the processor itself cannot be built
without torchvision, so the files are written directly). The ViT has window attention and two
full-attention blocks; the LLM is a GQA Qwen2 with q/k/v bias and M-RoPE.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from apet.adapters.shared.tiny import chatml_tokenizer, ensure_cached, write_checkpoint
from apet.models.shared.clip import CLIP_MEAN, CLIP_STD

TINY_FORMAT_VERSION = 2  # 2: the processor's own pixel range (--pixel-range checkpoint)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# Qwen2.5-VL-*-Instruct's chat template (chat_template.json of the hub checkpoints)
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
CORPUS_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                   "<|image_pad|><|vision_end|>{q}?<|im_end|>\n<|im_start|>assistant\n{a}.<|im_end|>",)


@dataclass(frozen=True)
class TinyQwenConfig:
    """A 4-block ViT (blocks 1 and 3 full attention, the others 112-px windows) and a 4-layer GQA Qwen2."""

    vision_hidden: int = 32
    vision_depth: int = 4
    vision_heads: int = 2
    vision_intermediate: int = 64
    fullatt_blocks: tuple[int, ...] = (1, 3)
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    text_intermediate: int = 160
    mrope_section: tuple[int, int, int] = (2, 3, 3)  # sums to head_dim / 2 = 8
    vocab_target: int = 512
    max_positions: int = 4096
    init_std: float = 0.25  # large enough that generations depend on image and prompt


def build_tokenizer(vocab_size: int):
    """A byte-level BPE with Qwen's special tokens, no BOS, and the chat template."""
    return chatml_tokenizer(vocab_size, SPECIAL_TOKENS, CORPUS_TEMPLATE, CHAT_TEMPLATE)


# the tiny processor's own range, unlike both the authors' (256..2048 merged tokens) and the hub checkpoints'
# (4..16384), and not whole tokens (127.55..1020.4 of 28x28 px), so --pixel-range checkpoint is observable
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 100_000, 800_000


def _image_processor_settings() -> dict:
    return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "image_processor_type": "Qwen2VLImageProcessor",
            "merge_size": 2, "patch_size": 14, "resample": 3, "rescale_factor": 1 / 255, "temporal_patch_size": 2,
            "min_pixels": TINY_MIN_PIXELS, "max_pixels": TINY_MAX_PIXELS,
            "size": {"longest_edge": TINY_MAX_PIXELS, "shortest_edge": TINY_MIN_PIXELS}}


def _build(path: Path, seed: int, cfg: TinyQwenConfig) -> None:
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_tokenizer(cfg.vocab_target)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, num_heads=cfg.vision_heads,
                  intermediate_size=cfg.vision_intermediate, out_hidden_size=cfg.text_hidden,
                  fullatt_block_indexes=list(cfg.fullatt_blocks), window_size=112, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, tokens_per_second=2, hidden_act="silu",
                  initializer_range=cfg.init_std)
    text = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tokenizer), rms_norm_eps=1e-6,
                max_position_embeddings=cfg.max_positions, initializer_range=cfg.init_std,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                 "mrope_section": list(cfg.mrope_section)},
                bos_token_id=None, eos_token_id=eos[0], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False)
    config.initializer_range = cfg.init_std
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"], do_sample=False)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(
        {"image_processor": _image_processor_settings(), "processor_class": "Qwen2_5_VLProcessor"}, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def create_tiny_qwen(path: str | os.PathLike, seed: int = 0, config: TinyQwenConfig = TinyQwenConfig()) -> Path:
    """Write a loadable tiny Qwen2.5-VL checkpoint to ``path`` (atomically) and return it."""
    return write_checkpoint(path, lambda scratch: _build(scratch, seed, config),
                            f"seed={seed} format={TINY_FORMAT_VERSION}")


def ensure_tiny_qwen(seed: int = 0) -> Path:
    """The cached tiny checkpoint for ``seed``, created on first use."""
    return ensure_cached(f"tiny-qwen2.5-vl-seed{seed}-v{TINY_FORMAT_VERSION}", lambda p: create_tiny_qwen(p, seed))
