"""Qwen2.5-VL's chat prompt: rendered once at export from the checkpoint's own chat template.

The deployed runtime formats prompts with ``str.format``, so the checkpoint's Jinja chat template
(``chat_template.jinja``, ``chat_template.json`` of older hub checkpoints, or ``tokenizer_config.json``'s
``chat_template``) is rendered at export for one user turn holding the image and a sentinel text,
with the generation prompt, and the sentinel becomes ``{prompt}``. The default template adds the
system turn "You are a helpful assistant.", which is also what the authors' evaluation passes.
"""

from __future__ import annotations

from pathlib import Path

from apet.errors import ArtifactError
from apet.models.shared.hf_files import chat_template_source

IMAGE_PLACEHOLDER = "<|image_pad|>"
# Qwen2.5-VL-*-Instruct's template rendered for one image + text turn (models without template files)
DEFAULT_TEMPLATE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>{prompt}<|im_end|>\n<|im_start|>assistant\n")
PROMPT_TEMPLATES = {"qwen_chat": DEFAULT_TEMPLATE}
_SENTINEL = "\x00APET_PROMPT\x00"


def render_prompt_template(source: str) -> str:
    """One user turn [image, text] with the generation prompt, as a ``str.format`` template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
    text = env.from_string(source).render(messages=messages, add_generation_prompt=True)
    if text.count(_SENTINEL) != 1 or text.count(IMAGE_PLACEHOLDER) != 1:
        raise ArtifactError("the checkpoint's chat template does not render one image and one text",
                            "pass --prompt-template qwen_chat")
    return text.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{prompt}")


def prompt_template(path: Path | None) -> tuple[str, str]:
    """(template, name): the checkpoint's chat template rendered, or the built-in Qwen2.5-VL one."""
    source = chat_template_source(path)
    if source is None:
        return DEFAULT_TEMPLATE, "qwen_chat"
    return render_prompt_template(source), "checkpoint"
