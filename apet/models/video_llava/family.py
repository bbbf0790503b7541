"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): facts and factories of the family (torch-free import)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from apet.models.family import Family, FamilyOption, Processor
from apet.models.shared.options import image_fit_option, prompt_template_option
from apet.models.video_llava.templates import DEFAULT_FRAMES, MEDIA

if TYPE_CHECKING:
    from apet.manifest import Manifest


class VideoLlavaFamily(Family):
    name = "video-llava"
    model_types = ("video_llava",)
    aliases = {"video-llava": "LanguageBind/Video-LLaVA-7B-hf"}
    shapes = ("video-llava-shapes",)
    tiny = "tiny-video-llava"
    media = "video"
    stage1_placement = "append"  # [error-selected, descending error] + [basis, FPS order], per frame
    max_stages = 1  # the authors compress video once, at the projector output
    export_options = (  # in the order they apply: the medium decides which frames, fits and templates exist
        FamilyOption("--media", "the medium this artifact serves (one artifact, one medium)", choices=MEDIA,
                     detail="video, default; image = its image tower"),
        FamilyOption("--frames", "frames sampled per video, static per artifact", kind=int,
                     detail=f"default: the checkpoint's, {DEFAULT_FRAMES}"),
        image_fit_option("--media image only; default pad, the authors'"),
        prompt_template_option("llava_v1 = the authors' conversation, default; hf = the model card's"),
    )

    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor:
        from apet.models.video_llava.processor import VideoLlavaProcessor

        return VideoLlavaProcessor(artifact_dir, manifest)

    def media_of(self, manifest: "Manifest") -> str:
        return str(manifest.model.extra.get("media", "video"))

    def max_visual_tokens(self, manifest: "Manifest") -> int:
        """Video: T frames x (CLS + K1 kept patch tokens), 8 x 33 = 264 at the paper's budget; image: K1."""
        if self.media_of(manifest) == "image":
            return manifest.visual_tokens
        return int(manifest.model.extra["frames"]) * (manifest.visual_tokens + 1)

    def visual_summary(self, manifest: "Manifest") -> str:
        """Video tokens are per video (every frame keeps its CLS beside the K1 kept patch tokens)."""
        if self.media_of(manifest) == "image":
            return super().visual_summary(manifest)
        frames, kept = int(manifest.model.extra["frames"]), manifest.visual_tokens
        return f"{self.max_visual_tokens(manifest)} per video: {frames} frames x {kept + 1} (CLS + {kept} kept)"

    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        return {"batch": (1, 1, max_batch)}

    def vision_passes(self, manifest: "Manifest") -> int:
        return 1 if self.media_of(manifest) == "image" else int(manifest.model.extra["frames"])

    def synthetic_media(self, manifest: "Manifest", rng: np.random.Generator, size: tuple[int, int]) -> Any:
        if self.media_of(manifest) == "image":
            return super().synthetic_media(manifest, rng, size)
        width, height = size
        return rng.integers(0, 255, (int(manifest.model.extra["frames"]), height, width, 3), dtype=np.uint8)
