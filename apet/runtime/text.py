"""Prompts to token ids (with the image span), and token ids back to streamed text.

Uses the ``tokenizers`` library on the artifact's ``tokenizer.json`` directly,
so a deployed runtime does not need transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apet.errors import ArtifactError, InputError
from apet.manifest import Manifest


@dataclass(frozen=True)
class EncodedBatch:
    """Left-padded prompt ids with K1 image slots, their mask and where each image span starts."""

    token_ids: np.ndarray  # [B, T] int64
    attention_mask: np.ndarray  # [B, T] int64, zeros only on the left
    image_start: np.ndarray  # [B] int64
    prompt_lengths: list[int]


class PromptEncoder:
    """Formats a user prompt with the model's template and reserves K1 visual-token slots."""

    def __init__(self, artifact_dir: Path, manifest: Manifest) -> None:
        from tokenizers import Tokenizer

        path = Path(artifact_dir) / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{path} is missing", "re-export the artifact (the tokenizer is copied at export)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.model = manifest.model
        self.visual_tokens = manifest.visual_tokens
        self.pad_id = self.model.pad_token_id if self.model.pad_token_id is not None else 0

    def encode_one(self, prompt: str) -> tuple[list[int], int]:
        """Ids with the single image placeholder expanded to K1 slots, and the span's start."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty", "pass a question or instruction, e.g. --prompt 'What is this?'")
        if self.model.image_placeholder in prompt:
            raise InputError(f"the prompt contains the image placeholder {self.model.image_placeholder!r}",
                             "remove it: the image is inserted by the prompt template")
        ids = self.tokenizer.encode(self.model.prompt_template.format(prompt=prompt)).ids
        positions = [i for i, t in enumerate(ids) if t == self.model.image_token_id]
        if len(positions) != 1:
            raise ArtifactError(f"the prompt template yields {len(positions)} image tokens, expected 1",
                                "the tokenizer does not know the image placeholder; re-export the artifact")
        start = positions[0]
        return ids[:start] + [self.model.image_token_id] * self.visual_tokens + ids[start + 1:], start

    def encode(self, prompts: list[str], max_context: int, max_new_tokens: int) -> EncodedBatch:
        encoded = [self.encode_one(p) for p in prompts]
        longest = max(len(ids) for ids, _ in encoded)
        if longest + max_new_tokens > max_context:
            raise InputError(
                f"the prompt needs {longest} tokens (incl. {self.visual_tokens} visual) + {max_new_tokens} new "
                f"tokens, over the artifact's max_context {max_context}",
                "shorten the prompt, lower --max-new-tokens, or re-export with a larger --max-context")
        batch = len(encoded)
        token_ids = np.full((batch, longest), self.pad_id, dtype=np.int64)
        mask = np.zeros((batch, longest), dtype=np.int64)
        starts = np.zeros(batch, dtype=np.int64)
        for row, (ids, start) in enumerate(encoded):
            pad = longest - len(ids)
            token_ids[row, pad:] = ids
            mask[row, pad:] = 1
            starts[row] = pad + start
        return EncodedBatch(token_ids, mask, starts, [len(ids) for ids, _ in encoded])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, encoder: PromptEncoder) -> None:
        self.encoder = encoder
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.encoder.decode(self.ids)
        if text.endswith("\ufffd") or not text.startswith(self.emitted):
            return ""
        delta, self.emitted = text[len(self.emitted):], text
        return delta

    def flush(self) -> str:
        """Whatever is still held back (e.g. a dangling partial character at the end)."""
        text = self.encoder.decode(self.ids)
        delta, self.emitted = (text[len(self.emitted):], text) if text.startswith(self.emitted) else ("", text)
        return delta

    @property
    def text(self) -> str:
        return self.encoder.decode(self.ids)
