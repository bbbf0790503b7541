"""``apet triton``: the model repository it writes, checked without a Triton server (docs/triton.md).

Every ``config.pbtxt`` is parsed with Triton's own schema (``model_config_pb2`` from the tritonclient wheel) and
compared with the manifest's graph I/O; the repository's Python models (``1/model.py``, as Triton imports them)
run against a stand-in for ``triton_python_backend_utils`` (tests/fake_pb_utils.py), with the generation model's
BLS call reaching the real Python vision model, and answer what ``Pipeline.generate`` (ONNX Runtime) answers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import fake_pb_utils
import numpy as np
import onnxruntime
import pytest
from google.protobuf import json_format, text_format

from apet.cli import main
from apet.errors import ArtifactError
from apet.manifest import read_manifest
from apet.runtime.pipeline import Pipeline
from apet.triton.configs import GENERATION_MODEL, VISION_MODEL, Scaling
from apet.triton.repository import write_repository

PROMPT = "What is in the picture?"
TOKENS = 6
FAMILIES = ["llava", "llava-next", "qwen2_5_vl", "video-llava", "qwen3_vl", "internvl"]


def _model_config_pb2() -> ModuleType:
    """Triton's ModelConfig schema as the tritonclient wheel ships it, loaded from its file: the package's
    ``grpc`` __init__ would also import grpcio, which the schema does not need."""
    spec = importlib.util.find_spec("tritonclient")
    assert spec is not None and spec.submodule_search_locations, "pip install tritonclient (apet[dev])"
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    module_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


PB2 = _model_config_pb2()


def parse(model_dir: Path) -> Any:
    return text_format.Parse((model_dir / "config.pbtxt").read_text(), PB2.ModelConfig())


@pytest.fixture(scope="module")
def media_bytes(media: dict[str, Path]) -> dict[str, bytes]:
    """The shared media files (conftest.py) as the bytes a Triton client sends."""
    return {kind: media[kind].read_bytes() for kind in ("image", "video", "bad")}


def _kind(family: str) -> str:
    return "video" if family == "video-llava" else "image"


def _linked_copy(artifact: Path, target: Path) -> Path:
    """The artifact's files hard-linked into ``target`` (a test may add files there without touching the
    session's artifact; files are replaced, never edited in place)."""
    shutil.copytree(artifact, target, copy_function=os.link)
    return target


# -- config.pbtxt against Triton's schema and the manifest ------------------------------------------------------
EXPECTED_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32"}


def _expected_tensors(specs: list[dict], batched: bool) -> list[tuple[str, int, list[int]]]:
    return [(s["name"], PB2.DataType.Value(EXPECTED_TYPES[s["dtype"]]),
             [d if isinstance(d, int) else -1 for d in (s["shape"][1:] if batched else s["shape"])]) for s in specs]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["tensorrt_plan", "onnxruntime_onnx", "python"])
def test_vision_config_parses_and_matches_the_manifest(family, form, family_artifacts, tmp_path) -> None:
    artifact = _linked_copy(family_artifacts[family], tmp_path / "artifact")
    if form == "tensorrt_plan":
        (artifact / "vision.plan").write_bytes(b"not an engine: only the config is checked here")
    manifest = read_manifest(artifact)
    report = write_repository(artifact, tmp_path / "repo", Scaling(instances=3, max_batch=1, gpus=(0, 1)), form)
    assert report.vision_form == form
    config = parse(tmp_path / "repo" / VISION_MODEL)
    graph = manifest.graphs["vision"]
    batched = all(s["shape"][0] == "batch" for s in graph.inputs + graph.outputs)
    assert config.name == VISION_MODEL
    assert (config.platform, config.backend) == ((form, "") if form != "python" else ("", "python"))
    assert config.max_batch_size == (1 if batched else 0)
    assert config.HasField("dynamic_batching") == batched
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == _expected_tensors(graph.inputs, batched)
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == _expected_tensors(graph.outputs, batched)
    assert [(g.count, g.kind, list(g.gpus)) for g in config.instance_group] == \
        [(3, PB2.ModelInstanceGroup.KIND_GPU, [0, 1])]
    model_file = {"tensorrt_plan": "model.plan", "onnxruntime_onnx": "model.onnx", "python": "model.py"}[form]
    assert (tmp_path / "repo" / VISION_MODEL / "1" / model_file).is_file()
    if form == "python":
        assert config.parameters["sha256"].string_value == manifest.checksums[graph.file]


def test_generation_config_parses_with_the_client_interface(family_artifacts, tmp_path) -> None:
    artifact = family_artifacts["llava"]
    write_repository(artifact, tmp_path / "repo", Scaling(instances=2), "onnxruntime_onnx")
    config = parse(tmp_path / "repo" / GENERATION_MODEL)
    assert (config.backend, config.max_batch_size, config.model_transaction_policy.decoupled) == ("python", 0, True)
    string, i64 = PB2.DataType.Value("TYPE_STRING"), PB2.DataType.Value("TYPE_INT64")
    assert [(t.name, t.data_type, list(t.dims), t.optional) for t in config.input] == [
        ("prompt", string, [1], False), ("image", string, [1], True), ("video", string, [1], True),
        ("max_tokens", PB2.DataType.Value("TYPE_INT32"), [1], True), ("temperature", PB2.DataType.Value("TYPE_FP32"),
                                                                      [1], True),
        ("top_p", PB2.DataType.Value("TYPE_FP32"), [1], True), ("seed", i64, [1], True),
        ("stream", PB2.DataType.Value("TYPE_BOOL"), [1], True)]
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("text", string, [1]), ("token_ids", i64, [-1]), ("keep_index", i64, [-1, -1]), ("prompt_tokens", i64, [1]),
        ("completion_tokens", i64, [1]), ("finish_reason", string, [1])]
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, PB2.ModelInstanceGroup.KIND_CPU)]
    assert config.parameters["manifest_digest"].string_value == read_manifest(artifact).digest
    assert config.parameters["vision_model"].string_value == VISION_MODEL
    copied = tmp_path / "repo" / GENERATION_MODEL / "1" / "artifact"
    assert sorted(p.name for p in copied.iterdir()) == sorted(["manifest.json", *read_manifest(artifact).files()])


def test_cli_writes_a_repository_and_refuses_a_too_large_batch(family_artifacts, tmp_path, capsys) -> None:
    artifact = family_artifacts["llava"]
    assert main(["triton", str(artifact), "--out", str(tmp_path / "repo"), "--instances", "2", "--gpus", "1"]) == 0
    assert "tritonserver --model-repository" in capsys.readouterr().out
    group = parse(tmp_path / "repo" / VISION_MODEL).instance_group[0]
    assert (group.count, list(group.gpus)) == (2, [1])
    too_big = read_manifest(artifact).max_batch + 1
    assert main(["triton", str(artifact), "--out", str(tmp_path / "other"), "--max-batch", str(too_big)]) == 2
    assert "max batch" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


# -- the Python models against a stand-in of Triton's module ----------------------------------------------------
@pytest.fixture
def pb(monkeypatch) -> ModuleType:
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils)
    fake_pb_utils.MODELS.clear()
    fake_pb_utils.BLS_CALLS.clear()
    yield fake_pb_utils
    fake_pb_utils.MODELS.clear()


def load_model(repo: Path, name: str, kind: str = "CPU") -> Any:
    """What Triton does: import ``1/model.py`` and initialize its TritonPythonModel with the config as JSON."""
    config = json_format.MessageToDict(parse(repo / name), preserving_proto_field_name=True)
    spec = importlib.util.spec_from_file_location(f"triton_repo_{name}", repo / name / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_repository": str(repo / name),
                      "model_version": "1", "model_name": name, "model_instance_kind": kind,
                      "model_instance_device_id": "0"})
    return model


def serve(repo: Path) -> Any:
    """Both models loaded, the vision model reachable by BLS; returns the generation model."""
    fake_pb_utils.MODELS[VISION_MODEL] = load_model(repo, VISION_MODEL)
    return load_model(repo, GENERATION_MODEL)


def ask(model: Any, **inputs: Any) -> list[tuple[Any, int]]:
    tensors = []
    for name, value in inputs.items():
        if isinstance(value, (bytes, str)):
            array = np.array([value.encode() if isinstance(value, str) else value], dtype=np.object_)
        else:
            array = np.array([value])
        tensors.append(fake_pb_utils.Tensor(name, array))
    request = fake_pb_utils.InferenceRequest(inputs=tensors)
    assert model.execute([request]) is None  # decoupled: answers go through the sender
    sent = request.sender.sent
    assert sent and sent[-1][1] == fake_pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
    assert all(flags == 0 for _, flags in sent[:-1])
    return sent


def outputs(response: Any) -> dict[str, np.ndarray]:
    assert not response.has_error(), response.error().message()
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_model_answers_as_the_pipeline(family, family_artifacts, media, media_bytes, pb, tmp_path) -> None:
    artifact, kind = family_artifacts[family], _kind(family)
    write_repository(artifact, tmp_path / "repo", vision_form="python")
    model = serve(tmp_path / "repo")

    reference = Pipeline.load(artifact, backend="onnxruntime")
    if kind == "video":
        expected = reference.generate(video=str(media["video"]), prompt=PROMPT, max_new_tokens=TOKENS)
    else:
        expected = reference.generate(media_bytes["image"], PROMPT, max_new_tokens=TOKENS)

    sent = ask(model, prompt=PROMPT, **{kind: media_bytes[kind]}, max_tokens=np.int32(TOKENS))
    assert len(sent) == 1
    answer = outputs(sent[0][0])
    assert answer["token_ids"].tolist() == expected.token_ids
    keep = np.asarray(expected.keep_index)
    assert answer["keep_index"].tolist() == (keep.reshape(1, -1) if keep.ndim == 1 else keep).tolist()
    assert answer["text"][0].decode() == expected.text
    assert answer["completion_tokens"].tolist() == [len(expected.token_ids)]
    assert answer["prompt_tokens"].tolist() == [expected.stats.prompt_tokens[0]]
    assert answer["finish_reason"][0].decode() == expected.finish_reason
    assert fake_pb_utils.BLS_CALLS and set(fake_pb_utils.BLS_CALLS) == {VISION_MODEL}  # vision ran through BLS

    streamed = ask(model, prompt=PROMPT, **{kind: media_bytes[kind]}, max_tokens=np.int32(TOKENS), stream=True)
    pieces = [outputs(r)["text"][0].decode() for r, _ in streamed]
    assert "".join(pieces) == expected.text
    assert pieces[-1] == "" and outputs(streamed[-1][0])["token_ids"].tolist() == expected.token_ids


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(),
                    reason="this ONNX Runtime has its CUDA provider")
def test_python_vision_model_on_a_gpu_instance_says_why_it_runs_on_the_cpu(family_artifacts, pb, tmp_path,
                                                                           caplog) -> None:
    write_repository(family_artifacts["llava"], tmp_path / "repo", vision_form="python")
    with caplog.at_level(logging.WARNING, logger="apet.triton.vision_model"):
        model = load_model(tmp_path / "repo", VISION_MODEL, kind="GPU")
    assert model.session.get_providers() == ["CPUExecutionProvider"]
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert "runs on the CPU" in warning and "no CUDAExecutionProvider" in warning
    assert "pip install onnxruntime-gpu" in warning


def test_errors_are_triton_errors_and_the_model_keeps_serving(family_artifacts, media_bytes, pb, tmp_path) -> None:
    artifact = family_artifacts["llava"]
    write_repository(artifact, tmp_path / "repo", vision_form="python")
    model = serve(tmp_path / "repo")

    def error(**inputs: Any) -> str:
        sent = ask(model, **inputs)
        assert len(sent) == 1 and sent[0][0].has_error()
        return sent[0][0].error().message()

    bad = error(prompt=PROMPT, image=media_bytes["bad"], max_tokens=np.int32(2))
    assert "uploaded bytes" in bad and "JPEG" in bad
    manifest = read_manifest(artifact)
    long = error(prompt="word " * (manifest.max_context + 10), image=media_bytes["image"], max_tokens=np.int32(2))
    assert str(manifest.max_context) in long
    assert "exactly one of image and video" in error(prompt=PROMPT, max_tokens=np.int32(2))
    assert "max_tokens 0" in error(prompt=PROMPT, image=media_bytes["image"], max_tokens=np.int32(0))
    answer = outputs(ask(model, prompt=PROMPT, image=media_bytes["image"], max_tokens=np.int32(2))[0][0])
    assert len(answer["token_ids"]) >= 1


def _flip_one_byte(path: Path) -> None:
    """Replace ``path`` with a copy differing in one byte (a new file: hard links elsewhere keep the original)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.unlink()
    path.write_bytes(bytes(data))


def test_a_tampered_artifact_refuses_to_load(family_artifacts, pb, tmp_path) -> None:
    artifact = family_artifacts["llava"]
    write_repository(artifact, tmp_path / "repo", vision_form="python")
    repo = tmp_path / "repo"
    original = read_manifest(artifact).checksums["vision.onnx"]
    _flip_one_byte(repo / GENERATION_MODEL / "1" / "artifact" / "vision.onnx")
    with pytest.raises(ArtifactError, match=rf"vision.onnx failed its digest check: sha256 [0-9a-f]{{64}}, "
                                            rf"the manifest lists {original}"):
        load_model(repo, GENERATION_MODEL)
    _flip_one_byte(repo / VISION_MODEL / "1" / "model.onnx")
    with pytest.raises(ArtifactError, match=rf"model.onnx failed its digest check: .* lists {original}"):
        load_model(repo, VISION_MODEL)
    assert read_manifest(artifact, verify_checksums=True).checksums["vision.onnx"] == original  # source untouched


def test_a_repository_for_another_artifact_refuses_to_load(family_artifacts, pb, tmp_path) -> None:
    write_repository(family_artifacts["llava"], tmp_path / "repo", vision_form="python")
    copied = tmp_path / "repo" / GENERATION_MODEL / "1" / "artifact"
    shutil.rmtree(copied)
    _linked_copy(family_artifacts["qwen2_5_vl"], copied)
    with pytest.raises(ArtifactError, match="manifest digest .* is not .* the one this repository was written for"):
        load_model(tmp_path / "repo", GENERATION_MODEL)
