"""Video-LLaVA: LanguageBind video and image towers (CLIP ViT-L/14 at 224 px) + MLP projector + Vicuna; ApET
per frame on the projected features, CLS kept aside (docs/algorithm.md)."""

from apet.models.registry import register_family
from apet.models.video_llava.family import VideoLlavaFamily

register_family(VideoLlavaFamily())
