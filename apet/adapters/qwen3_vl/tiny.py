"""The seeded, randomly initialised tiny Qwen3-VL checkpoint (tests, ``--model tiny-qwen3-vl``).

A real Hugging Face directory, written as Qwen2.5-VL's tiny one is (:mod:`apet.adapters.qwen2_5_vl.tiny`): config +
safetensors through ``save_pretrained``, a byte-level BPE tokenizer with Qwen's special tokens and Qwen3-VL's chat
template through the tokenizer's ``save_pretrained``, and the processor files of transformers 5's layout (nested
``processor_config.json`` + ``chat_template.jinja``, written directly: the processor class needs torchvision for
its video half). The ViT has 16-px patches, a 16x16 learned position table (interpolated to every grid), and three
DeepStack levels; the LLM is a GQA Qwen3 (q/k norm, no bias) with interleaved M-RoPE and tied embeddings (as the
2B and 4B checkpoints).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from apet.adapters.qwen2_5_vl.tiny import SPECIAL_TOKENS
from apet.adapters.shared.tiny import chatml_tokenizer, ensure_cached, write_checkpoint

TINY_FORMAT_VERSION = 1
# Qwen3-VL-*-Instruct's chat template (chat_template.json of the hub checkpoints) without its tool-call branches:
# no default system turn, images as <|vision_start|><|image_pad|><|vision_end|> in the user turn
CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}{{- '<|im_start|>system\\n' }}{%- if messages[0].content is string %}"
    "{{- messages[0].content }}{%- else %}{%- for content in messages[0].content %}{%- if 'text' in content %}"
    "{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}{%- if message.role == \"user\" %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for content in message.content %}"
    "{%- if content.type == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}{%- if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif content.type == 'video' or 'video' in content %}{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}<|vision_start|><|video_pad|><|vision_end|>"
    "{%- elif 'text' in content %}{{- content.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == \"assistant\" %}{{- '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{- message.content }}{%- else %}{%- for item in message.content %}"
    "{%- if 'text' in item %}{{- item.text }}{%- endif %}{%- endfor %}{%- endif %}{{- '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CORPUS_TEMPLATE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{q}?<|im_end|>\n"
                   "<|im_start|>assistant\n{a}.<|im_end|>",)
# the tiny processor's own range (Qwen3-VL's published one is 65,536..16,777,216 px = 64..16384 merged tokens):
# 58.6..293 merged tokens of 32x32 px, small images for CPU tests; --pixel-range checkpoint is the family default
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 60_000, 300_000


@dataclass(frozen=True)
class TinyQwen3Config:
    """A 4-block ViT (DeepStack after blocks 0, 1, 2) and a 4-layer GQA Qwen3 with tied embeddings."""

    vision_hidden: int = 32
    vision_depth: int = 4
    vision_heads: int = 2
    vision_intermediate: int = 64
    position_side: int = 16  # the learned position table is side x side
    deepstack: tuple[int, ...] = (0, 1, 2)
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    text_intermediate: int = 160
    mrope_section: tuple[int, int, int] = (4, 2, 2)  # sums to head_dim / 2 = 8, interleaved as Qwen3-VL's (24, 20, 20)
    vocab_target: int = 512
    max_positions: int = 4096
    init_std: float = 0.25  # large enough that generations depend on image and prompt


def build_tokenizer(vocab_size: int):
    """A byte-level BPE with Qwen's special tokens, no BOS, and Qwen3-VL's chat template."""
    return chatml_tokenizer(vocab_size, SPECIAL_TOKENS, CORPUS_TEMPLATE, CHAT_TEMPLATE)


def image_processor_settings() -> dict:
    """Qwen3-VL's preprocessor config (16-px patches, mean/std 0.5) with the tiny range in ``size``, as the hub
    checkpoints declare theirs."""
    return {"do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
            "image_processor_type": "Qwen2VLImageProcessor",
            "merge_size": 2, "patch_size": 16, "resample": 3, "rescale_factor": 1 / 255, "temporal_patch_size": 2,
            "size": {"longest_edge": TINY_MAX_PIXELS, "shortest_edge": TINY_MIN_PIXELS}}


def _build(path: Path, seed: int, cfg: TinyQwen3Config) -> None:
    from transformers import GenerationConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    tokenizer = build_tokenizer(cfg.vocab_target)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    vision = dict(depth=cfg.vision_depth, hidden_size=cfg.vision_hidden, num_heads=cfg.vision_heads,
                  intermediate_size=cfg.vision_intermediate, out_hidden_size=cfg.text_hidden, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=cfg.position_side ** 2,
                  deepstack_visual_indexes=list(cfg.deepstack), hidden_act="gelu_pytorch_tanh",
                  initializer_range=cfg.init_std)
    text = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                num_key_value_heads=cfg.text_kv_heads, head_dim=cfg.head_dim, vocab_size=len(tokenizer),
                rms_norm_eps=1e-6, max_position_embeddings=cfg.max_positions, initializer_range=cfg.init_std,
                rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                                 "mrope_section": list(cfg.mrope_section)},
                bos_token_id=None, eos_token_id=eos[0], pad_token_id=ids["<|endoftext|>"])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                           video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                           vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=True)
    config.initializer_range = cfg.init_std
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    _spread_norms(model, seed)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=ids["<|endoftext|>"], do_sample=False)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "processor_config.json").write_text(json.dumps(
        {"image_processor": image_processor_settings(), "processor_class": "Qwen3VLProcessor"}, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def _spread_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights drawn around 1 instead of all ones, so a missing or misplaced q/k norm, merger norm or final
    norm changes the tokens (a test that compares with Hugging Face then notices)."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                parameter.copy_(1 + 0.5 * torch.randn(parameter.shape, generator=generator))


def create_tiny_qwen3(path: str | os.PathLike, seed: int = 0, config: TinyQwen3Config = TinyQwen3Config()) -> Path:
    """Write a loadable tiny Qwen3-VL checkpoint to ``path`` (atomically) and return it."""
    return write_checkpoint(path, lambda scratch: _build(scratch, seed, config),
                            f"seed={seed} format={TINY_FORMAT_VERSION}")


def ensure_tiny_qwen3(seed: int = 0) -> Path:
    """The cached tiny checkpoint for ``seed``, created on first use."""
    return ensure_cached(f"tiny-qwen3-vl-seed{seed}-v{TINY_FORMAT_VERSION}", lambda p: create_tiny_qwen3(p, seed))
