"""Qwen2.5-VL at run time (torch-free): images -> patches and window bookkeeping; kept tokens -> one visual
span per prompt with M-RoPE positions of the full sequence gathered at the kept tokens.

Images of one patch grid share a vision run (the graph's batch dim); a batch of different sizes
becomes several runs, concatenated in request order (:class:`~apet.models.family.VisionInputs`).
Positions follow Hugging Face's ``get_rope_index`` on the uncompressed prompt, then keep only the
kept visual tokens' entries (the authors gather, they do not renumber), so text after the image
stays at start + max(H, W) even when most of the image was removed; decode continues at the last
prompt position + 1 in all three dimensions, as ``generate`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from apet.media.images import load_image
from apet.models.family import Layout, Processor, VisionInputs
from apet.models.prompt import check_context, prompt_encoder, single_span_layout
from apet.models.qwen2_5_vl.geometry import mrope_positions, window_layout
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, preprocess


@dataclass(frozen=True)
class ImageInfo:
    grid: tuple[int, int]  # 14-px patch rows, columns
    patches: np.ndarray  # [P, 1176] float32 (kept for the Hugging Face baseline's inputs)

    @property
    def tokens(self) -> int:
        return self.grid[0] * self.grid[1] // 4


class QwenProcessor(Processor):
    def __init__(self, artifact_dir: Path | None, manifest: Any) -> None:
        super().__init__(artifact_dir, manifest)
        self.recipe = QwenImageRecipe.from_json(manifest.model.processor)
        self.encoder = prompt_encoder(artifact_dir, manifest.model)

    def vision_inputs(self, media: Sequence[Any]) -> VisionInputs:
        infos = []
        for item in media:
            patches, grid = preprocess(load_image(item), self.recipe)
            infos.append(ImageInfo(grid, patches))
        runs: list[dict[str, np.ndarray]] = []
        start = 0
        while start < len(infos):  # consecutive images of one grid share a run
            end = start + 1
            while end < len(infos) and infos[end].grid == infos[start].grid:
                end += 1
            runs.append({"pixel_values": np.stack([i.patches for i in infos[start:end]]),
                         **self.grid_arrays(infos[start].grid)})
            start = end
        return VisionInputs(runs[0], items=len(infos), meta=infos, runs=runs)

    def grid_arrays(self, grid: tuple[int, int]) -> dict[str, np.ndarray]:
        """The vision graph's integer inputs for one patch grid: patch positions and the window bookkeeping
        (a family with the same processor and another ViT overrides this)."""
        return window_layout(*grid, self.recipe).arrays()

    def check_prompts(self, prompts: Sequence[str], max_new_tokens: int) -> None:
        """Text alone must fit; the visual span is checked once the image's budget is known (layout)."""
        for prompt in prompts:
            before, after = self.encoder.split(prompt)
            check_context(len(before) + len(after), 0, max_new_tokens, self.manifest.max_context)

    def layout(self, prompts: Sequence[str], inputs: VisionInputs, keep_index: Any, max_new_tokens: int) -> Layout:
        kept = [np.asarray(row, dtype=np.int64) for row in keep_index]
        image_id = self.manifest.model.image_token_id
        spans, offset = [], 0
        for row in kept:
            spans.append((np.arange(offset, offset + len(row)), np.full(len(row), image_id)))
            offset += len(row)
        layout = single_span_layout(self.encoder, prompts, spans, self.manifest.max_context, max_new_tokens)
        batch, length = layout.token_ids.shape
        positions = np.zeros((3, batch, length), dtype=np.int64)  # pads at 0, as get_rope_index leaves them
        for b, (info, row) in enumerate(zip(inputs.meta, kept)):
            pad = length - layout.prompt_lengths[b]
            before = int(layout.image_start[b]) - pad
            after = layout.prompt_lengths[b] - before - len(row)
            positions[:, b, pad:] = mrope_positions(before, info.grid, after, row, self.recipe)
        layout.positions = positions
        return layout

    def decode_positions(self, layout: Layout, attention_mask: np.ndarray) -> np.ndarray:
        """[3, B, 1]: the last prompt position + the tokens generated since (the fixed rope delta of HF)."""
        steps = attention_mask.shape[1] - layout.token_ids.shape[1]
        return layout.positions[:, :, -1:] + steps
