"""apet-build: TensorRT-RTX AOT builds, the TensorRT/RTX shim, profiles, trtexec lines and parsing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import pytest

from apet.contracts.files import REPORT_NAME
from apet.engines.api import TrtApi, load_api
from apet.engines.build import BuildConfig, build_artifact
from apet.engines.profiles import ShapeLimits, llm_profiles, vision_profiles
from apet.engines.trtexec import (
    build_command,
    profiling_runs,
    report,
    summarize_times,
    top_layers,
    write_trtexec_script,
)
from apet.errors import ArtifactError, BackendError, UsageError
from apet.manifest import read_manifest


@pytest.fixture(scope="module")
def built_artifact(artifact_factory, rtx_api, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fp16 two-stage tiny artifact with TensorRT-RTX engines (copied: tests below modify it)."""
    target = tmp_path_factory.mktemp("built") / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2, dtype="fp16"), target)
    build_artifact(BuildConfig(artifact=target, compute_capabilities=("sm86",), max_context=512), api=rtx_api)
    return target


@pytest.mark.trt
def test_aot_build_writes_engines_and_report(built_artifact: Path) -> None:
    manifest = read_manifest(built_artifact)
    report_data = json.loads((built_artifact / REPORT_NAME).read_text())
    assert report_data["builder"] == "tensorrt-rtx" and report_data["version"]
    assert report_data["limits"] == {"max_batch": 4, "max_context": 512, "max_prompt": 512}
    for name, plan in (("vision", "vision.plan"), ("llm", "llm.plan")):
        engine = report_data["engines"][name]
        assert (built_artifact / plan).stat().st_size == engine["bytes"] > 10_000
        assert engine["num_layers"] > 100 and engine["compute_capabilities"] == ["SM86"]
    vision = report_data["engines"]["vision"]["profiles"]
    assert vision == [{"name": "vision", "shapes": {"pixel_values": [[1, 3, 224, 224], [1, 3, 224, 224],
                                                                     [4, 3, 224, 224]]}}]
    prefill, decode = report_data["engines"]["llm"]["profiles"]
    k1, removed = manifest.visual_tokens, manifest.removed_at_stage2()
    assert prefill["shapes"]["inputs_embeds"] == [[1, k1 + 1, 64], [1, k1 + 40, 64], [4, 512, 64]]
    assert prefill["shapes"]["past_key.3"][2] == [4, 2, 0, 16]
    assert decode["shapes"]["inputs_embeds"][2] == [4, 1, 64]
    assert decode["shapes"]["past_key.0"][2] == [4, 2, 511, 16]
    assert decode["shapes"]["past_value.3"][2] == [4, 2, 511 - removed, 16]
    assert decode["shapes"]["attention_mask"][2] == [4, 512]
    outputs = {o["name"]: o for o in report_data["engines"]["llm"]["outputs"]}
    assert outputs["logits"]["dtype"] == "half" and outputs["stage2_index"]["shape"] == [-1, 16]


@pytest.mark.trt
def test_rebuild_refuses_engines_of_another_export(built_artifact: Path, rtx_api) -> None:
    manifest_path = built_artifact / "manifest.json"
    original = manifest_path.read_text()
    data = json.loads(original)
    data["created"] = "another export"
    manifest_path.write_text(json.dumps(data))
    try:
        with pytest.raises(UsageError, match="another export"):
            build_artifact(BuildConfig(artifact=built_artifact, graphs=("vision",)), api=rtx_api)
    finally:
        manifest_path.write_text(original)


@pytest.mark.trt
def test_build_refuses_changed_onnx(artifact_factory, rtx_api, tmp_path: Path) -> None:
    target = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1, dtype="fp16"), target)
    model = onnx.load(str(target / "vision.onnx"))
    model.producer_name = "edited"
    onnx.save(model, str(target / "vision.onnx"))
    with pytest.raises(ArtifactError, match="vision.onnx changed after export"):
        build_artifact(BuildConfig(artifact=target, graphs=("vision",)), api=rtx_api)
    (target / "vision.onnx").unlink()
    with pytest.raises(ArtifactError, match="vision.onnx is missing"):
        build_artifact(BuildConfig(artifact=target, graphs=("vision",)), api=rtx_api)
    assert not (target / "vision.plan").exists()


@pytest.mark.trt
def test_unsupported_op_names_node_and_message(rtx_api, tmp_path: Path) -> None:
    from apet.engines.trt import Profile, build_engine

    graph = oh.make_graph(
        [oh.make_node("Relu", ["x"], ["y"], name="fine_relu"),
         oh.make_node("StringNormalizer", ["y"], ["z"], name="unsupported_here")], "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [2])])
    path = tmp_path / "bad.onnx"
    onnx.save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)]), str(path))
    with pytest.raises(ArtifactError) as info:
        build_engine(rtx_api, path, [Profile("p", {})])
    message = str(info.value)
    assert "unsupported_here" in message and "StringNormalizer" in message and "bad.onnx" in message


# -- the TensorRT / TensorRT-RTX shim --------------------------------------------------------------
def _fake_trt(bit: int) -> types.ModuleType:
    module = types.ModuleType("fake_trt")
    module.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=bit)
    module.__version__ = "10.3.0"
    return module


class _FakeConfig:
    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.num_compute_capabilities = 0

    def create_timing_cache(self, blob: bytes) -> str:
        self.calls.append(("create_timing_cache", blob))
        return "cache"

    def set_timing_cache(self, cache: str, ignore_mismatch: bool) -> None:
        self.calls.append(("set_timing_cache", cache, ignore_mismatch))

    def set_compute_capability(self, value: object, index: int) -> None:
        self.calls.append(("set_compute_capability", value, index))


def test_shim_strongly_typed_flag_is_looked_up_by_name(rtx_api) -> None:
    assert TrtApi("tensorrt", _fake_trt(1)).strongly_typed_flags() == 2  # TensorRT 10: bit 1
    assert rtx_api.strongly_typed_flags() == 1 << int(rtx_api.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED)


def test_shim_caches_and_targets_differ_by_flavour(rtx_api) -> None:
    trt_api = TrtApi("tensorrt", _fake_trt(1))
    config = _FakeConfig()
    assert trt_api.attach_timing_cache(config, b"blob") == "cache"
    assert config.calls == [("create_timing_cache", b"blob"), ("set_timing_cache", "cache", False)]
    assert rtx_api.attach_timing_cache(_FakeConfig(), b"") is None
    with pytest.raises(UsageError, match="only applies to TensorRT-RTX"):
        trt_api.set_compute_capabilities(config, ["sm86"])
    rtx_config = _FakeConfig()
    assert rtx_api.set_compute_capabilities(rtx_config, ["8.6", "sm_89", "SM120"]) == ["SM86", "SM89", "SM120"]
    assert rtx_config.num_compute_capabilities == 3 and len(rtx_config.calls) == 3
    with pytest.raises(UsageError, match="sm99"):
        rtx_api.set_compute_capabilities(_FakeConfig(), ["sm99"])


def test_missing_builder_names_the_pip_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def no_tensorrt(name: str, *args, **kwargs):
        if name in ("tensorrt", "tensorrt_rtx_bindings"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_tensorrt)
    with pytest.raises(BackendError) as info:
        load_api("auto")
    assert 'apet[trt]' in str(info.value) and 'apet[rtx]' in str(info.value) and info.value.exit_code == 5
    with pytest.raises(UsageError):
        load_api("onnxruntime")


# -- trtexec lines and parsing ---------------------------------------------------------------------
def test_trtexec_lines_follow_the_manifest(artifact_factory, tmp_path: Path) -> None:
    artifact = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2, dtype="fp16"), artifact)
    manifest = read_manifest(artifact)
    limits = ShapeLimits.from_manifest(manifest, max_context=512)
    script = write_trtexec_script(artifact, limits).read_text()
    assert script.startswith("#!/usr/bin/env bash") and "--stronglyTyped" in script
    build_llm = next(line for line in script.splitlines() if "--saveEngine=llm.plan" in line)
    assert build_llm.count("--minShapes=") == 2 and build_llm.count("--maxShapes=") == 2  # prefill + decode
    assert "inputs_embeds:1x41x64" in build_llm and "inputs_embeds:4x512x64" in build_llm
    runs = {run.name: run for run in profiling_runs(manifest, limits, artifact)}
    prefill = runs["prefill_80"]
    assert prefill.profile == 0 and prefill.shapes["inputs_embeds"] == (1, 80, 64)
    assert prefill.shapes["past_key.2"] == (1, 2, 0, 16)
    assert prefill.int_inputs["position_ids"].tolist() == [list(range(80))]
    decode = runs["decode_past128"]
    assert decode.profile == 1 and decode.shapes["attention_mask"] == (1, 129)
    assert decode.shapes["past_key.0"] == (1, 2, 128, 16) and decode.shapes["past_key.3"] == (1, 2, 104, 16)
    # the real count of the artifact's template before <image>: BOS + the vicuna_v1 system sentence + "USER:"
    from apet.models.prompt import PromptEncoder

    before = len(PromptEncoder(artifact, manifest.model).split("x")[0])
    assert before > 20 and decode.int_inputs["image_start"].tolist() == [before]
    for flag in ("--useCudaGraph", "--noDataTransfers", "--separateProfileRun", "--dumpProfile",
                 "--exportTimes=trtexec/decode_past128.times.json", "--exportProfile=", "--shapes=", "--profile=1",
                 "--loadInputs=position_ids:trtexec/inputs/decode_past128.position_ids.bin"):
        assert flag in script
    saved = np.fromfile(artifact / "trtexec/inputs/decode_past128.attention_mask.bin", dtype=np.int64)
    assert saved.tolist() == [1] * 129
    vision = vision_profiles(manifest, limits)
    assert build_command("v.onnx", "v.plan", vision)[4] == "--minShapes=pixel_values:1x3x224x224"
    assert len(llm_profiles(manifest, max_context=512)) == 2


def _write_trtexec_outputs(directory: Path) -> None:
    """Samples in trtexec's documented --exportTimes / --exportProfile formats."""
    directory.mkdir(parents=True)
    times = [{"startEnqMs": i * 2.0, "endEnqMs": i * 2.0 + 0.05, "startComputeMs": i * 2.0 + 0.01,
              "endComputeMs": i * 2.0 + 1.0 + i * 0.01, "startOutMs": 0, "endOutMs": 0, "inMs": 0,
              "computeMs": 0.99 + i * 0.01, "outMs": 0, "latencyMs": 1.0 + i * 0.01, "endToEndMs": 1.0 + i * 0.01}
             for i in range(11)]
    (directory / "decode_past128.times.json").write_text(json.dumps(times))
    profile = [{"count": 11}] + [{"name": f"layer_{i}", "timeMs": 11 * 0.01 * i, "averageMs": 0.01 * i,
                                  "medianMs": 0.01 * i, "percentage": float(i)} for i in range(15)]
    (directory / "decode_past128.profile.json").write_text(json.dumps(profile))


def test_trtexec_json_parsing(tmp_path: Path) -> None:
    _write_trtexec_outputs(tmp_path / "trtexec")
    summary = summarize_times(tmp_path / "trtexec/decode_past128.times.json")
    assert summary["inferences"] == 11
    assert summary["latency_median_ms"] == pytest.approx(1.05) and summary["latency_p90_ms"] == pytest.approx(1.09)
    assert summary["compute_median_ms"] == pytest.approx(1.04)
    layers = top_layers(tmp_path / "trtexec/decode_past128.profile.json")
    assert [layer["name"] for layer in layers] == [f"layer_{i}" for i in range(14, 4, -1)]
    table = report(tmp_path)
    assert "| decode_past128 | 1.050 | 1.090 | 1.040 |" in table and "`layer_14`" in table
    with pytest.raises(ArtifactError, match="no \\*.times.json"):
        report(tmp_path / "empty")


@pytest.mark.trt
def test_cli_build_and_emit_acceptance(artifact_factory, tmp_path: Path) -> None:
    artifact = tmp_path / "b"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2, dtype="fp16"), artifact)
    run = subprocess.run([sys.executable, "-m", "apet.cli", "build", str(artifact), "--backend", "tensorrt-rtx"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (artifact / "vision.plan").is_file() and (artifact / "llm.plan").is_file()
    assert (artifact / REPORT_NAME).is_file()
    emit = subprocess.run([sys.executable, "-m", "apet.cli", "build", str(artifact), "--emit-trtexec"],
                          capture_output=True, text=True)
    assert emit.returncode == 0 and (artifact / "trtexec.sh").is_file()
    inspect = subprocess.run([sys.executable, "-m", "apet.cli", "inspect", str(artifact)], capture_output=True,
                             text=True)
    assert inspect.returncode == 0 and "profile decode" in inspect.stdout and "stage2_index" in inspect.stdout
