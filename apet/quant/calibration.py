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


@dataclass
class CalibrationSet:
    samples: list[CalibrationSample]
    info: dict[str, Any] = field(default_factory=dict)  # kind, file, sha256, samples, tokens

    @property
    def tokens(self) -> int:
        return sum(int(s.embeds.shape[1]) for s in self.samples)
