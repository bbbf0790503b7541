"""LLaVA-1.5 (``LlavaForConditionalGeneration``): facts and factories of the family (torch-free import)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from apet.models.family import Family, Processor, Selector

if TYPE_CHECKING:
    from apet.manifest import Manifest
    from apet.models.adapter import VisionLanguageAdapter


class LlavaFamily(Family):
    name = "llava"
    model_types = ("llava",)
    aliases = {"llava": "llava-hf/llava-1.5-7b-hf", "llava-13b": "llava-hf/llava-1.5-13b-hf"}
    shapes = ("llava-shapes", "llava-13b-shapes")
    tiny = "tiny"
    stage1_placement = "mask"

    def load(self, path: Path, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
        from apet.models.llava.adapter import LlavaAdapter

        return LlavaAdapter.load(path, dtype=dtype, device=device)

    def random_init(self, shape_name: str, *, dtype: Any, device: str) -> "VisionLanguageAdapter":
        from apet.models.llava.adapter import LlavaAdapter
        from apet.models.llava.shapes import shapes_config

        return LlavaAdapter.random_init(shapes_config(shape_name), dtype=dtype, device=device)

    def tiny_checkpoint(self) -> Path:
        from apet.models.llava.tiny import ensure_tiny_llava

        return ensure_tiny_llava()

    def vision_stages(self, adapter: "VisionLanguageAdapter", select: Selector) -> Any:
        from apet.models.llava.vision import LlavaVisionStages

        return LlavaVisionStages(adapter, select)

    def processor(self, artifact_dir: Path | None, manifest: "Manifest") -> Processor:
        from apet.models.llava.processor import LlavaProcessor

        return LlavaProcessor(artifact_dir, manifest)

    def max_visual_tokens(self, manifest: "Manifest") -> int:
        return manifest.visual_tokens

    def vision_dims(self, manifest: "Manifest", max_batch: int) -> dict[str, tuple[int, int, int]]:
        return {"batch": (1, 1, max_batch)}

    def vision_flops_shape(self, adapter: "VisionLanguageAdapter") -> Any:
        from apet.models.shared.llava_base import clip_flops_shape

        return clip_flops_shape(adapter)
