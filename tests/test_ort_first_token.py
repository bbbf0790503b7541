"""ONNX Runtime's first-token graph (apet/runtime/backends/ort_first_token.py, the optional rewrite ``first-token``):
vision, the prompt's splice and the prefill as one graph computes what the two sessions and the host's splice
compute — the same kept and stage-2 indices, visual rows, logits and greedy tokens, bit for bit on ONNX Runtime's
CPU provider — through Pipeline as through the backend; a left-padded batch whose prefill is rewritten runs the two
sessions; families whose layout reads the kept indices keep the two sessions (logged); the splice inputs against a
NumPy reference; the artifact is never written."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import TWO_SESSIONS, make_image

from apet.runtime.backends.base import splice_numpy
from apet.runtime.backends.ort_first_token import SPLICE_INDEX, TEXT_ROWS, splice_feeds
from apet.runtime.pipeline import Pipeline

PROMPTS = ["What is in the picture?", "How many objects are there and what color are they?"]
STEPS = 6


@pytest.fixture(scope="module")
def llava_static_op(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")


def _digest(directory: Path) -> str:
    sha = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        sha.update(path.name.encode() + path.read_bytes())
    return sha.hexdigest()


def _first_tokens(pipeline: Pipeline, images: list, prompts: list[str], steps: int = STEPS) -> dict:
    """The first token through Backend.first_token (the pipeline's seam), then greedy steps."""
    backend, processor = pipeline.backend, pipeline.processor
    inputs = processor.vision_inputs(images)
    first = backend.first_token(inputs, lambda keep: processor.layout(prompts, inputs, keep, steps))
    logits, mask, tokens = [first.logits], first.layout.attention_mask, []
    for _ in range(steps):
        token = logits[-1].argmax(-1)
        tokens.append(token.tolist())
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        logits.append(backend.decode(token.astype(np.int64), mask, processor.decode_positions(first.layout, mask)))
    return {"tokens": tokens, "logits": np.stack(logits), "keep": np.asarray(first.visual.keep_index),
            "embeds": np.asarray(first.visual.embeds), "stage2": backend.stage2_index,
            "lengths": backend.cache_lengths(), "vision_ms": first.vision_ms}


@pytest.mark.parametrize("attention", ["gqa", "graph"])
def test_one_graph_computes_what_the_two_sessions_compute(llava_static_op, attention) -> None:
    """Batch 1 through the rewritten prompt (GroupQueryAttention) or the exported one: every output equal."""
    before = _digest(llava_static_op)
    images = [make_image(1, (300, 200))]
    one = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention=attention,
                        ort_rewrites="default,first-token")
    two = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention=attention, ort_rewrites=TWO_SESSIONS)
    static = one.backend.static
    assert static.first is not None and static._prefill_session is None  # no second copy of the prompt's weights
    assert one.backend.vision is None  # nor of the vision's
    merged, apart = (_first_tokens(p, images, PROMPTS[:1]) for p in (one, two))
    assert merged["vision_ms"] == 0.0 and apart["vision_ms"] > 0  # one run: its time is the prefill's
    assert merged["tokens"] == apart["tokens"] and len(set(map(tuple, merged["tokens"]))) > 1
    for key in ("keep", "embeds", "logits", "stage2"):
        np.testing.assert_array_equal(merged[key], apart[key], err_msg=key)
    assert merged["lengths"] == apart["lengths"]
    assert static._prefill_session is None  # still: every prompt took the one graph
    assert _digest(llava_static_op) == before


def test_the_pipeline_generates_the_same_answer_with_it(llava_static_op) -> None:
    image = make_image(3, (240, 240))
    one = Pipeline.load(llava_static_op, backend="onnxruntime")  # the default set takes it
    two = Pipeline.load(llava_static_op, backend="onnxruntime", ort_rewrites=TWO_SESSIONS)
    assert one.backend.static.first is not None and two.backend.static.first is None
    got, want = (p.generate(image, PROMPTS[0], max_new_tokens=8) for p in (one, two))
    assert (got.text, got.token_ids, got.keep_index) == (want.text, want.token_ids, want.keep_index)
    assert got.stats.vision_ms == 0.0 and got.stats.prefill_ms > 0


def test_stats_read_apet_apart_and_leave_the_request_in_it(llava_static_op, tmp_path, monkeypatch) -> None:
    """``apet-run --stats``/``--json`` (profile_apet) once put vision in a profiled session of its own, so a timed
    request ran two sessions, not the first-token graph a plain run takes. The request now runs the one graph, with
    the same answer; ApET's ms come from a profiled session made after its first token, once, its trace removed."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the profile's scratch directory goes
    image = make_image(4, (260, 220))
    stats = Pipeline.load(llava_static_op, backend="onnxruntime", profile_apet=True)
    plain = Pipeline.load(llava_static_op, backend="onnxruntime")
    got, want = (p.generate(image, PROMPTS[0], max_new_tokens=6) for p in (stats, plain))
    assert stats.backend.static.first is not None and stats.backend.static.first.calls == 1
    assert (got.token_ids, got.keep_index) == (want.token_ids, want.keep_index)
    assert got.stats.vision_ms == 0.0 and want.stats.apet_ms is None
    assert isinstance(got.stats.apet_ms, float) and 0 < got.stats.apet_ms < got.stats.prefill_ms
    assert list(tmp_path.iterdir()) == []
    again = stats.generate(image, PROMPTS[0], max_new_tokens=2)
    assert again.stats.apet_ms is None and stats.backend.static.first.calls == 2  # once, as before


def test_stats_without_a_writable_temp_dir_still_answer(llava_static_op, tmp_path, monkeypatch, caplog) -> None:
    """ApET's profile is written to the temp dir; where it cannot be (full, or not a directory), the request still
    answers, its ApET ms are None and the log says which setting to fix."""
    import tempfile

    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(blocked))
    image = make_image(4, (260, 220))
    stats = Pipeline.load(llava_static_op, backend="onnxruntime", profile_apet=True)
    with caplog.at_level(logging.WARNING):
        got = stats.generate(image, PROMPTS[0], max_new_tokens=4)
    monkeypatch.undo()
    want = Pipeline.load(llava_static_op, backend="onnxruntime").generate(image, PROMPTS[0], max_new_tokens=4)
    assert got.token_ids == want.token_ids and got.stats.apet_ms is None
    assert "TMPDIR" in caplog.text and blocked.read_text() == ""


def test_stats_where_the_profiled_session_fails_still_answer(llava_static_op, monkeypatch, caplog) -> None:
    """The profiled session holds a second copy of the vision weights; where ONNX Runtime cannot make it (a device
    short of memory), the request still answers without ApET's ms, and the log says why."""
    import onnxruntime as ort

    image = make_image(4, (260, 220))
    stats = Pipeline.load(llava_static_op, backend="onnxruntime", profile_apet=True)
    real = ort.InferenceSession

    def session(path, options=None, **kwargs):
        if options is not None and options.enable_profiling:
            raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : out of memory")
        return real(path, options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", session)
    with caplog.at_level(logging.WARNING):
        got = stats.generate(image, PROMPTS[0], max_new_tokens=4)
    monkeypatch.undo()
    want = Pipeline.load(llava_static_op, backend="onnxruntime").generate(image, PROMPTS[0], max_new_tokens=4)
    assert got.token_ids == want.token_ids and got.stats.apet_ms is None
    assert "out of memory" in caplog.text and "--stats" in caplog.text


def test_the_bench_reports_the_first_token_graphs_capture(llava_static_op, monkeypatch) -> None:
    """The bench's record said "prompt_cuda_graph": false and "vision_cuda_graph": false for the default form,
    whose first tokens replay the first-token graph's CUDA graph: it now says so (first_token_cuda_graph). The CUDA
    branches taken on the CPU (ONNX Runtime's CPU provider ignores the graph options; the captures run on a GPU)."""
    from apet.bench.ort_timing import backend_choices
    from apet.runtime.backends.ort_session import SessionSetup

    monkeypatch.setattr(SessionSetup, "graphs", property(lambda self: True))
    pipeline = Pipeline.load(llava_static_op, backend="onnxruntime")
    backend, processor = pipeline.backend, pipeline.processor
    assert backend_choices(backend)["first_token_cuda_graph"] is False  # no prompt shape seen yet
    inputs = processor.vision_inputs([make_image(5)])
    for _ in range(2):  # the first run gives the shapes, the second binds
        backend.first_token(inputs, lambda keep: processor.layout(PROMPTS[:1], inputs, keep, 4))
    choices = backend_choices(backend)
    assert choices["first_token_cuda_graph"] is True
    assert choices["prompt_cuda_graph"] is False and choices["vision_cuda_graph"] is False  # neither ran


def test_a_repeated_prompt_uploads_only_what_changed(llava_static_op, monkeypatch) -> None:
    """A captured first-token graph's small inputs (positions, mask, splice index, text rows of a tiny model) are
    uploaded only where their values changed (ort_session.SKIP_UNCHANGED_BYTES: each upload is a synchronous copy);
    the pixels every time. A new question of the same length replays the same graph with its own text rows: its
    logits are those of the two sessions, so nothing stale was read. The CUDA branches taken on the CPU."""
    import onnxruntime as ort

    from apet.runtime.backends.ort_session import SessionSetup

    monkeypatch.setattr(SessionSetup, "graphs", property(lambda self: True))
    one = Pipeline.load(llava_static_op, backend="onnxruntime")
    backend, processor = one.backend, one.processor
    candidates = (PROMPTS[0], "What is on the picture?", "What is in the image?", "Who is in the picture?")
    lengths = {p: len(sum(processor.encoder.split(p), [])) for p in candidates}
    same = [p for p in lengths if p != PROMPTS[0] and lengths[p] == lengths[PROMPTS[0]]]
    assert same, lengths
    uploads: list[int] = []
    real = ort.OrtValue.update_inplace
    monkeypatch.setattr(ort.OrtValue, "update_inplace", lambda self, array: uploads.append(array.nbytes) or
                        real(self, array))
    inputs = processor.vision_inputs([make_image(6)])

    def first(prompt: str):
        uploads.clear()
        return backend.first_token(inputs, lambda keep: processor.layout([prompt], inputs, keep, 4))

    for _ in range(2):  # the shape's first run gives its shapes, the second binds and uploads every input
        first(PROMPTS[0])
    assert len(uploads) > 3
    repeated = first(PROMPTS[0])
    assert uploads == [inputs.arrays["pixel_values"].nbytes]  # only the pixels
    other = first(same[0])
    assert len(uploads) == 2  # the pixels and the new question's text rows
    monkeypatch.undo()
    two = Pipeline.load(llava_static_op, backend="onnxruntime", ort_rewrites=TWO_SESSIONS)
    for got, prompt in ((repeated, PROMPTS[0]), (other, same[0])):
        want = two.backend.first_token(inputs, lambda keep: two.processor.layout([prompt], inputs, keep, 4))
        np.testing.assert_array_equal(got.logits, want.logits, err_msg=prompt)


def test_the_profile_is_read_from_its_last_runs_only() -> None:
    """The profiled session runs the request twice; ApET's ms are the second, warm pass's (events from the start of
    its runs on), and a profile with fewer runs than asked is read whole."""
    from apet.runtime.backends.onnxruntime import last_runs, scope_ms

    def node(ts: float, dur: float, scope: str = "apet_stage1") -> dict:
        return {"cat": "Node", "name": f"/{scope}/MatMul_kernel_time", "ts": ts, "dur": dur}

    events = [{"cat": "Session", "name": "model_run", "ts": 0}, node(1, 900), node(2, 50, "vision"),
              {"cat": "Session", "name": "model_run", "ts": 10}, node(11, 30), node(12, 40, "vision"), node(13, 20)]
    assert scope_ms(last_runs(events, 1), "apet_stage1") == pytest.approx(0.05)
    assert scope_ms(last_runs(events, 2), "apet_stage1") == pytest.approx(0.95)
    assert scope_ms(last_runs(events, 3), "apet_stage1") == pytest.approx(0.95)


def test_a_left_padded_batch_runs_in_it_or_apart_as_its_prefill_allows(llava_static_op) -> None:
    """Two prompts of different lengths (left padding): the exported prefill reads the mask, so it runs in the one
    graph; the rewritten prompt does not, so the batch runs the vision session and the exported prefill."""
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    reference = _first_tokens(Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="graph",
                                            ort_rewrites=TWO_SESSIONS), images, PROMPTS, 4)
    for attention, in_one in (("graph", True), ("gqa", False)):
        pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention=attention,
                                 ort_rewrites="first-token")
        got = _first_tokens(pipeline, images, PROMPTS, 4)
        assert (got["vision_ms"] == 0.0) == in_one, attention
        assert got["tokens"] == reference["tokens"]
        np.testing.assert_array_equal(got["keep"], reference["keep"])
        np.testing.assert_allclose(got["logits"], reference["logits"], atol=1e-4, rtol=0)


def test_a_family_whose_layout_reads_the_kept_indices_keeps_two_sessions(qwen_artifact_factory, caplog) -> None:
    artifact = qwen_artifact_factory(kv_cache="static")
    with caplog.at_level(logging.WARNING):
        pipeline = Pipeline.load(artifact, backend="onnxruntime", ort_rewrites="first-token")
    assert pipeline.backend.first_cast is None and pipeline.backend.static.first is None
    assert "layout reads the kept indices" in caplog.text


def test_in_the_default_set_it_says_where_it_does_not_apply_at_info(qwen_artifact_factory, caplog) -> None:
    """Named, a rewrite that does not apply warns (above); from the default set it is logged at info only: most
    artifacts are not the form it takes, and their users asked for nothing."""
    artifact = qwen_artifact_factory(kv_cache="static")
    with caplog.at_level(logging.INFO, logger="apet.runtime.backends.onnxruntime"):
        pipeline = Pipeline.load(artifact, backend="onnxruntime")
    assert pipeline.backend.static.first is None
    said = [r for r in caplog.records if "layout reads the kept indices" in r.getMessage()]
    assert [r.levelno for r in said] == [logging.INFO]


def test_an_artifact_without_a_tokenizer_takes_it(llava_static_op, tmp_path) -> None:
    """Whether the first-token graph applies is a fact of the family's processor class: deciding it reads no
    tokenizer, so an artifact without one (the random-weight benchmark artifacts, which use a synthetic prompt
    encoder) takes it too. It once built the artifact's processor and failed on the missing tokenizer.json."""
    from apet.manifest import read_manifest
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend

    bare = tmp_path / "bare"
    bare.mkdir()
    for path in llava_static_op.iterdir():
        if not path.name.startswith(("tokenizer", "special_tokens", "added_tokens")):
            (bare / path.name).symlink_to(path)
    assert not (bare / "tokenizer.json").exists()
    backend = OnnxRuntimeBackend(bare, read_manifest(bare))
    assert backend.static.first is not None and backend.vision is None


def test_the_splice_inputs_rebuild_the_hosts_splice() -> None:
    """Concat(visual rows, text rows) gathered by the splice index equals splice_numpy, on a layout with left
    padding, two rows and their visual spans at different places."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 6)).astype(np.float32)
    visual = rng.standard_normal((2, 3, 6)).astype(np.float32)
    ids = rng.integers(0, 50, (2, 7))
    rows = np.array([[-1, -1, 0, 1, 2, -1, -1], [-1, 3, 4, 5, -1, -1, -1]])
    feeds = splice_feeds(table, ids, rows, 6)
    assert feeds[TEXT_ROWS].shape == (8, 6) and feeds[SPLICE_INDEX].dtype == np.int64
    rebuilt = np.concatenate([visual.reshape(-1, 6), feeds[TEXT_ROWS]])[feeds[SPLICE_INDEX]]
    np.testing.assert_array_equal(rebuilt, splice_numpy(table, ids, visual, rows))
    np.testing.assert_array_equal(feeds[SPLICE_INDEX][rows >= 0], rows[rows >= 0])  # visual slots: their own rows


def test_leaving_matmul_add_fusion_out_does_not_change_the_prompt(llava_static_op, tmp_path) -> None:
    """The first-token graph's session leaves ``MatMulAddFusion`` out for the vision part's sake (as the graphed
    vision session does); ONNX Runtime's optimized rewritten prompt is the same graph with and without it."""
    import onnx
    import onnxruntime as ort

    pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa")
    model = pipeline.backend.static.gqa_prompt.model
    graphs = []
    for disabled in ([], ["MatMulAddFusion"]):
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"optimized{len(disabled)}.onnx")
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(llava_static_op))
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"],
                             disabled_optimizers=disabled)
        optimized = onnx.load(options.optimized_model_filepath, load_external_data=False)
        graphs.append([(node.op_type, list(node.input), list(node.output)) for node in optimized.graph.node])
    assert graphs[0] == graphs[1] and any(op == "MatMul" for op, _, _ in graphs[0])


def test_video_llava_takes_it_too(video_artifact_factory) -> None:
    """Video-LLaVA (a video's frames, each its ApET budget, one span) takes the one graph too, with the answer,
    tokens and kept indices of the two sessions."""
    from videos import make_frames

    artifact = video_artifact_factory(ratio=0.125, kv_cache="static")
    one = Pipeline.load(artifact, backend="onnxruntime", ort_rewrites="default,first-token")
    two = Pipeline.load(artifact, backend="onnxruntime", ort_rewrites=TWO_SESSIONS)
    got, want = (p.generate(video=make_frames(5, 12), prompt=PROMPTS[0], max_new_tokens=6) for p in (one, two))
    assert got.stats.vision_ms == 0.0 and one.backend.static.first is not None  # it ran as one graph
    assert (got.text, got.token_ids) == (want.text, want.token_ids)
    np.testing.assert_array_equal(np.asarray(got.keep_index), np.asarray(want.keep_index))


def test_a_vision_graph_it_cannot_compose_leaves_the_two_sessions(llava_static_op, monkeypatch, caplog) -> None:
    """compose() refuses a vision graph with subgraphs; the backend then runs vision and prefill apart, as without
    the rewrite, and says why."""
    from apet.runtime.backends import ort_static

    def refuse(vision, prefill):
        raise ValueError("the vision graph has subgraphs (control flow), which the first-token graph does not take")

    monkeypatch.setattr(ort_static, "compose", refuse)
    with caplog.at_level(logging.WARNING):
        pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", ort_rewrites="first-token")
    assert pipeline.backend.first_cast is None and "could not be made (the vision graph has subgraphs" in caplog.text
    got = _first_tokens(pipeline, [make_image(1, (300, 200))], PROMPTS[:1], 2)
    assert got["vision_ms"] > 0


def test_compose_refuses_a_vision_graph_with_control_flow() -> None:
    from onnx import TensorProto, helper

    from apet.runtime.backends.ort_first_token import compose

    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    vision = helper.make_model(helper.make_graph(
        [helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch)], "v",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1])]))
    with pytest.raises(ValueError, match="subgraphs"):
        compose(vision, vision)


def test_a_bound_run_leaves_the_visual_rows_on_the_device_until_read(llava_static_op) -> None:
    """With a graph bound per prompt shape (CUDA graphs; here bound by hand on the CPU, as ONNX Runtime binds them),
    the visual rows stay on the device: read, they are the rows of the unbound run; after the next first token
    they are refused, not another request's."""
    from apet.runtime.backends.ort_first_token import VISUAL_ROWS
    from apet.runtime.backends.ort_prompt_graphs import PromptGraphs

    pipeline = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa",
                             ort_rewrites="default,first-token")
    backend, processor, static = pipeline.backend, pipeline.processor, pipeline.backend.static
    static.first.graphs = PromptGraphs(static.first.session, static.setup, limit=2,
                                       on_device=frozenset({VISUAL_ROWS}))
    inputs = processor.vision_inputs([make_image(1, (300, 200))])

    def first_token():
        return backend.first_token(inputs, lambda keep: processor.layout(PROMPTS[:1], inputs, keep, 4))

    unbound, bound = first_token(), first_token()
    assert isinstance(unbound.visual.embeds, np.ndarray) and not isinstance(bound.visual.embeds, np.ndarray)
    assert bound.visual.embeds.shape == unbound.visual.embeds.shape
    np.testing.assert_array_equal(np.asarray(bound.visual.embeds), unbound.visual.embeds)
    np.testing.assert_array_equal(bound.logits, unbound.logits)
    np.testing.assert_array_equal(bound.visual.keep_index, unbound.visual.keep_index)
    later = first_token()
    with pytest.raises(RuntimeError, match="overwritten by a later first token"):
        np.asarray(bound.visual.embeds)
    np.testing.assert_array_equal(np.asarray(later.visual.embeds), unbound.visual.embeds)


def test_the_graphed_vision_form_composes_as_its_own_session_runs(llava_static_op, monkeypatch) -> None:
    """The form CUDA composes (token-layout attention, packed q/k/v, MatMulAddFusion left out; an fp16 artifact's
    pixels also cast in the graph), here on the CPU: the one graph gives the kept and stage-2 indices, rows and
    logits of that vision graph in its own session, spliced on the host, and the rewritten prompt's prefill."""
    import onnx
    import onnxruntime as ort

    from apet.manifest import read_manifest
    from apet.runtime.backends.base import VisionOutput
    from apet.runtime.backends.onnxruntime import OnnxRuntimeBackend
    from apet.runtime.backends.ort_first_token import VisionPart
    from apet.runtime.backends.ort_graphed import VisionSessionForm, typed_inputs
    from apet.runtime.backends.ort_vision import load_for_graphs

    spec = read_manifest(llava_static_op).graphs["vision"]
    form = VisionSessionForm.of(frozenset({"pack-projections"}))
    model, cast = load_for_graphs(llava_static_op / spec.file, form.token_layout, form.cast_inputs,
                                  form.skip_layer_norms, form.pack_projections)
    assert isinstance(model, bytes)  # rewritten
    part = VisionPart(onnx.load_from_string(model), cast, form.disabled_optimizers)
    monkeypatch.setattr(OnnxRuntimeBackend, "_first_token_vision", lambda self, path, profiled, named: part)
    one = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa",
                        ort_rewrites="default,first-token")
    two = Pipeline.load(llava_static_op, backend="onnxruntime", decode_attention="gqa", ort_rewrites=TWO_SESSIONS)
    processor = one.processor
    inputs = processor.vision_inputs([make_image(1, (300, 200))])
    layout_for = lambda keep: processor.layout(PROMPTS[:1], inputs, keep, 4)  # noqa: E731
    first = one.backend.first_token(inputs, layout_for)
    vision = ort.InferenceSession(model, providers=["CPUExecutionProvider"],
                                  disabled_optimizers=list(form.disabled_optimizers))
    graph_types = {entry["name"]: np.dtype(entry["dtype"]).type for entry in spec.inputs}
    names = [o.name for o in vision.get_outputs()]
    visual = VisionOutput.of(dict(zip(names, vision.run(None, typed_inputs(inputs.arrays, cast, graph_types)))))
    logits = two.backend.prefill(layout_for(visual.keep_index), visual)
    assert first.vision_ms == 0.0
    np.testing.assert_array_equal(first.visual.keep_index, visual.keep_index)
    np.testing.assert_array_equal(np.asarray(first.visual.embeds), visual.embeds)
    np.testing.assert_array_equal(first.logits, logits)
    np.testing.assert_array_equal(one.backend.stage2_index, two.backend.stage2_index)
