"""LLaVA-NeXT's prompt templates (torch-free).

The authors evaluate llava-v1.6-vicuna with ``--conv-mode vicuna_v1`` (``scripts/llava1_6``): the same
conversation as LLaVA-1.5 (system sentence, then ``USER: <image>\\n{q} ASSISTANT:``), our default for
Vicuna checkpoints. ``hf`` is the Hugging Face model card's Vicuna prompt ("curious human"). The Mistral
and 34B (Nous-Hermes-2-Yi) checkpoints were trained with the authors' ``mistral_instruct`` and
``chatml_direct`` conversations, which the model cards also use; they are those checkpoints' defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from apet.models.llava.templates import VICUNA_V1_SYSTEM

HF_VICUNA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the human's questions.")
PROMPT_TEMPLATES = {
    "vicuna_v1": VICUNA_V1_SYSTEM + " USER: <image>\n{prompt} ASSISTANT:",
    "hf": HF_VICUNA_SYSTEM + " USER: <image>\n{prompt} ASSISTANT:",
    "mistral_instruct": "[INST] <image>\n{prompt} [/INST]",
    "chatml_direct": ("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n{prompt}"
                      "<|im_end|><|im_start|>assistant\n"),
}
DEFAULT_TEMPLATE = "vicuna_v1"


def default_template(text_config: Any, source_dir: Path | None) -> str:
    """The conversation the checkpoint was trained with: Mistral -> mistral_instruct, a ChatML tokenizer
    (34B) -> chatml_direct, otherwise (Vicuna) vicuna_v1."""
    if getattr(text_config, "model_type", "") == "mistral":
        return "mistral_instruct"
    tokenizer = None if source_dir is None else Path(source_dir) / "tokenizer.json"
    if tokenizer is not None and tokenizer.is_file() and "<|im_start|>" in tokenizer.read_text(errors="ignore"):
        return "chatml_direct"
    return DEFAULT_TEMPLATE
