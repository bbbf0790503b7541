"""Seeded, randomly initialised tiny LLaVA checkpoints, written as real Hugging Face directories.

They exercise every loading path of the product (config, safetensors weights,
tokenizer.json, processor config) with no network, fast enough for a laptop
CPU: the README demo and the tests run on them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

TINY_FORMAT_VERSION = 1
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_WORDS = (
    "the a an of to in on at with for from by is are was were be been this that these those it its there here "
    "what which who where when why how describe image picture photo show shows showing see seen look looks "
    "cat cats dog dogs bird car cars bus truck bike person people man woman child children boy girl tree trees "
    "house building street road sky cloud clouds sun water river sea beach mountain grass field flower flowers "
    "table chair bed room window door wall floor kitchen food plate cup bottle phone computer book sign text "
    "red green blue yellow white black brown gray orange pink purple color colors large small big little tall "
    "short left right top bottom front back middle near far inside outside up down over under next behind "
    "one two three four five many some all no yes not and or but so very more most less count number "
    "sitting standing walking running playing eating holding wearing riding driving flying lying looking "
    "answer question please briefly detail details detailed scene object objects animal animals vehicle "
    "USER ASSISTANT : . , ? ! ' \" ( ) - 0 1 2 3 4 5 6 7 8 9"
).split()


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


def _corpus() -> list[str]:
    """A deterministic corpus for the BPE trainer: the word list in many short sentences."""
    lines = []
    for i in range(len(_WORDS)):
        window = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(9)]
        lines.append(" ".join(window))
        lines.append(f"USER: <image>\n{' '.join(window[:5])}? ASSISTANT: {' '.join(window[5:])}.")
    return lines


def build_tokenizer(vocab_size: int):
    """A byte-level BPE trained offline on the corpus above, with Llama-style BOS handling."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left", model_max_length=1024)


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
        image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3, do_convert_rgb=True)
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=cfg.patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    processor.save_pretrained(path)
    (path / "APET_TINY").write_text(f"seed={seed} format={TINY_FORMAT_VERSION}\n")


def create_tiny_llava(path: str | os.PathLike, seed: int = 0, config: TinyLlavaConfig = TinyLlavaConfig()) -> Path:
    """Write a loadable tiny LLaVA checkpoint to ``path`` (atomically) and return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        _build(scratch, seed, config)
        if path.exists():
            shutil.rmtree(path)
        scratch.rename(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def cache_dir() -> Path:
    """The user cache for generated checkpoints (``$APET_CACHE`` or ``$XDG_CACHE_HOME/apet``)."""
    root = os.environ.get("APET_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "apet"
    return Path(root)


def ensure_tiny_llava(seed: int = 0) -> Path:
    """The cached tiny checkpoint for ``seed``, created on first use."""
    path = cache_dir() / f"tiny-llava-seed{seed}-v{TINY_FORMAT_VERSION}"
    if not (path / "APET_TINY").is_file():
        log.info("creating the tiny LLaVA checkpoint in %s", path)
        create_tiny_llava(path, seed)
    return path
