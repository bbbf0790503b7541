"""InternVL's chat prompt: rendered once at export from the checkpoint's own chat template.

The ``-hf`` checkpoints' template is ChatML without a system turn; an image is one placeholder
(``<IMG_CONTEXT>``, older conversions wrote ``<image>``) which ``InternVLProcessor`` expands to
``<img>`` + 256 ``<IMG_CONTEXT>`` per tile + ``</img>``. The deployed runtime formats prompts with
``str.format``, so the template is rendered at export for one user turn [image, text] with the generation
prompt; the placeholder becomes ``<img><IMG_CONTEXT></img>`` (the runtime puts every tile's kept tokens in
place of the one ``<IMG_CONTEXT>``) and the text ``{prompt}``.
"""

from __future__ import annotations

from pathlib import Path

from apet.errors import ArtifactError
from apet.models.shared.hf_files import chat_template_source

IMAGE_PLACEHOLDER = "<IMG_CONTEXT>"
START_IMAGE, END_IMAGE = "<img>", "</img>"
IMAGE_SPAN = START_IMAGE + IMAGE_PLACEHOLDER + END_IMAGE
_PLACEHOLDERS = (IMAGE_PLACEHOLDER, "<image>")
# the -hf checkpoints' template rendered for one image + text turn (models without template files)
DEFAULT_TEMPLATE = f"<|im_start|>user\n{IMAGE_SPAN}\n{{prompt}}<|im_end|>\n<|im_start|>assistant\n"
PROMPT_TEMPLATES = {"internvl_chat": DEFAULT_TEMPLATE}
_SENTINEL = "\x00APET_PROMPT\x00"


def render_prompt_template(source: str) -> str:
    """One user turn [image, text] with the generation prompt, as a ``str.format`` template."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": _SENTINEL}]}]
    text = env.from_string(source).render(messages=messages, add_generation_prompt=True)
    found = [p for p in _PLACEHOLDERS if text.count(p) == 1]
    if text.count(_SENTINEL) != 1 or len(found) != 1 or START_IMAGE in text:
        raise ArtifactError("the checkpoint's chat template does not render one image and one text",
                            "pass --prompt-template internvl_chat")
    text = text.replace(found[0], IMAGE_SPAN)
    return text.replace("{", "{{").replace("}", "}}").replace(_SENTINEL, "{prompt}")


def prompt_template(path: Path | None) -> tuple[str, str]:
    """(template, name): the checkpoint's chat template rendered, or the built-in one."""
    source = chat_template_source(path)
    if source is None:
        return DEFAULT_TEMPLATE, "internvl_chat"
    return render_prompt_template(source), "checkpoint"
