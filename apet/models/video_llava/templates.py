"""Video-LLaVA's prompt templates and defaults (torch-free).

``llava_v1`` is the conversation the authors evaluate video with (videollava/conversation.py
``conv_llava_v1``, used by eval/video/run_inference_video_qa.py: system sentence, then the frames'
tokens, a newline and the question); the authors write 8 ``<image>`` placeholders, one per frame,
which expand back to back exactly like Hugging Face's single ``<video>`` placeholder does. ``hf`` is
the shorter prompt of the Hugging Face model card.
"""

from __future__ import annotations

LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
VIDEO_PLACEHOLDER = "<video>"
IMAGE_PLACEHOLDER = "<image>"
PROMPT_TEMPLATES = {
    "llava_v1": LLAVA_V1_SYSTEM + " USER: <video>\n{prompt} ASSISTANT:",
    "hf": "USER: <video>\n{prompt} ASSISTANT:",
}
MEDIA = ("video", "image")  # what one artifact can be exported for (apet-export --media)


def templates_for(media: str) -> dict[str, str]:
    """The named templates with the medium's placeholder (the authors' image prompt is the same conversation)."""
    placeholder = VIDEO_PLACEHOLDER if media == "video" else IMAGE_PLACEHOLDER
    return {name: t.replace(VIDEO_PLACEHOLDER, placeholder) for name, t in PROMPT_TEMPLATES.items()}
DEFAULT_TEMPLATE = "llava_v1"
DEFAULT_FRAMES = 8  # the checkpoint's training and evaluation setting
MAX_FRAMES = 64
