"""LLaVA-1.5's prompt templates and preprocessing default (torch-free).

``vicuna_v1`` is the conversation the original LLaVA-1.5 was trained and evaluated with
(llava/conversation.py ``conv_vicuna_v1``: system sentence, then ``USER: <image>\\n{q} ASSISTANT:``),
the authors' evaluation prompt and our default; ``hf`` is the shorter one of the Hugging Face model cards.
"""

from __future__ import annotations

VICUNA_V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                    "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PROMPT_TEMPLATES = {
    "vicuna_v1": VICUNA_V1_SYSTEM + " USER: <image>\n{prompt} ASSISTANT:",
    "hf": "USER: <image>\n{prompt} ASSISTANT:",
}
DEFAULT_TEMPLATE = "vicuna_v1"
DEFAULT_IMAGE_FIT = "pad"  # the original LLaVA-1.5's image_aspect_ratio
