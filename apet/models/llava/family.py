"""LLaVA-1.5 (``LlavaForConditionalGeneration``): facts and factories of the family (torch-free import)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from apet.models.family import Family, Processor
from apet.models.shared.options import image_fit_option, prompt_template_option

if TYPE_CHECKING:
    from apet.manifest import Manifest


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    aliases = {"llava": "llava-hf/llava-1.5-7b-hf", "llava-13b": "llava-hf/llava-1.5-13b-hf"}
    shapes = ("llava-shapes", "llava-13b-shapes")
    tiny = "tiny"
    stage1_placement = "mask"
    export_options = (
        image_fit_option("default pad, the original LLaVA-1.5's"),
        prompt_template_option("vicuna_v1 = the authors' evaluation prompt, default; hf = "
                               "'USER: <image>\\n{prompt} ASSISTANT:'"),
    )

    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor:
        from apet.models.llava.processor import LlavaProcessor

        return LlavaProcessor(artifact_dir, manifest)

    def max_visual_tokens(self, manifest: "Manifest") -> int:
        return manifest.visual_tokens

    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        return {"batch": (1, 1, max_batch)}
