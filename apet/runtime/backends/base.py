"""The small interface every runtime backend implements, and helpers they share.

The pipeline speaks numpy at this boundary for ids, masks and logits (small),
while visual embeddings and the KV cache stay in the backend's own memory
(device tensors, OrtValues) between calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from apet.compression import gather_tokens
from apet.errors import BackendError, InputError
from apet.manifest import Manifest


@dataclass
class VisionOutput:
    embeds: Any  # backend-native [B, K1, H]
    keep_index: np.ndarray  # [B, K1] int64
    apet_ms: float | None = None  # time of ApET alone, where the backend can separate it


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Hugging Face's convention for left padding: running count of real tokens minus one; pads get 1."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


class Backend(ABC):
    """Runs the artifact's vision and language graphs; owns the KV cache between calls."""

    name: str = "?"

    def __init__(self, artifact_dir: Path, manifest: Manifest) -> None:
        self.artifact_dir = Path(artifact_dir)
        self.manifest = manifest

    @abstractmethod
    def encode_images(self, pixel_values: np.ndarray) -> VisionOutput:
        """float32 [B, 3, H, W] -> visual embeddings (native) and kept indices."""

    @abstractmethod
    def prefill(self, token_ids: np.ndarray, attention_mask: np.ndarray, image_start: np.ndarray,
                visual: VisionOutput) -> np.ndarray:
        """Whole prompts (image slots filled from ``visual``) -> float32 logits [B, V]; starts a new cache."""

    @abstractmethod
    def decode(self, token_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """One new token per row [B] with the full mask [B, P+1] -> float32 logits [B, V]."""

    @abstractmethod
    def cache_lengths(self) -> list[int]:
        """Current past length of every layer (layers after stage 2 are shorter)."""

    def peak_memory_bytes(self) -> int | None:
        return None

    def apet_ms(self, visual: VisionOutput) -> float | None:
        """Milliseconds of ApET (stage 1) in the last vision run, where the backend can tell; called after the
        vision timing so that reading a profile does not count as vision time."""
        return visual.apet_ms

    def synchronize(self) -> None:
        """Wait for queued device work (for honest timings)."""

    def check_request(self, batch: int, prompt_tokens: int, new_tokens: int) -> None:
        """Refuse a request this backend cannot serve before any work starts (engines may be smaller than the
        export's limits)."""
        self.check_batch(batch)

    def check_batch(self, batch: int) -> None:
        if batch > self.manifest.max_batch:
            raise InputError(f"batch of {batch} exceeds the artifact's max batch {self.manifest.max_batch}",
                             "split the request, or re-export/re-build with a larger --max-batch")


def load_embedding_table(artifact_dir: Path, manifest: Manifest) -> np.ndarray:
    """The token-embedding table (numpy, the export dtype)."""
    from safetensors.numpy import load_file

    entry = manifest.embeddings
    path = Path(artifact_dir) / entry["file"]
    if not path.is_file():
        raise BackendError(f"{path} is missing", "re-export the artifact")
    return load_file(str(path))[entry.get("tensor", "weight")]


def splice_numpy(table: np.ndarray, token_ids: np.ndarray, visual: np.ndarray, image_start: np.ndarray) -> np.ndarray:
    """Text embeddings with each row's K1 image slots replaced by its visual embeddings."""
    embeds = table[token_ids]
    span = visual.shape[1]
    for row, start in enumerate(image_start.tolist()):
        embeds[row, start:start + span] = visual[row]
    return embeds


def splice(table: torch.Tensor, token_ids: torch.Tensor, visual: torch.Tensor,
           image_start: torch.Tensor) -> torch.Tensor:
    """Token embeddings with rows' K1 image slots replaced by visual embeddings (torch, no Python loop, so it
    can sit inside a CUDA graph)."""
    embeds = table[token_ids]
    span = visual.shape[1]
    relative = torch.arange(token_ids.shape[1], device=token_ids.device) - image_start.unsqueeze(1)
    inside = (relative >= 0) & (relative < span)
    return torch.where(inside.unsqueeze(-1), gather_tokens(visual, relative.clamp(0, span - 1)), embeds)


def import_optional(module: str, extra: str, purpose: str) -> Any:
    """Import a backend package or raise BackendError naming the pip extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except Exception as exc:
        raise BackendError(f"{purpose} needs the Python package {module!r}, which cannot be imported ({exc})",
                           f'pip install "apet[{extra}]"') from exc
