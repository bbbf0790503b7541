"""InternVL's vision graph: every view (tile or thumbnail) of every image through InternViT -> 0.5 pixel shuffle
-> [projector] -> ApET stage 1 (each view to K, independently) -> [projector].

The projector (LayerNorm, Linear, GELU, Linear) runs before ApET by default (``--apet-at after-projector``: ApET
sees the LLM-space tokens, as the authors' Qwen2.5-VL merger output) or after it (``before-projector``: ApET
sees the shuffled ViT features and the projector runs on the kept tokens only). The ViT runs its own Hugging
Face layers (so ``--attention op`` reaches them through transformers' attention interface); the embeddings
are written out because the tower's position-embedding interpolation is the identity at the trained tile
size and its bicubic resize would only burden the graph.
"""

from __future__ import annotations

import math

import torch

from apet.modeling.vision import VisionStages
from apet.models.internvl.family import AFTER


def pixel_shuffle(features: torch.Tensor, factor: int) -> torch.Tensor:
    """[V, S·S, C] patch tokens -> [V, (S/f)², f²·C], Hugging Face's ``InternVLModel.pixel_shuffle`` (scale 1/f)
    with the batch left symbolic: each output token concatenates an f x f block, column pairs first."""
    side, channels = math.isqrt(int(features.shape[1])), int(features.shape[2])  # static: fixed tile size
    x = features.reshape(-1, side, side // factor, channels * factor)  # (width, height/f, f·C) in HF's naming
    x = x.permute(0, 2, 1, 3).reshape(-1, side // factor, side // factor, channels * factor * factor)
    return x.permute(0, 2, 1, 3).reshape(-1, (side // factor) ** 2, channels * factor * factor)


class InternVLVisionStages(VisionStages):
    """pixel_values [views, 3, S, S] -> visual_embeds [views, K, H_llm], keep_index [views, K]."""

    input_names = ["pixel_values"]

    def _vit_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The select layer's patch tokens [V, N_patches, D] (CLS dropped, the 'default' strategy)."""
        tower = self.adapter.vision_tower()
        embeddings = tower.embeddings
        conv = embeddings.patch_embeddings.projection
        h = conv(pixel_values.to(conv.weight.dtype)).flatten(2).transpose(1, 2)
        h = torch.cat([embeddings.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        if embeddings.position_embeddings is not None:
            h = h + embeddings.position_embeddings
        layers = tower.encoder.layer
        select = self.adapter.spec.extra["vision_feature_layer"]
        depth = select if select >= 0 else len(layers) + 1 + select
        for layer in layers[:depth]:
            h = layer(h)
        if select == -1:  # Hugging Face takes last_hidden_state (after the tower's final norm, if any)
            h = tower.layernorm(h)
        return h[:, 1:]

    def features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[V, 3, S, S] -> what ApET sees: [V, N, H_llm] (after the projector) or [V, N, 4·D] (before it)."""
        tokens = pixel_shuffle(self._vit_tokens(pixel_values), self.adapter.spec.extra["shuffle_factor"])
        return self.adapter.projector()(tokens) if self._after() else tokens

    def finish(self, tokens: torch.Tensor, index: torch.Tensor, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return (tokens if self._after() else self.adapter.projector()(tokens)), index

    def _after(self) -> bool:
        return self.adapter.spec.extra["apet_at"] == AFTER

    def example_inputs(self, batch: int) -> tuple[torch.Tensor, ...]:
        tile = self.adapter.spec.processor["tile"]
        return (torch.randn(batch, 3, tile, tile, dtype=self.adapter.dtype, device=self.adapter.device),)

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {name: {0: "views"} for name in ("pixel_values", "visual_embeds", "keep_index")}
