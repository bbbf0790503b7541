"""The TensorRT backend as far as a CPU-only machine allows: binding shapes per step, profile
coverage, and the checks that refuse foreign or stale engines. Execution itself needs a GPU
that the engines target (TensorRT-RTX engines do not run on the H100 either)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from apet.engines.build import BuildConfig, build_artifact
from apet.engines.profiles import llm_profiles
from apet.errors import ArtifactError, InputError
from apet.manifest import read_manifest, sign
from apet.runtime.backends.tensorrt import (
    DECODE_PROFILE,
    PREFILL_PROFILE,
    EngineLimits,
    StepShapes,
    check_engines,
    set_shape,
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
