"""A family's torch half as one declaration: which adapter class loads its checkpoints, which configs give
random weights at real sizes, which function makes the tiny checkpoint, which module is its vision graph.
``Family.torch_half()`` (apet/models/family.py) imports the family's package under :mod:`apet.adapters` and
asks its ``HALF``; a new family writes these few lines instead of five functions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from apet.modeling.adapter import VisionLanguageAdapter

Selector = Callable[[Any], Any]


@dataclass(frozen=True)
class TorchHalf:
    adapter: type  # an HfCheckpointAdapter subclass: load(path, ...) and random_init(config, ...)
    shapes_config: Callable[[str], Any]  # a `*-shapes` name -> the Hugging Face config at real sizes
    ensure_tiny: Callable[[], Path]  # the cached seeded tiny checkpoint, created on first use
    stages: Callable[[VisionLanguageAdapter, Selector], Any]  # (adapter, select) -> the vision graph module
    flops_shape: Callable[..., Any] | None = None  # (adapter, **options) -> apet.contracts.specs.VisionShape

    def load(self, path: Path, *, dtype: Any = None, device: str = "cpu") -> VisionLanguageAdapter:
        return self.adapter.load(path, dtype=dtype, device=device)

    def random_init(self, shape_name: str, *, dtype: Any = None, device: str = "cpu") -> VisionLanguageAdapter:
        return self.adapter.random_init(self.shapes_config(shape_name), dtype=dtype, device=device)

    def tiny_checkpoint(self) -> Path:
        return self.ensure_tiny()

    def vision_stages(self, adapter: VisionLanguageAdapter, select: Selector) -> Any:
        return self.stages(adapter, select)
