"""The calibration data AWQ consumes: the LLM's input embeddings of a few image+prompt pairs (built by
:mod:`apet.export.calibration`, exactly as the deployed pipeline builds them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class CalibrationSample:
    embeds: torch.Tensor  # [1, T, H] the LLM's input
    mask: torch.Tensor  # [1, T]
    positions: torch.Tensor  # [1, T] or [3, 1, T]
    # the family's per-layer visual inputs (DecoderSpec.injected_layers): [L, N, H] and the row of each token [1, T]
    injected: torch.Tensor | None = None
    rows: torch.Tensor | None = None

    def after_layer(self, index: int, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden`` after decoder layer ``index`` plus that layer's injected rows, as the deployed LLM adds them."""
        if self.injected is None or self.rows is None or index >= self.injected.shape[0]:
            return hidden
        from apet.modeling.decoder_block import add_injected

        return add_injected(hidden, self.injected[index].to(hidden.dtype), self.rows)


@dataclass
class CalibrationSet:
    samples: list[CalibrationSample]
    info: dict[str, Any] = field(default_factory=dict)  # kind, file, sha256, samples, tokens

    @property
    def tokens(self) -> int:
        return sum(int(s.embeds.shape[1]) for s in self.samples)
