"""Qwen3-VL's chat prompt: the checkpoint's own chat template rendered at export, as for Qwen2.5-VL
(:mod:`apet.models.qwen2_5_vl.templates` renders it); the built-in one is Qwen3-VL-*-Instruct's template rendered
for one image + text turn, which, unlike Qwen2.5-VL's, adds no system turn."""

from __future__ import annotations

from pathlib import Path

from apet.models.qwen2_5_vl.templates import IMAGE_PLACEHOLDER, render_prompt_template
from apet.models.shared.hf_files import chat_template_source

__all__ = ["DEFAULT_TEMPLATE", "IMAGE_PLACEHOLDER", "PROMPT_TEMPLATES", "prompt_template"]

DEFAULT_TEMPLATE = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n"
                    "<|im_start|>assistant\n")
PROMPT_TEMPLATES = {"qwen3_chat": DEFAULT_TEMPLATE}


def prompt_template(path: Path | None) -> tuple[str, str]:
    """(template, name): the checkpoint's chat template rendered, or the built-in Qwen3-VL one."""
    source = chat_template_source(path)
    if source is None:
        return DEFAULT_TEMPLATE, "qwen3_chat"
    return render_prompt_template(source), "checkpoint"
