"""Qwen3-VL's vision graph: patches -> ViT (learned positions interpolated to the grid + 2-D rotary, full attention
per image) -> 2x2 merger and the DeepStack mergers -> ApET stage 1 on the merger's output -> the visual tokens and
the DeepStack levels of the same kept rows.

One run takes images of one patch grid (the batch dim), as Qwen2.5-VL's (:class:`QwenVisionStages`, whose rotary
tables and attention this reuses; there are no windows here). The learned position table is interpolated inside the
graph from each patch's (row, column): bilinear with aligned corners, the taps and weights Hugging Face's
``get_vision_interpolation_indices_and_weights`` computes, so the host sends integers only.

The three scopes keep the generic one-tensor protocol: ``features`` returns the merger's output and the L DeepStack
levels side by side, [B, N, (1+L)·H]; ``apet_stage1`` selects on the first H channels and forms the kept rows of all
channels with the stage's :class:`~apet.compression.Assignment` (``--deepstack merge``: every level's rows formed as
the main tokens', dropped tokens averaged into the kept token they merged into and the basis slots blended; ``gather``:
the kept rows only; a selection rule without an assignment, e.g. apet-eval's baselines, gathers); ``finish`` splits
them into ``visual_embeds`` [B, K, H] and ``injected_embeds`` [L, B·K, H] (rows in ``visual_embeds``' order).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from apet.adapters.qwen2_5_vl.vision import QwenVisionStages, Rotary
from apet.compression import Assignment, Compressed, gather_tokens
from apet.contracts.io import INJECTED_DIM, INJECTED_EMBEDS, vision_output_names
from apet.graph_ops import take
from apet.modeling.fast_path import fast_tower
from apet.modeling.scope import Scope
from apet.models.qwen2_5_vl.geometry import patch_positions


def merge_patches(merger: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``Qwen3VLVisionPatchMerger`` on [B, P, C] patches in merge-block order -> [B, P/4, H]: LayerNorm per patch
    (the main merger) or per 2x2 block (``use_postshuffle_norm``, the DeepStack mergers), then the MLP."""
    batch = h.shape[0]
    if merger.use_postshuffle_norm:
        x = merger.norm(h.reshape(batch, -1, merger.hidden_size))
    else:
        x = merger.norm(h).reshape(batch, -1, merger.hidden_size)
    return merger.linear_fc2(merger.act_fn(merger.linear_fc1(x)))


class Qwen3VisionStages(QwenVisionStages):
    input_names = ["pixel_values", "patch_positions"]
    output_names = vision_output_names(injected=True)

    def __init__(self, adapter, select) -> None:
        super().__init__(adapter, select)
        self.rule = select
        self.apet_stage1 = Scope(self._select)  # ApET on the main tokens, its assignment on the levels

    @property
    def levels(self) -> list[int]:
        return list(self.adapter.spec.extra["deepstack_visual_indexes"])

    @property
    def hidden(self) -> int:
        return int(self.adapter.spec.vision_dim)

    def _positions(self, patch_positions: torch.Tensor) -> torch.Tensor:
        """The learned [side², C] position table resampled to the image's grid, [P, C] float32 (bilinear, aligned
        corners, edge taps clamped): row and column map to src = i·(side-1)/(size-1), the taps floor and floor+1
        weigh 1-|src-tap|."""
        vit = self._vit()
        table = vit.pos_embed.weight
        side = int(vit.num_grid_per_side)
        size = patch_positions.amax(0) + 1  # (rows, columns) of the grid: one grid per run
        src = patch_positions.to(torch.float32) * (side - 1) / torch.clamp(size - 1, min=1).to(torch.float32)
        floor = torch.floor(src)
        near = floor.long()
        taps = (near, (near + 1).clamp(max=side - 1))
        distance = src - floor
        weights = ((1 - distance.abs()).clamp(min=0), (1 - (distance - 1).abs()).clamp(min=0))
        out = None
        for i in range(2):
            for j in range(2):
                index = taps[i][:, 0] * side + taps[j][:, 1]
                term = table[index].to(torch.float32) * (weights[i][:, 0] * weights[j][:, 1]).unsqueeze(-1)
                out = term if out is None else out + term
        assert out is not None
        return out

    def features(self, pixel_values: torch.Tensor, patch_positions: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """[B, P, 1536] patches of B same-grid images -> [B, P/4, (1+L)·H]: the merger's output, then the L
        DeepStack levels (block ``deepstack_visual_indexes[l]``'s output through its merger)."""
        vit = self._vit()
        dtype = self.adapter.dtype
        proj = vit.patch_embed.proj  # Conv3d with stride = kernel: a linear map of each patch
        h = pixel_values.to(dtype) @ proj.weight.reshape(proj.weight.shape[0], -1).t() + proj.bias
        h = h + self._positions(patch_positions).to(dtype)
        rotary = Rotary.of(*self._rotary(patch_positions), fused=fast_tower(h))  # full attention: flash, no mask
        levels = []
        for i, block in enumerate(vit.blocks):
            h = h + self._attention(block, block.norm1(h), rotary, None)
            h = h + block.mlp(block.norm2(h))
            if i in self.levels:
                levels.append(merge_patches(vit.deepstack_merger_list[self.levels.index(i)], h))
        return torch.cat([merge_patches(vit.merger, h), *levels], dim=-1)

    def fast_linears(self) -> list[tuple[nn.Module, tuple[str, ...]]]:
        return []  # fc1 -> GELU -> fc2: nothing to concatenate (q/k/v is one linear already)

    def _assigned(self, tokens: torch.Tensor) -> tuple[Compressed, Assignment | None]:
        assigned = getattr(self.rule, "assigned", None)
        return assigned(tokens) if assigned is not None else (self.rule(tokens), None)

    def _select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ApET on the merger's output; the DeepStack levels' rows formed with its assignment (docs/algorithm.md).
        Merging, the assignment forms the rows of all channels at once (the main tokens' rows are the stage's
        own), so the levels cost no node of their own; channel ranges are Gathers, not Slices."""
        width = int(x.shape[-1])
        kept, assignment = self._assigned(take(x, -1, 0, self.hidden))
        if assignment is not None and self.adapter.spec.extra.get("deepstack", "merge") == "merge":
            return assignment.apply(x), kept.index
        rows = gather_tokens(take(x, -1, self.hidden, width), kept.index)
        return torch.cat([kept.tokens, rows.to(kept.tokens.dtype)], dim=-1), kept.index

    def finish(self, tokens: torch.Tensor, index: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden, levels = self.hidden, len(self.levels)
        injected = tokens[..., hidden:].reshape(tokens.shape[0], -1, levels, hidden).permute(2, 0, 1, 3)
        return tokens[..., :hidden], index, injected.reshape(levels, -1, hidden)

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        recipe = self.adapter.recipe()
        tokens = recipe.min_tokens  # the smallest image's
        side = max(1, math.isqrt(tokens))
        rows, cols = side * recipe.merge_size, -(-tokens // side) * recipe.merge_size
        device = self.adapter.device
        pixels = torch.randn(batch, rows * cols, recipe.patch_dim, dtype=self.adapter.dtype, device=device)
        return pixels, torch.from_numpy(patch_positions(rows, cols, recipe.merge_size)).to(device)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        kept = {0: "batch"} if self.fixed_keep is not None else {0: "batch", 1: "kept"}  # K per image or fixed
        return {"pixel_values": {0: "batch", 1: "patches"}, "patch_positions": {0: "patches"},
                "visual_embeds": kept, "keep_index": kept, INJECTED_EMBEDS: {1: INJECTED_DIM}}
