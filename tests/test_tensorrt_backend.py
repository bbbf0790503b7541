"""The TensorRT backend as far as a CPU-only machine allows: binding shapes per step, profile
coverage, the checks that refuse foreign or stale engines, and the whole binding logic (device buffers,
ping-pong KV cache, profiles, splicing) against a stand-in TensorRT whose engines are the artifact's ONNX
graphs run by ONNX Runtime on an in-memory CUDA driver (tests/fake_cuda.py). Execution on a real GPU:
scripts/gpu_cuda_buffers.py tests the buffer layer there."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fake_cuda import FakeDriver, FakeTensorRT

from apet.contracts.files import ENGINE_FILES, REPORT_NAME, manifest_digest, sha256_file
from apet.cuda_memory import CudaDevice
from apet.engines.api import TrtApi
from apet.engines.build import BuildConfig, build_artifact
from apet.engines.profiles import llm_profiles
from apet.errors import ArtifactError, InputError
from apet.manifest import read_manifest, sign
from apet.runtime.backends.tensorrt import (
    DECODE_PROFILE,
    PREFILL_PROFILE,
    EngineLimits,
    StepShapes,
    TensorRTBackend,
    check_engines,
    set_shape,
    tensorrt_available,
)
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig


def test_step_shapes_equal_what_onnxruntime_produces(artifact_factory) -> None:
    """Run a two-stage request in ONNX Runtime and compare every present shape with StepShapes."""
    artifact = artifact_factory(ratio=0.11, stages=2)
    pipeline = Pipeline.load(artifact, backend="onnxruntime")
    manifest = pipeline.manifest
    backend = pipeline.backend
    prompts = ["What is in the picture?", "Describe it."]
    inputs = pipeline.processor.vision_inputs(["@demo", "@demo"])
    visual = backend.encode(inputs)
    layout = pipeline.processor.layout(prompts, inputs, visual.keep_index, 4)
    backend.prefill(layout, visual)
    batch, seq = layout.token_ids.shape
    prefill = StepShapes(manifest, batch, seq, 0)
    assert prefill.profile == PREFILL_PROFILE
    assert [tuple(v.shape()) for v in backend.past] == [prefill.outputs()[f"present_{k}.{i}"]
                                                        for i in range(4) for k in ("key", "value")]
    mask = np.concatenate([layout.attention_mask, np.ones((batch, 1), np.int64)], axis=1)
    backend.decode(np.array([5, 6]), mask, pipeline.processor.decode_positions(layout, mask))
    decode = StepShapes(manifest, batch, 1, seq)
    assert decode.profile == DECODE_PROFILE
    assert decode.inputs()["past_key.3"] == prefill.outputs()["present_key.3"]
    assert [tuple(v.shape()) for v in backend.past] == [decode.outputs()[f"present_{k}.{i}"]
                                                        for i in range(4) for k in ("key", "value")]
    assert decode.outputs()["logits"] == (batch, 1, 512) and decode.outputs()["stage2_index"] == (batch, 16)


def test_step_shapes_fall_inside_the_engine_profiles(artifact_factory) -> None:
    manifest = read_manifest(artifact_factory(ratio=0.11, stages=2, dtype="fp16"))
    prefill_profile, decode_profile = llm_profiles(manifest, max_context=512)
    for shapes, profile in ((StepShapes(manifest, 2, 100, 0), prefill_profile),
                            (StepShapes(manifest, 1, 1, 300), decode_profile),
                            (StepShapes(manifest, 4, 1, 511), decode_profile)):
        for name, shape in shapes.inputs().items():
            low, _, high = profile.shapes[name]
            assert all(lo <= s <= hi for lo, s, hi in zip(low, shape, high)), (name, shape, low, high)


@pytest.mark.trt
def test_engine_checks_refuse_foreign_or_stale_engines(artifact_factory, rtx_api, tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1, dtype="fp16"), artifact)
    build_artifact(BuildConfig(artifact=artifact, graphs=("vision",), compute_capabilities=("sm86",)), api=rtx_api)
    manifest = read_manifest(artifact)
    check_engines(artifact, manifest, rtx_api.kind, rtx_api.version)
    with pytest.raises(ArtifactError, match="built by tensorrt-rtx"):
        check_engines(artifact, manifest, "tensorrt", "10.3.0")
    plan = artifact / "vision.plan"
    original = plan.read_bytes()
    plan.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ArtifactError, match="changed after apet-build"):
        check_engines(artifact, manifest, rtx_api.kind, rtx_api.version)
    plan.write_bytes(original)
    data = json.loads((artifact / "manifest.json").read_text())
    data["created"] = "re-exported"
    (artifact / "manifest.json").write_text(json.dumps(sign(data)))
    with pytest.raises(ArtifactError, match="another export"):
        check_engines(artifact, read_manifest(artifact), rtx_api.kind, rtx_api.version)


def test_generation_config_validation() -> None:
    from apet.errors import UsageError

    for kwargs in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(UsageError):
            GenerationConfig(**kwargs)


def test_engine_limits_are_checked_before_any_work_and_name_the_flag() -> None:
    limits = EngineLimits(max_batch=2, max_context=512, max_prompt=200)
    limits.check(2, 200, 312)  # exactly fits
    with pytest.raises(InputError, match=r"prefill profile maximum 200.*--max-prompt 201"):
        limits.check(1, 201, 8)  # inside max_context, outside the prefill profile
    with pytest.raises(InputError, match=r"decode profile maximum 512.*--max-context 513"):
        limits.check(1, 200, 313)
    with pytest.raises(InputError, match=r"max batch 2.*--max-batch 3"):
        limits.check(3, 10, 1)
    assert EngineLimits.from_report({"limits": {"max_batch": 4, "max_context": 512, "max_prompt": 296}}) == \
        EngineLimits(4, 512, 296)
    with pytest.raises(ArtifactError, match="limits"):
        EngineLimits.from_report({})


def test_a_refused_binding_shape_is_an_error_not_ignored() -> None:
    class Context:  # TensorRT's set_input_shape returns False for a shape outside the profile; it does not raise
        def set_input_shape(self, name: str, shape: tuple) -> bool:
            return False

    with pytest.raises(InputError, match=r"inputs_embeds shape \(1, 600, 64\) is outside llm.plan"):
        set_shape(Context(), "inputs_embeds", (1, 600, 64), "llm.plan")


def test_pipeline_asks_the_backend_before_running_vision(artifact_factory) -> None:
    pipeline = Pipeline.load(artifact_factory(ratio=0.11, stages=1), backend="onnxruntime")
    backend, calls = pipeline.backend, []
    backend._encode = lambda arrays: calls.append("vision")  # must never run
    limits = EngineLimits(max_batch=4, max_context=1024, max_prompt=40)  # engines built with a short prefill
    backend.check_request = lambda batch, prompt, new: limits.check(batch, prompt, new)
    with pytest.raises(InputError, match="prefill profile maximum 40"):
        pipeline.generate("@demo", "Describe the image in detail, please.", max_new_tokens=4)
    assert calls == []


def _fake_engines(source: Path, tmp_path: Path, limits: dict | None = None) -> tuple[Path, FakeTensorRT, FakeDriver]:
    """A copy of ``source`` with plan files naming their graph and a build report that check_engines accepts."""
    artifact = tmp_path / "artifact"
    shutil.copytree(source, artifact)
    manifest = read_manifest(artifact)
    engines = {}
    for name, file in ENGINE_FILES.items():
        (artifact / file).write_bytes(name.encode())
        engines[name] = {"file": file, "sha256": sha256_file(artifact / file)}
    report = {"manifest_sha256": manifest_digest(artifact), "builder": "tensorrt", "version": "10.3.0-fake",
              "engines": engines, "limits": limits or {"max_batch": manifest.max_batch,
                                                       "max_context": manifest.max_context,
                                                       "max_prompt": manifest.max_context}}
    (artifact / REPORT_NAME).write_text(json.dumps(report))
    driver = FakeDriver()
    graphs = {name: artifact / manifest.graphs[name].file for name in ENGINE_FILES}
    return artifact, FakeTensorRT(graphs, driver), driver


@pytest.mark.parametrize("stages", [1, 2])
def test_tensorrt_backend_binds_like_onnxruntime_runs(artifact_factory, tmp_path: Path, stages: int) -> None:
    """Greedy tokens and kept indices through the TensorRT backend's buffers equal ONNX Runtime's: every
    step reads the past from one ping-pong buffer and writes the present into the other, at the right
    offsets and dtypes (a wrong view reads garbage: fresh fake device memory is 0xA5 bytes)."""
    artifact, trt, driver = _fake_engines(artifact_factory(ratio=0.11, stages=stages), tmp_path)
    manifest = read_manifest(artifact)
    reference = Pipeline.load(artifact, backend="onnxruntime")
    backend = TensorRTBackend(artifact, manifest, api=TrtApi("tensorrt", trt), cuda=CudaDevice(0, driver))
    pipeline = Pipeline(artifact, manifest, backend)
    config = GenerationConfig(max_new_tokens=6)
    prompts = ["What is in the picture?", "Describe it in detail, please."]
    for batch in ([0], [0, 1]):
        want = reference.generate_batch(["@demo"] * len(batch), [prompts[i] for i in batch], config)
        got = pipeline.generate_batch(["@demo"] * len(batch), [prompts[i] for i in batch], config)
        assert [r.token_ids for r in got] == [r.token_ids for r in want]
        assert [np.asarray(r.keep_index).tolist() for r in got] == [np.asarray(r.keep_index).tolist() for r in want]
        assert backend.cache_lengths() == reference.backend.cache_lengths()
    prefill, decode = trt.engines["llm"].contexts
    assert prefill.profile == PREFILL_PROFILE and decode.profile == DECODE_PROFILE
    assert all(run["inputs_embeds"][1] > 1 for run in prefill.runs)
    assert all(run["inputs_embeds"][1] == 1 for run in decode.runs) and len(decode.runs) == 2 * 5
    assert backend.peak_memory_bytes() >= 2 * len(backend.cache) * backend.cache["past_key.0"][0].nbytes
    backend.close()
    assert driver.memory == {}  # every device buffer was freed


def test_tensorrt_backend_ping_pong_matches_a_numpy_cache(artifact_factory, tmp_path: Path) -> None:
    """After each step the buffer the backend calls "current" holds exactly the present the engine wrote,
    and the other holds the step before's: a NumPy model of the cache over several steps."""
    artifact, trt, driver = _fake_engines(artifact_factory(ratio=0.11, stages=1), tmp_path)
    manifest = read_manifest(artifact)
    backend = TensorRTBackend(artifact, manifest, api=TrtApi("tensorrt", trt), cuda=CudaDevice(0, driver))
    pipeline = Pipeline(artifact, manifest, backend)
    simulated: dict[str, list[np.ndarray]] = {}  # the presents the engine returned, per layer, per step
    real_execute = {id(c): c.execute_async_v3 for c in trt.engines["llm"].contexts}

    def recording(context):
        def execute(stream: int) -> bool:
            outputs = context._compute()
            for name, value in outputs.items():
                if name.startswith("present_"):
                    simulated.setdefault(name, []).append(value.copy())
            return real_execute[id(context)](stream)
        return execute

    for context in trt.engines["llm"].contexts:
        context.execute_async_v3 = recording(context)
    pipeline.generate("@demo", "What is in the picture?", max_new_tokens=4)
    steps = len(simulated["present_key.0"])
    assert steps == 4 and backend.current == steps % 2
    for name, presents in simulated.items():
        buffers = backend.cache[name.replace("present_", "past_")]
        latest, before = presents[-1], presents[-2]
        assert np.array_equal(buffers[backend.current].view(latest.shape).download(), latest)
        assert np.array_equal(buffers[1 - backend.current].view(before.shape).download(), before)
        # the past each step read is the present of the step before
        assert np.array_equal(before, latest[:, :, :before.shape[2]])


def test_tensorrt_available_asks_the_driver_not_torch(artifact_factory, tmp_path: Path, monkeypatch) -> None:
    artifact, _, _ = _fake_engines(artifact_factory(ratio=0.11, stages=1), tmp_path)
    import apet.engines.api as api

    monkeypatch.setattr(api, "find_tensorrt", lambda: "tensorrt")
    assert tensorrt_available(artifact, driver=FakeDriver(devices=1))
    assert not tensorrt_available(artifact, driver=FakeDriver(devices=0))
    assert not tensorrt_available(artifact, driver=FakeDriver(libcuda=False))
    monkeypatch.setattr(api, "find_tensorrt", lambda: None)
    assert not tensorrt_available(artifact, driver=FakeDriver(devices=1))
    (artifact / REPORT_NAME).unlink()
    monkeypatch.setattr(api, "find_tensorrt", lambda: "tensorrt")
    assert not tensorrt_available(artifact, driver=FakeDriver(devices=1))


def test_the_cache_is_sized_by_the_engines_limits(artifact_factory, tmp_path: Path) -> None:
    """apet-build --max-batch 1 --max-context 300 shrinks the runtime's KV cache too (what makes it fit)."""
    limits = {"max_batch": 1, "max_context": 300, "max_prompt": 280}
    artifact, trt, driver = _fake_engines(artifact_factory(ratio=0.11, stages=1), tmp_path, limits)
    manifest = read_manifest(artifact)
    backend = TensorRTBackend(artifact, manifest, api=TrtApi("tensorrt", trt), cuda=CudaDevice(0, driver))
    decoder = manifest.model.decoder
    assert manifest.max_batch > 1 and manifest.max_context > 300
    for buffers in backend.cache.values():
        assert [b.shape for b in buffers] == [(1 * decoder.num_kv_heads * 300 * decoder.head_dim,)] * 2
    result = Pipeline(artifact, manifest, backend).generate("@demo", "What is in the picture?", max_new_tokens=3)
    want = Pipeline.load(artifact, backend="onnxruntime").generate("@demo", "What is in the picture?",
                                                                   max_new_tokens=3)
    assert result.token_ids == want.token_ids
