"""Seeded tiny checkpoints shared machinery: an offline BPE tokenizer, the cache directory, atomic writes.

Every family's tiny checkpoint is a real Hugging Face directory (config, safetensors weights,
tokenizer.json, processor config) so tests exercise the loading paths users take, with no network.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)

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


def corpus(template_lines: Sequence[str] = ("USER: <image>\n{q}? ASSISTANT: {a}.",)) -> list[str]:
    """A deterministic corpus for the BPE trainer: the word list in many short sentences and templates."""
    lines = []
    for i in range(len(_WORDS)):
        window = [_WORDS[(i * 7 + j * 13) % len(_WORDS)] for j in range(9)]
        lines.append(" ".join(window))
        for template in template_lines:
            lines.append(template.format(q=" ".join(window[:5]), a=" ".join(window[5:])))
    return lines


def train_bpe(vocab_size: int, special_tokens: Sequence[str], lines: Sequence[str]):
    """A byte-level BPE (``tokenizers.Tokenizer``) trained offline on ``lines``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(lines), trainer=trainer)
    return tok


LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")


def llama_tokenizer(vocab_size: int, special_tokens: Sequence[str] = LLAMA_SPECIAL_TOKENS,
                    template_lines: Sequence[str] | None = None, media_tokens: dict[str, str] | None = None):
    """A byte-level BPE trained offline, wrapped as a fast tokenizer with Llama-style BOS handling, left padding
    and the family's media placeholders (``media_tokens``, default ``{"image_token": "<image>"}``) — the tiny
    LLaVA-family checkpoints."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab_size, special_tokens, corpus() if template_lines is None else corpus(template_lines))
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    media = dict(media_tokens or {"image_token": "<image>"})
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens=media, padding_side="left",
                                   model_max_length=1024)


def chatml_tokenizer(vocab_size: int, special_tokens: Sequence[str], template_lines: Sequence[str],
                     chat_template: str, extra_special_tokens: dict[str, str] | None = None):
    """A byte-level BPE trained offline, wrapped as a fast tokenizer the way ChatML checkpoints ship theirs (Qwen,
    InternVL): no BOS, <|im_end|> ends an answer, <|endoftext|> pads on the left, the family's chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe(vocab_size, special_tokens, corpus(template_lines))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, padding_side="left", model_max_length=32768,
                                   chat_template=chat_template, **({"extra_special_tokens": extra_special_tokens}
                                                                   if extra_special_tokens else {}))


@dataclass(frozen=True)
class TinyClipLlama:
    """Shapes of a tiny CLIP + Llama model (the LLaVA family's tiny checkpoints): a 3-layer ViT and a 4-layer
    GQA Llama; weights drawn with a large std so generations depend on image and prompt."""

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
    init_std: float = 0.25


def clip_llama_configs(cfg: TinyClipLlama, tokenizer: Any) -> tuple[Any, Any]:
    """(CLIPVisionConfig, LlamaConfig) of ``cfg`` for a tokenizer from :func:`llama_tokenizer`."""
    from transformers import CLIPVisionConfig, LlamaConfig

    vision = CLIPVisionConfig(hidden_size=cfg.vision_hidden, intermediate_size=4 * cfg.vision_hidden,
                              num_hidden_layers=cfg.vision_layers, num_attention_heads=cfg.vision_heads,
                              image_size=cfg.image_size, patch_size=cfg.patch_size, projection_dim=cfg.vision_hidden)
    text = LlamaConfig(hidden_size=cfg.text_hidden, intermediate_size=cfg.text_intermediate,
                       num_hidden_layers=cfg.text_layers, num_attention_heads=cfg.text_heads,
                       num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tokenizer),
                       max_position_embeddings=cfg.max_positions, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       initializer_range=cfg.init_std, tie_word_embeddings=False)
    return vision, text


def cache_dir() -> Path:
    """The user cache for generated checkpoints (``$APET_CACHE`` or ``$XDG_CACHE_HOME/apet``)."""
    root = os.environ.get("APET_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "apet"
    return Path(root)


MARKER = "APET_TINY"


def write_checkpoint(path: str | os.PathLike, build: Callable[[Path], None], stamp: str) -> Path:
    """Run ``build(scratch)`` in a scratch directory next to ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}-"))
    try:
        build(scratch)
        (scratch / MARKER).write_text(stamp + "\n")
        if path.exists():
            shutil.rmtree(path)
        scratch.rename(path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def ensure_cached(name: str, create: Callable[[Path], Path]) -> Path:
    """The cached checkpoint ``name`` under :func:`cache_dir`, created on first use."""
    path = cache_dir() / name
    if not (path / MARKER).is_file():
        log.info("creating the tiny checkpoint %s", path)
        create(path)
    return path
