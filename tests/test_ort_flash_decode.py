"""``flash-decode`` (apet/runtime/backends/ort_options.py): ONNX Runtime's GroupQueryAttention decode kernel is chosen
by environment switches it reads when a session's kernels are made, so the option sets them only around the decode
sessions' making (``scoped_environment``) and nowhere else: the vision's, the prompt's and the first-token graph's
sessions keep ONNX Runtime's own choice, the process environment is as it was afterwards, and a user's own setting
wins. On the CPU provider the switches choose nothing, so the tokens and logits are those without the option."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import graphs_on_cpu, make_image

from apet.runtime.backends.ort_options import FLASH_DECODE_ENVIRONMENT, scoped_environment
from apet.runtime.pipeline import Pipeline

SWITCHES = tuple(FLASH_DECODE_ENVIRONMENT)


@pytest.fixture(scope="module")
def llava_static_op(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")


@pytest.fixture()
def clean_environment(monkeypatch):
    for name in SWITCHES:
        monkeypatch.delenv(name, raising=False)


def test_the_environment_is_set_inside_and_restored_after(clean_environment, monkeypatch) -> None:
    monkeypatch.setenv("ORT_ENABLE_XQA", "1")  # the user's own choice
    with pytest.raises(RuntimeError, match="inside"):
        with scoped_environment(FLASH_DECODE_ENVIRONMENT):
            assert os.environ["ORT_ENABLE_XQA"] == "1"  # theirs is kept
            assert os.environ["ORT_ENABLE_CUDNN_FLASH_ATTENTION"] == "0"
            raise RuntimeError("inside")
    assert os.environ["ORT_ENABLE_XQA"] == "1" and "ORT_ENABLE_CUDNN_FLASH_ATTENTION" not in os.environ


def _recorded_sessions(monkeypatch) -> list[tuple[object, dict[str, str | None]]]:
    """Every ONNX Runtime session made from now on, with the switches' values when it was made."""
    made: list[tuple[object, dict[str, str | None]]] = []
    real = ort.InferenceSession

    def recording(*args, **kwargs):
        session = real(*args, **kwargs)
        made.append((session, {name: os.environ.get(name) for name in SWITCHES}))
        return session

    monkeypatch.setattr(ort, "InferenceSession", recording)
    return made


def _generate(pipeline: Pipeline):
    return pipeline.generate(make_image(4, (260, 200)), "What is in the picture?", max_new_tokens=8)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("rewrites", ["default,flash-decode", "flash-decode"])
def test_only_the_decode_sessions_are_made_under_the_switches(llava_static_op, clean_environment, monkeypatch,
                                                                rewrites, graphs) -> None:
    """With the first-token graph (the default set) and without it (the vision's and the prompt's own sessions);
    with the CUDA-graph branches (the one decode session of every batch size, :class:`GraphSessions`) and without."""
    want = _generate(Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa"))
    made = _recorded_sessions(monkeypatch)
    pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa", ort_rewrites=rewrites)
    if graphs:
        pipeline.backend.static.setup = graphs_on_cpu(pipeline.backend.static.setup)
    got = _generate(pipeline)
    assert bool(pipeline.backend.static.graph_sessions) == graphs
    decode = {id(step.session) for step in pipeline.backend.static.steps.values()}
    assert decode and len(made) > len(decode)  # the vision's or the first token's sessions were made here too
    for session, switches in made:
        expected = FLASH_DECODE_ENVIRONMENT if id(session) in decode else dict.fromkeys(SWITCHES)
        assert switches == expected
    assert all(name not in os.environ for name in SWITCHES)
    assert (got.token_ids, got.keep_index) == (want.token_ids, want.keep_index)
    assert len(set(got.token_ids)) > 1


def test_without_it_every_session_keeps_onnx_runtimes_choice(llava_static_op, clean_environment, monkeypatch) -> None:
    made = _recorded_sessions(monkeypatch)
    _generate(Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa"))
    assert made and all(switches == dict.fromkeys(SWITCHES) for _, switches in made)


def test_the_decode_logits_are_those_without_it_on_the_cpu(llava_static_op, clean_environment) -> None:
    """The decode steps' logits themselves (not only the argmax): the CPU provider has one kernel either way."""
    from test_ort_first_token import _first_tokens

    images = [make_image(1, (300, 200))]
    prompts = ["What is in the picture?"]
    runs = [_first_tokens(Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa",
                                        ort_rewrites=rewrites), images, prompts, 5)
            for rewrites in ("default", "default,flash-decode")]
    np.testing.assert_array_equal(runs[0]["logits"], runs[1]["logits"])
    assert runs[0]["tokens"] == runs[1]["tokens"]
