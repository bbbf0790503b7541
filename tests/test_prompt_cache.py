"""The prompt encoder keeps the token ids of its latest prompts (apet/models/prompt.py ``CACHED_PROMPTS``) and its
latest layouts (``CACHED_LAYOUTS``): a device asking the same question of every frame tokenizes it and lays it out
once; callers get lists and arrays of their own; bad prompts are refused every time."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from apet.errors import InputError
from apet.manifest import read_manifest
from apet.models.prompt import CACHED_LAYOUTS, CACHED_PROMPTS, PromptEncoder, SyntheticPromptEncoder, single_span_layout


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


def _spans(rows: int, batch: int, image_id: int) -> list:
    return [(np.arange(b * rows, (b + 1) * rows), np.full(rows, image_id)) for b in range(batch)]


def _fields(layout) -> dict:
    return {f.name: getattr(layout, f.name) for f in dataclasses.fields(layout)}


def test_a_repeated_layout_is_built_once_and_handed_out_as_copies(artifact_factory, monkeypatch) -> None:
    """single_span_layout keeps its latest layouts (CACHED_LAYOUTS): the same prompts over the same spans are laid
    out once (ONNX Runtime's first token lays the prompt out on its path); each call gets arrays of its own, equal to
    a fresh build; another prompt, span or token budget is a new layout; a prompt too long is refused every time."""
    from apet.models import prompt as prompt_module

    artifact = artifact_factory(ratio=0.11, stages=2)
    manifest = read_manifest(artifact)
    image_id, context = manifest.model.image_token_id, manifest.max_context
    encoder, reference = PromptEncoder(artifact, manifest.model), PromptEncoder(artifact, manifest.model)
    built = []
    build = prompt_module._single_span_layout
    monkeypatch.setattr(prompt_module, "_single_span_layout", lambda *args: built.append(1) or build(*args))
    prompts = ["What is in the picture?", "How many objects are there?"]  # left padding: two lengths
    first = single_span_layout(encoder, prompts, _spans(40, 2, image_id), context, 8)
    first.token_ids[0, -1] = -7  # the caller's own arrays
    first.state["x"] = 1
    again = single_span_layout(encoder, prompts, _spans(40, 2, image_id), context, 8)
    want = build(reference, prompts, _spans(40, 2, image_id), context, 8)
    assert len(built) == 1  # the second call was a hit (the reference is built apart)
    for name, value in _fields(want).items():
        got = _fields(again)[name]
        assert np.array_equal(got, value) if isinstance(value, np.ndarray) else got == value, name
    assert again.token_ids is not first.token_ids and again.state == {}
    again.token_ids[:] = 0  # a hit's arrays are its caller's too
    again.state["y"] = 2
    third = single_span_layout(encoder, prompts, _spans(40, 2, image_id), context, 8)
    assert np.array_equal(third.token_ids, want.token_ids) and third.state == {} and len(built) == 1
    for other in ((prompts[:1], _spans(40, 1, image_id), 8), (prompts, _spans(32, 2, image_id), 8),
                  (prompts, _spans(40, 2, image_id), 9)):
        single_span_layout(encoder, other[0], other[1], context, other[2])
    assert len(built) == 4
    for _ in range(2):
        with pytest.raises(InputError, match="max_context"):
            single_span_layout(encoder, ["word " * 2000], _spans(40, 1, image_id), context, 8)
    for i in range(CACHED_LAYOUTS):  # the oldest drop out
        single_span_layout(encoder, [f"question {i}"], _spans(40, 1, image_id), context, 8)
    single_span_layout(encoder, prompts, _spans(40, 2, image_id), context, 8)
    assert len(built) == 4 + 2 + CACHED_LAYOUTS + 1
