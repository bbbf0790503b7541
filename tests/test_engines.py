"""apet-build: TensorRT-RTX AOT builds, the TensorRT/RTX shim, profiles, trtexec lines and parsing."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import onnx
import onnx.helper as oh
import pytest

from apet.contracts.files import REPORT_NAME
from apet.engines.api import TrtApi, load_api
from apet.engines.build import BuildConfig, build_artifact
from apet.errors import ArtifactError, BackendError, MissingExtraError, UsageError
from apet.manifest import read_manifest, sign


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
def test_report_and_inspect_count_what_the_engine_sees(built_artifact: Path) -> None:
    """Per scope: ONNX nodes, parsed TensorRT layers (every one attributed), and engine layers after fusion only
    where a GPU ran the plan (none here: the build is ahead of time on a CPU)."""
    from apet.contracts.onnx_graph import nodes_by_stage
    from apet.cuda_memory import cuda_device_count
    from apet.inspect_artifact import inspect

    engines = json.loads((built_artifact / REPORT_NAME).read_text())["engines"]
    text = inspect(built_artifact)
    for name, scope in (("vision", "apet_stage1"), ("llm", "apet_stage2")):
        engine = engines[name]
        assert engine["onnx_nodes"] == nodes_by_stage(built_artifact / f"{name}.onnx")
        assert sum(engine["parsed_layers"].values()) == engine["num_layers"]
        assert 0 < engine["parsed_layers"][scope] < engine["num_layers"]
        if cuda_device_count() == 0:
            assert engine["engine_layers"] is None
        nodes, layers = engine["onnx_nodes"][scope], engine["parsed_layers"][scope]
        assert f"{scope:<14}{nodes:>7} /{layers:>7} /" in text
    assert "engine layers: recorded only by an apet-build on a GPU" in text or cuda_device_count() > 0


def test_engine_layers_are_counted_per_scope_from_the_inspector() -> None:
    from apet.engines.layer_counts import engine_layers_by_stage

    info = {"Layers": [{"Name": "/vision/embeddings/patch_embedding/Conv"},
                       {"Name": "{ForeignNode[/apet_stage1/Cast.../apet_stage1/TopK]}"},
                       {"Name": "/apet_stage1/MatMul + /apet_stage1/Div"},
                       {"Name": "/layers.0/self_attn/MatMul + /layers.1/mlp/Mul"},
                       {"Name": "Reformatting CopyNode for Output Tensor 0 to /projector/Gather"},
                       {"Name": "__myl_Cast_123"}]}
    assert engine_layers_by_stage(json.dumps(info)) == {"vision": 1, "apet_stage1": 2, "llm layers": 1,
                                                        "projector": 1, "other": 1}
    assert engine_layers_by_stage(json.dumps({"Layers": ["/apet_stage2/TopK", "x"]})) == {"apet_stage2": 1,
                                                                                      "other": 1}


@pytest.mark.trt
def test_rebuild_refuses_engines_of_another_export(built_artifact: Path, rtx_api) -> None:
    manifest_path = built_artifact / "manifest.json"
    original = manifest_path.read_text()
    data = json.loads(original)
    data["created"] = "another export"
    manifest_path.write_text(json.dumps(sign(data)))  # a genuine re-export: a different, valid manifest
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
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_tensorrt)
    with pytest.raises(MissingExtraError) as info:  # not installed: exit 7 (installed but broken: BackendError, 5)
        load_api("auto")
    assert 'apet[trt]' in str(info.value) and 'apet[rtx]' in str(info.value) and info.value.exit_code == 7
    with pytest.raises(UsageError):
        load_api("onnxruntime")


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


# -- all-or-nothing, interruptible builds ------------------------------------------------------------
def _snapshot(artifact: Path) -> dict[str, tuple[int, bytes]]:
    """Inode and content of the files a build writes."""
    return {name: ((artifact / name).stat().st_ino, (artifact / name).read_bytes())
            for name in ("vision.plan", "llm.plan", REPORT_NAME)}


@pytest.mark.trt
def test_signals_during_apet_build_leave_previous_engines(built_artifact: Path, tmp_path: Path) -> None:
    """Ctrl-C and SIGTERM sent to a real apet-build mid-build: exit 130 within seconds, engines and report
    exactly as before, no scratch left (TensorRT-RTX's logger would otherwise swallow the Ctrl-C)."""
    artifact = tmp_path / "artifact"
    shutil.copytree(built_artifact, artifact)
    before = _snapshot(artifact)
    for sig in (signal.SIGINT, signal.SIGTERM):
        process = subprocess.Popen([sys.executable, "-m", "apet.cli", "build", str(artifact), "--backend",
                                    "tensorrt-rtx", "--overwrite", "--max-context", "512"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not list(artifact.glob(".apet-tmp-*")) and time.time() < deadline:
            time.sleep(0.05)  # the staging directory inside the artifact exists: the build is starting
        time.sleep(1.0)
        assert process.poll() is None, "the build finished before the signal"
        process.send_signal(sig)
        sent = time.time()
        _out, err = process.communicate(timeout=120)
        assert process.returncode == 130, err
        assert time.time() - sent < 15 and "interrupted" in err and "Traceback" not in err
        assert _snapshot(artifact) == before
        assert not list(artifact.glob(".apet-*")) and not list(tmp_path.glob(".artifact.apet-tmp-*"))


@pytest.mark.trt
def test_failed_build_changes_nothing(built_artifact: Path, rtx_api, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The vision engine builds, the LLM engine fails: vision.plan must not be replaced either."""
    from apet.engines import build as build_module

    artifact = tmp_path / "artifact"
    shutil.copytree(built_artifact, artifact)
    before = _snapshot(artifact)
    real = build_module.build_engine

    def failing_llm(api, onnx_path, *args, **kwargs):
        if Path(onnx_path).name == "llm.onnx":
            raise BackendError("tensorrt-rtx failed to build llm.onnx: out of memory", "more --workspace")
        return real(api, onnx_path, *args, **kwargs)

    monkeypatch.setattr(build_module, "build_engine", failing_llm)
    with pytest.raises(BackendError):
        build_artifact(BuildConfig(artifact=artifact, overwrite=True, max_context=256), api=rtx_api)
    assert _snapshot(artifact) == before and not list(artifact.glob(".apet-*"))


# -- apet inspect verifies -----------------------------------------------------------------------------
def _inspect(artifact: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "apet.cli", "inspect", str(artifact)], capture_output=True,
                          text=True)


@pytest.mark.trt
def test_inspect_verifies_files_manifest_graphs_and_engines(built_artifact: Path, tmp_path: Path) -> None:
    good = _inspect(built_artifact)
    assert good.returncode == 0 and "verified" in good.stdout, good.stderr

    def broken(name: str, damage) -> subprocess.CompletedProcess:
        target = tmp_path / name
        shutil.copytree(built_artifact, target)
        damage(target)
        return _inspect(target)

    def edit_manifest(target: Path) -> None:
        data = json.loads((target / "manifest.json").read_text())
        data["max_batch"] = 64
        (target / "manifest.json").write_text(json.dumps(data))

    def resigned_io(target: Path) -> None:  # a consistent-looking manifest whose graph I/O was changed
        data = json.loads((target / "manifest.json").read_text())
        data["graphs"]["vision"]["outputs"][0]["shape"][1] = 999
        (target / "manifest.json").write_text(json.dumps(sign(data)))

    cases = {
        "edited": (edit_manifest, "digest"),
        "truncated": (lambda t: (t / "llm.onnx").write_bytes((t / "llm.onnx").read_bytes()[:1000]), "llm.onnx"),
        "io": (resigned_io, "outputs differ"),
        "foreign": (lambda t: shutil.copy(t / "vision.plan", t / "llm.plan"), "llm.plan changed after apet-build"),
        "stale": (lambda t: (t / REPORT_NAME).unlink(), "not recorded"),
    }
    for name, (damage, words) in cases.items():
        result = broken(name, damage)
        assert result.returncode == 4 and words in result.stderr and "Traceback" not in result.stderr, \
            (name, result.stderr)
