"""The prompt assembled on the device (apet/runtime/backends/ort_splice.py): the splice graph copies the same bytes
the host splice does, a vision output left on the device keeps its values when the bound run that made it runs
again, and a static-KV pipeline that splices on the device generates bit-identical logits to one that splices on
the host. On the CPU execution provider "the device" is host memory: the bindings and graphs are the ones CUDA runs
(the H200 bench times them)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import make_image
from test_static_kv import _greedy

from apet.contracts.io import VISUAL_EMBEDS
from apet.manifest import read_manifest
from apet.runtime.backends.base import splice_numpy
from apet.runtime.backends.ort_graphed import GraphedVision, VisionSessionForm
from apet.runtime.backends.ort_options import session_options
from apet.runtime.backends.ort_session import FixedRun, SessionSetup
from apet.runtime.backends.ort_splice import DeviceRows, DeviceSplice, SplicedEmbeds, sources
from apet.runtime.pipeline import Pipeline


def _setup() -> SessionSetup:
    return SessionSetup(ort, session_options(ort), ["CPUExecutionProvider"], "cpu", False)


def _on_device(array: np.ndarray) -> DeviceRows:
    return DeviceRows(ort.OrtValue.ortvalue_from_numpy(array, "cpu", 0))


def _spliced(spliced: SplicedEmbeds) -> np.ndarray:
    buffer = ort.OrtValue.ortvalue_from_shape_and_type(list(spliced.shape), spliced.dtype.type, "cpu", 0)
    spliced.write(buffer)
    return buffer.numpy()


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_device_splice_copies_what_the_host_splice_copies(dtype) -> None:
    rng = np.random.default_rng(0)
    table = rng.standard_normal((50, 8)).astype(dtype)
    visual = rng.standard_normal((2, 3, 8)).astype(dtype)  # [B, K, H] as LLaVA's vision graph returns it
    token_ids = rng.integers(0, 50, (2, 7))
    rows = np.full((2, 7), -1, dtype=np.int64)
    rows[0, 1:4], rows[1, 3:6] = [0, 1, 2], [3, 4, 5]  # each row's image span at another place
    splice = DeviceSplice(_setup(), table)
    assert splice.applies(_on_device(visual), rows)
    want = splice_numpy(table, token_ids, visual, rows)
    np.testing.assert_array_equal(_spliced(splice(token_ids, rows, _on_device(visual))), want)
    # a prompt of visual rows only (no text slot), and rows taken out of order
    only = np.array([[5, 0, 2, 1]], dtype=np.int64)
    np.testing.assert_array_equal(_spliced(splice(token_ids[:1, :4], only, _on_device(visual))),
                                  splice_numpy(table, token_ids[:1, :4], visual, only))
    assert not splice.applies(_on_device(visual), np.full((1, 4), -1))  # text only: nothing to splice
    assert not splice.applies(visual, rows)  # host rows take the host splice
    assert not splice.applies(_on_device(visual.astype(np.float64)), rows)


def test_sources_point_text_slots_past_the_visual_rows() -> None:
    source, text = sources(np.array([[7, 8, 9, 10]]), np.array([[-1, 1, 0, -1]]), visual_count=2)
    np.testing.assert_array_equal(source, [[2, 1, 0, 3]])
    np.testing.assert_array_equal(text, [7, 10])


class CountingSplice(DeviceSplice):
    calls = 0

    def __call__(self, *args):
        self.calls += 1
        return super().__call__(*args)


def _bound(session, text_rows: int) -> FixedRun:
    """The splice graph itself, bound at fixed shapes: a small session to exercise FixedRun with."""
    return FixedRun(session, _setup(), {"visual_rows": ((2, 4), np.float32), "text_rows": ((text_rows, 4), np.float32),
                                        "source_row": ((1, 3), np.int64)},
                    {"inputs_embeds": ((1, 3, 4), np.float32)}, device_outputs=frozenset({"inputs_embeds"}))


def test_a_handed_out_output_keeps_its_values_when_the_run_repeats() -> None:
    """A bound run rewrites its output buffers; a DeviceRows still held is copied to the host first."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    run = _bound(DeviceSplice(_setup(), table).session, 1)
    feeds = {"visual_rows": table[:2], "text_rows": table[2:3], "source_row": np.array([[2, 0, 1]])}
    first = run(feeds)["inputs_embeds"]
    assert isinstance(first, DeviceRows) and first.on_device is not None
    second = run({**feeds, "visual_rows": table[5:7]})["inputs_embeds"]
    assert first.on_device is None  # materialized before the second run wrote the buffer
    np.testing.assert_array_equal(np.asarray(first), table[[2, 0, 1]][None])
    np.testing.assert_array_equal(second.numpy(), table[[2, 5, 6]][None])


def test_an_input_filled_on_the_device_is_written_into_the_bound_buffer() -> None:
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    splice = DeviceSplice(_setup(), table)
    run = _bound(splice.session, 2)
    filled = SplicedEmbeds((2, 4), np.dtype(np.float32), lambda target: target.update_inplace(table[8:10]))
    got = run({"visual_rows": filled, "text_rows": table[:2], "source_row": np.array([[0, 3, 1]])})
    np.testing.assert_array_equal(got["inputs_embeds"].numpy(), table[[8, 1, 9]][None])


def test_static_pipeline_splicing_on_the_device_generates_the_same_logits(artifact_factory) -> None:
    """The vision graph bound with its embeddings left on the device and the prefill fed by the device splice give
    bit-identical logits, tokens and kept indices to the host splice; a second image encoded before the prefill
    moves the first one's rows to the host, which then takes the host splice."""
    artifact = artifact_factory(ratio=0.11, stages=2, kv_cache="static", attention="op")
    manifest = read_manifest(artifact)
    spec = manifest.graphs["vision"]
    host = Pipeline.load(artifact, backend="onnxruntime")
    device = Pipeline.load(artifact, backend="onnxruntime")
    backend = device.backend
    form = VisionSessionForm.of(backend.rewrites)  # both bound at a fixed batch (its float kernels differ from
    host.backend.graphed_vision = GraphedVision(artifact / spec.file, spec, _setup(), form)  # the plain session's)
    backend.graphed_vision = GraphedVision(artifact / spec.file, spec, _setup(), form, frozenset({VISUAL_EMBEDS}))
    backend.device_splice = splice = CountingSplice(backend.static.setup, backend.table)
    images, prompt = [make_image(3)], ["What is in the picture?"]
    want = _greedy(host, images, prompt, 4)
    got = _greedy(device, images, prompt, 4)
    assert splice.calls == 1  # the prefill took the device splice
    assert got["tokens"] == want["tokens"]
    np.testing.assert_array_equal(got["logits"], want["logits"])
    np.testing.assert_array_equal(np.asarray(got["keep"]), np.asarray(want["keep"]))
    # an encode between the first image's encode and its prefill: the first rows come back to the host first
    inputs = device.processor.vision_inputs(images)
    first = backend.encode(inputs)
    backend.encode(device.processor.vision_inputs([make_image(4)]))
    assert isinstance(first.embeds, DeviceRows) and first.embeds.on_device is None
    layout = device.processor.layout(prompt, inputs, first.keep_index, 4)
    np.testing.assert_array_equal(backend.prefill(layout, first), want["logits"][0])
    assert splice.calls == 1  # the host splice this time
