"""The prompt encoder keeps the token ids of its latest prompts (apet/models/prompt.py ``CACHED_PROMPTS``): a device
asking the same question of every frame tokenizes it once; callers get lists of their own; bad prompts are refused
every time."""

from __future__ import annotations

import pytest

from apet.errors import InputError
from apet.manifest import read_manifest
from apet.models.prompt import CACHED_PROMPTS, PromptEncoder, SyntheticPromptEncoder


class CountingTokenizer:
    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.calls = tokenizer, 0

    def encode(self, text: str):
        self.calls += 1
        return self.tokenizer.encode(text)


def test_a_repeated_prompt_is_tokenized_once(artifact_factory) -> None:
    artifact = artifact_factory(ratio=0.11, stages=2)
    model = read_manifest(artifact).model
    encoder, reference = PromptEncoder(artifact, model), PromptEncoder(artifact, model)
    encoder.tokenizer = counting = CountingTokenizer(encoder.tokenizer)
    first = encoder.split("What is in the picture?")
    first[0].append(-1)  # the caller's own list
    assert encoder.split("What is in the picture?") == reference.split("What is in the picture?")
    assert counting.calls == 1
    assert encoder.split("And what colour is it?") == reference.split("And what colour is it?")
    assert counting.calls == 2
    for prompt in [f"question {i}" for i in range(CACHED_PROMPTS)]:  # the oldest drop out
        encoder.split(prompt)
    encoder.split("What is in the picture?")
    assert counting.calls == 2 + CACHED_PROMPTS + 1
    for _ in range(2):
        with pytest.raises(InputError, match="the prompt is empty"):
            encoder.split("  ")


def test_the_synthetic_encoder_returns_the_same_ids_as_lists_of_their_own(artifact_factory) -> None:
    model = read_manifest(artifact_factory(ratio=0.11, stages=2)).model
    encoder = SyntheticPromptEncoder(model)
    before, after = encoder.split("one two three")
    after.append(-1)
    assert encoder.split("one two three") == (before, after[:-1]) and len(after) == 4
    assert encoder.split("one two three") == SyntheticPromptEncoder(model).split("one two three")
