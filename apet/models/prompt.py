"""Prompts to token ids around the visual span, and the prefill layout of one visual span per request.

Uses the ``tokenizers`` library on the artifact's ``tokenizer.json`` directly, so a deployed runtime
needs neither transformers nor torch.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

import numpy as np

from apet.contracts.specs import ModelSpec
from apet.errors import ArtifactError, InputError, option
from apet.models.family import Layout, positions_from_mask

CACHED_PROMPTS = 64  # prompts whose token ids an encoder keeps: a device asking the same question of every frame
# tokenizes it once (tokenizing took ~70 of a layout's ~110 µs on a desktop CPU, and lies on the first token's path)
CACHED_LAYOUTS = 16  # layouts an encoder keeps (LayoutCache): the same question over the same visual spans is laid
# out once; built right after a session run the arrays took ~100 µs on a desktop CPU, 0.15-0.4 ms on the H200's host
# (docs/benchmarks.md, issue 28: ONNX Runtime lays the prompt out inside its first token)


class LayoutCache:
    """The latest :data:`CACHED_LAYOUTS` layouts of :func:`single_span_layout` by what they are built from. A hit
    returns copies of the arrays and a fresh ``state`` (callers may change what they get), never the kept ones."""

    def __init__(self, size: int = CACHED_LAYOUTS) -> None:
        self.size, self.entries, self.lock = size, OrderedDict(), threading.Lock()  # threads may share a processor

    def get(self, key: tuple) -> "Layout | None":
        with self.lock:
            layout = self.entries.get(key)
            if layout is None:
                return None
            self.entries.move_to_end(key)
        return _copied(layout)

    def put(self, key: tuple, layout: "Layout") -> "Layout":
        kept = _copied(layout)
        with self.lock:
            self.entries[key] = kept
            self.entries.move_to_end(key)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return layout


def _copied(layout: "Layout") -> "Layout":
    arrays = {f.name: getattr(layout, f.name).copy() for f in dataclasses.fields(layout)
              if isinstance(getattr(layout, f.name), np.ndarray)}
    return dataclasses.replace(layout, **arrays, visual_tokens=list(layout.visual_tokens),
                               prompt_lengths=list(layout.prompt_lengths), state=dict(layout.state))


class PromptEncoder:
    """Formats a user prompt with the artifact's template and splits it at the media placeholder."""

    def __init__(self, tokenizer_dir: Path, model: ModelSpec) -> None:
        from tokenizers import Tokenizer

        path = Path(tokenizer_dir) / "tokenizer.json"
        if not path.is_file():
            raise ArtifactError(f"{path} is missing", "re-export the artifact (the tokenizer is copied at export)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.model = model
        self.pad_id = model.pad_token_id if model.pad_token_id is not None else 0
        self._split_ids = functools.lru_cache(maxsize=CACHED_PROMPTS)(self._tokenize)
        self.layouts = LayoutCache()

    def split(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the single media placeholder of the formatted prompt."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty",
                             f"pass a question or instruction, e.g. {option('prompt', 'What is this?')}")
        if self.model.image_placeholder in prompt:
            raise InputError(f"the prompt contains the media placeholder {self.model.image_placeholder!r}",
                             "remove it: the image is inserted by the prompt template")
        before, after = self._split_ids(prompt)
        return list(before), list(after)

    def _tokenize(self, prompt: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The split of a checked prompt, uncached (the encoder keeps the latest :data:`CACHED_PROMPTS`)."""
        ids = self.tokenizer.encode(self.model.prompt_template.format(prompt=prompt)).ids
        positions = [i for i, t in enumerate(ids) if t == self.model.image_token_id]
        if len(positions) != 1:
            raise ArtifactError(f"the prompt template yields {len(positions)} media tokens, expected 1",
                                "the tokenizer does not know the media placeholder; re-export the artifact")
        return tuple(ids[:positions[0]]), tuple(ids[positions[0] + 1:])

    def text_before_media(self) -> int:
        return len(self.split("x")[0])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class SyntheticPromptEncoder(PromptEncoder):
    """For random-weight ``*-shapes`` models (benchmarks), which come without a tokenizer: the template's
    text before the placeholder is about 1.3 tokens per word plus BOS, the prompt is one token per word,
    and ids are fixed pseudo-random vocabulary entries: the same prompt gives the same ids on every call and in
    every process (the bench's own-process ONNX Runtime run checks its request against the bench's). Never used
    where real text matters."""

    def __init__(self, model: ModelSpec, seed: int = 0) -> None:
        self.model = model
        self.pad_id = model.pad_token_id if model.pad_token_id is not None else 0
        self.seed = seed
        self.before = estimated_text_before(model.prompt_template, model.image_placeholder)
        self.vocab = model.decoder.vocab_size
        self._cached_ids = functools.lru_cache(maxsize=CACHED_PROMPTS)(self._random_ids)
        self.layouts = LayoutCache()

    def _random_ids(self, part: int, count: int) -> tuple[int, ...]:
        rng = np.random.default_rng([self.seed, part, count])
        return tuple(rng.integers(3, min(self.vocab, 30000), count).tolist())

    def _ids(self, part: int, count: int) -> list[int]:
        return list(self._cached_ids(part, count))

    def split(self, prompt: str) -> tuple[list[int], list[int]]:
        return self._ids(0, self.before), self._ids(1, len(prompt.split()))

    def decode(self, ids: list[int]) -> str:
        return ""


def estimated_text_before(template: str, placeholder: str) -> int:
    """Tokens before the placeholder without a tokenizer: about 1.3 Llama tokens per word, plus BOS."""
    words = template.split(placeholder)[0].split()
    return 1 + round(1.3 * len(words))


def prompt_encoder(tokenizer_dir: Path | None, model: ModelSpec) -> PromptEncoder:
    """The artifact's tokenizer; without a directory (random-weight benchmarks), a synthetic encoder."""
    return SyntheticPromptEncoder(model) if tokenizer_dir is None else PromptEncoder(tokenizer_dir, model)


def check_context(prompt_tokens: int, visual_tokens: int, max_new_tokens: int, max_context: int) -> None:
    if prompt_tokens + max_new_tokens > max_context:
        raise InputError(
            f"the prompt needs {prompt_tokens} tokens (incl. {visual_tokens} visual) + {max_new_tokens} new "
            f"tokens, over the artifact's max_context {max_context}",
            f"shorten the prompt, lower {option('max_new_tokens')}, or re-export with a larger apet-export "
            "--max-context")


def single_span_layout(encoder: PromptEncoder, prompts: Sequence[str], spans: Sequence[tuple[np.ndarray, np.ndarray]],
                       max_context: int, max_new_tokens: int) -> Layout:
    """Left-padded prompts, each with one visual span in place of the placeholder; 1-D positions. A span's
    length (learned rows such as ``image_newline`` included) is its request's visual-token count.

    ``spans[b]`` = (rows, ids): ``rows[j]`` is the visual-embedding row of slot j (-1 where the slot is
    a token, e.g. an ``image_newline``), ``ids[j]`` the token id stored there (the placeholder id for
    visual rows).
    """
    key = (tuple(prompts), tuple((rows.dtype.str, rows.tobytes(), ids.dtype.str, ids.tobytes()) for rows, ids in spans),
           max_context, max_new_tokens)
    cached = encoder.layouts.get(key)
    if cached is not None:
        return cached
    return encoder.layouts.put(key, _single_span_layout(encoder, prompts, spans, max_context, max_new_tokens))


def _single_span_layout(encoder: PromptEncoder, prompts: Sequence[str], spans: Sequence[tuple[np.ndarray, np.ndarray]],
                        max_context: int, max_new_tokens: int) -> Layout:
    rows_per_prompt, starts = [], []
    for prompt, (rows, ids) in zip(prompts, spans):
        before, after = encoder.split(prompt)
        check_context(len(before) + len(rows) + len(after), len(rows), max_new_tokens, max_context)
        rows_per_prompt.append((before + [int(i) for i in ids] + after,
                                [-1] * len(before) + [int(r) for r in rows] + [-1] * len(after)))
        starts.append(len(before))
    longest = max(len(ids) for ids, _ in rows_per_prompt)
    batch = len(rows_per_prompt)
    token_ids = np.full((batch, longest), encoder.pad_id, dtype=np.int64)
    mask = np.zeros((batch, longest), dtype=np.int64)
    visual_rows = np.full((batch, longest), -1, dtype=np.int64)
    image_start = np.zeros(batch, dtype=np.int64)
    for b, (ids, rows) in enumerate(rows_per_prompt):
        pad = longest - len(ids)
        token_ids[b, pad:], mask[b, pad:], visual_rows[b, pad:] = ids, 1, rows
        image_start[b] = pad + starts[b]
    return Layout(token_ids, mask, visual_rows, positions_from_mask(mask), image_start,
                  visual_tokens=[len(rows) for rows, _ in spans],
                  prompt_lengths=[len(ids) for ids, _ in rows_per_prompt])
