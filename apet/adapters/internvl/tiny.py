"""The seeded, randomly initialised tiny InternVL checkpoint (``--model tiny-internvl``, tests).

The real geometry — 448-px tiles of 14-px patches, 0.5 pixel shuffle, 256 tokens per view, ImageNet mean and
std — with a 2-layer, 32-wide InternViT and a 4-layer Qwen3 (GQA, q/k norm: InternVL3.5's language model; the
``qwen2`` variant, InternVL3's, has q/k/v bias instead); at most 6 tiles per image (7 views with the
thumbnail) keeps CPU tests fast. Saved with ``save_pretrained`` (model, tokenizer, the PIL
``GotOcr2ImageProcessor``; ``InternVLProcessor``'s own files beside them) so tests load it the way users load the
hub checkpoints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from apet.adapters.shared.tiny import chatml_tokenizer, ensure_cached, write_checkpoint
from apet.models.internvl.preprocess import IMAGENET_MEAN, IMAGENET_STD

TINY_FORMAT_VERSION = 1
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# the -hf checkpoints' chat template, with the image placeholder transformers 5 expands (<IMG_CONTEXT>)
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)
# the chat turn, and "word" runs: apet-bench's synthetic prompts are "word word ..." sized at one token per word
CORPUS_TEMPLATE = ("<|im_start|>user\n<img><IMG_CONTEXT></img>\n{q}?<|im_end|>\n<|im_start|>assistant\n{a}.<|im_end|>",
                   "word word {q} word word word")


@dataclass(frozen=True)
class TinyInternVLConfig:
    text_model: str = "qwen3"  # qwen3: InternVL3.5 (q/k norm); qwen2: InternVL3 (q/k/v bias)
    tile: int = 448
    patch: int = 14
    vision_hidden: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    vision_intermediate: int = 64
    text_hidden: int = 64
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    head_dim: int = 16
    text_intermediate: int = 160
    max_tiles: int = 6
    vocab_target: int = 512
    max_positions: int = 8192
    init_std: float = 0.25  # large enough that generations depend on image and prompt
    qk_norm_scale: float = 3.0  # q/k norm weights ~ 3·(1 + 0.5·N(0, 1)): sharp enough attention (ditto)


def build_tokenizer(vocab_size: int):
    """A byte-level BPE with ChatML's and InternVL's special tokens, no BOS, and the image/video token names
    ``InternVLProcessor`` reads from the tokenizer."""
    return chatml_tokenizer(vocab_size, SPECIAL_TOKENS, CORPUS_TEMPLATE, CHAT_TEMPLATE,
                            {"start_image_token": "<img>", "end_image_token": "</img>",
                             "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})


def _text_config(cfg: TinyInternVLConfig, tokenizer, eos: int, pad: int) -> dict:
    common = dict(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                  num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                  num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tokenizer), rms_norm_eps=1e-6,
                  max_position_embeddings=cfg.max_positions, initializer_range=cfg.init_std,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, bos_token_id=None,
                  eos_token_id=eos, pad_token_id=pad, tie_word_embeddings=False)
    if cfg.text_model == "qwen3":
        return {"model_type": "qwen3", "head_dim": cfg.head_dim, **common}
    if cfg.text_model == "qwen2":
        return {"model_type": "qwen2", **common}
    raise ValueError(f"text_model {cfg.text_model!r}: use qwen3 or qwen2")


def _build(path: Path, seed: int, cfg: TinyInternVLConfig) -> None:
    from transformers import GenerationConfig, InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tokenizer = build_tokenizer(cfg.vocab_target)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    eos, pad = ids["<|im_end|>"], ids["<|endoftext|>"]
    vision = dict(hidden_size=cfg.vision_hidden, num_hidden_layers=cfg.vision_layers,
                  num_attention_heads=cfg.vision_heads, intermediate_size=cfg.vision_intermediate,
                  image_size=[cfg.tile, cfg.tile], patch_size=[cfg.patch, cfg.patch], attention_bias=True,
                  use_qk_norm=False, norm_type="layer_norm", use_mean_pooling=True, initializer_range=cfg.init_std)
    config = InternVLConfig(vision_config=vision, text_config=_text_config(cfg, tokenizer, eos, pad),
                            image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=(cfg.tile // cfg.patch // 2) ** 2,
                            downsample_ratio=0.5, projector_hidden_act="gelu", vision_feature_layer=-1,
                            vision_feature_select_strategy="default", tie_word_embeddings=False)
    config.initializer_range = cfg.init_std
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    embeddings = model.model.vision_tower.embeddings
    with torch.no_grad():  # Hugging Face initialises these to zeros: identical patches would give identical tokens
        embeddings.position_embeddings.normal_(std=cfg.init_std)
        embeddings.cls_token.normal_(std=cfg.init_std)
        for layer in model.model.language_model.layers:  # unit q/k norms leave random attention near uniform
            for norm in (getattr(layer.self_attn, "q_norm", None), getattr(layer.self_attn, "k_norm", None)):
                if norm is not None:
                    norm.weight.copy_(cfg.qk_norm_scale * (1 + 0.5 * torch.randn_like(norm.weight)))
    model.generation_config = GenerationConfig(eos_token_id=[eos, pad], pad_token_id=pad, do_sample=False)
    model.save_pretrained(path, safe_serialization=True)
    # the hub processors say crop_to_patches false; InternVLProcessor turns it on for every call
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": cfg.tile, "width": cfg.tile}, crop_to_patches=False, min_patches=1,
        max_patches=cfg.max_tiles, do_resize=True, resample=3, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), do_convert_rgb=True)
    image_processor.save_pretrained(path)
    tokenizer.save_pretrained(path)
    # what InternVLProcessor.save_pretrained writes besides those (constructing one needs torchvision for its
    # video processor, which the CPU test environment does not install)
    (path / "processor_config.json").write_text(json.dumps(
        {"processor_class": "InternVLProcessor", "image_seq_length": config.image_seq_length}, indent=2) + "\n")
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def create_tiny_internvl(path: str | os.PathLike, seed: int = 0,
                         config: TinyInternVLConfig = TinyInternVLConfig()) -> Path:
    """Write a loadable tiny InternVL checkpoint to ``path`` (atomically) and return it."""
    return write_checkpoint(path, lambda scratch: _build(scratch, seed, config),
                            f"seed={seed} format={TINY_FORMAT_VERSION} text={config.text_model}")


def ensure_tiny_internvl(seed: int = 0) -> Path:
    """The cached tiny checkpoint for ``seed`` (Qwen3 decoder), created on first use."""
    return ensure_cached(f"tiny-internvl-seed{seed}-v{TINY_FORMAT_VERSION}", lambda p: create_tiny_internvl(p, seed))
