"""Vision graph export: tiny LLaVA checkpoint -> vision.onnx, against PyTorch and NumPy (docs/algorithm.md, check 2)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy_reference as ref
import onnx
import onnxruntime as ort
import pytest
import torch

from apet.compression import compress
from apet.errors import ArtifactError, UsageError
from apet.manifest import SCHEMA_VERSION, manifest_from_json, read_manifest


def _pixels(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _torch_pipeline(adapter, pixels: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        features = adapter.vision_features(pixels)
        kept = compress(features, keep=keep)
        return adapter.project(kept.tokens), kept.index


def test_tiny_checkpoint_loads_with_plain_transformers(tiny_checkpoint: Path) -> None:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    assert model.config.vision_config.image_size // model.config.vision_config.patch_size == 16  # 256 tokens
    assert model.config.text_config.num_key_value_heads < model.config.text_config.num_attention_heads  # GQA
    ids = processor.tokenizer("USER: <image>\nWhat is this? ASSISTANT:").input_ids
    assert ids[0] == processor.tokenizer.bos_token_id and model.config.image_token_index in ids
    assert (tiny_checkpoint / "model.safetensors").is_file()


def test_adapter_features_equal_hugging_face(tiny_adapter) -> None:
    pixels = _pixels(2, 0)
    with torch.no_grad():
        ours = tiny_adapter.vision_features(pixels)
        hf = tiny_adapter.model.model.get_image_features(pixels, vision_feature_layer=-2,
                                                         vision_feature_select_strategy="default",
                                                         output_hidden_states=True)
    torch.testing.assert_close(ours, hf.hidden_states[-2][:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(tiny_adapter.project(ours), torch.stack(hf.pooler_output), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ratio", [0.11, 0.33, 1.0])
@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_pipeline(artifact_factory, tiny_adapter, ratio: float, batch: int) -> None:
    artifact = artifact_factory(ratio=ratio, stages=1)
    manifest = read_manifest(artifact, verify_checksums=True)
    keep = manifest.compression.stage1_keep
    assert keep == {0.11: 32, 0.33: 88, 1.0: 256}[ratio]
    pixels = _pixels(batch, seed=batch)
    session = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"])
    embeds, index = session.run(None, {"pixel_values": pixels.numpy()})
    want_embeds, want_index = _torch_pipeline(tiny_adapter, pixels, keep)
    np.testing.assert_array_equal(index, want_index.numpy())
    assert index.shape == (batch, keep) and (np.diff(index, axis=1) > 0).all()
    np.testing.assert_allclose(embeds, want_embeds.numpy(), rtol=1e-4, atol=1e-4 * float(want_embeds.abs().max()))
    if ratio == 1.0:
        assert (index == np.arange(256)).all()


def test_keep_index_equals_numpy_reference(artifact_factory, tiny_adapter) -> None:
    artifact = artifact_factory(ratio=0.11, stages=1)
    pixels = _pixels(2, seed=7)
    _, index = ort.InferenceSession(str(artifact / "vision.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": pixels.numpy()})
    with torch.no_grad():
        features = tiny_adapter.vision_features(pixels).double().numpy()
    _, want = ref.compress(features, 32, 10)
    np.testing.assert_array_equal(index, want)


def test_vision_graph_has_static_budget_and_checks(artifact_factory) -> None:
    artifact = artifact_factory(ratio=0.11, stages=1)
    onnx.checker.check_model(str(artifact / "vision.onnx"), full_check=True)
    model = onnx.load(str(artifact / "vision.onnx"))
    outputs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outputs == {"visual_embeds": ["batch", 32, 64], "keep_index": ["batch", 32]}
    assert not {"Loop", "If", "Scan"} & {n.op_type for n in model.graph.node}


@pytest.mark.trt
def test_fp16_vision_builds_with_tensorrt_rtx(artifact_factory, rtx_api) -> None:
    from apet.engines.trt import BuildOptions, Profile, build_engine

    artifact = artifact_factory(ratio=0.11, stages=2, dtype="fp16")
    manifest = read_manifest(artifact)
    assert manifest.dtype == "fp16" and manifest.graphs["vision"].inputs[0]["dtype"] == "float16"
    shape = (3, 224, 224)
    profile = Profile("vision", {"pixel_values": ((1, *shape), (1, *shape), (manifest.max_batch, *shape))})
    built = build_engine(rtx_api, artifact / "vision.onnx", [profile], BuildOptions(compute_capabilities=("sm86",)))
    assert built.inputs[0]["dtype"] == "half" and built.inputs[0]["shape"] == [-1, *shape]
    assert built.outputs[0]["shape"] == [-1, 40, 64] and built.outputs[1]["dtype"] == "int64"


def test_manifest_round_trip_and_validation(artifact_factory) -> None:
    artifact = artifact_factory(ratio=0.11, stages=1)
    data = json.loads((artifact / "manifest.json").read_text())
    manifest = manifest_from_json(data)
    assert json.loads(json.dumps(manifest.to_json())) == data
    assert data["schema_version"] == SCHEMA_VERSION and data["model"]["n_tokens"] == 256
    assert data["compression"]["stage1"]["keep"] == 32 and data["compression"]["stage2"] is None
    assert data["compression"]["stage1"]["placement"] == "mask" and data["compression"]["basis_placement"] == "paper"
    assert set(manifest.files()) <= set(data["checksums"])
    for bad, words in [({**data, "schema_version": 99}, "schema_version 99"),
                       ({**data, "max_batch": "four"}, "max_batch"),
                       ({k: v for k, v in data.items() if k != "graphs"}, "graphs"),
                       ({**data, "text_assets": ["../../etc/passwd"]}, "escapes"),
                       ({**data, "graphs": {"vision": {**data["graphs"]["vision"], "file": "/etc/passwd"}}},
                        "escapes")]:
        with pytest.raises(ArtifactError, match=words.replace("(", r"\(")):
            manifest_from_json(bad)


def test_checksum_mismatch_is_detected(artifact_factory, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(artifact_factory(ratio=0.11, stages=1), copy)
    with open(copy / "vision.onnx", "ab") as handle:
        handle.write(b"\0")
    with pytest.raises(ArtifactError, match="changed after export"):
        read_manifest(copy, verify_checksums=True)


def test_reexport_without_overwrite_refuses(artifact_factory, tiny_checkpoint: Path) -> None:
    from apet.export.artifact import ExportConfig, export_artifact

    artifact = artifact_factory(ratio=0.11, stages=1)
    before = (artifact / "manifest.json").read_text()
    with pytest.raises(UsageError, match="--overwrite"):
        export_artifact(ExportConfig(model=str(tiny_checkpoint), out=artifact, ratio=0.5))
    assert (artifact / "manifest.json").read_text() == before


def test_failed_export_leaves_nothing(tmp_path: Path, tiny_adapter) -> None:
    from apet.export import artifact as artifact_module

    out = tmp_path / "never"

    def explode(*args, **kwargs):
        raise KeyboardInterrupt("simulated Ctrl-C during the LLM export")

    original = artifact_module.export_llm
    artifact_module.export_llm = explode
    try:
        with pytest.raises(KeyboardInterrupt):
            artifact_module.export_artifact(artifact_module.ExportConfig(model="unused", out=out, ratio=0.11,
                                                                         dtype="fp32"), adapter=tiny_adapter)
    finally:
        artifact_module.export_llm = original
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("kwargs", "words"), [
    (dict(ratio=0.0), "(0, 1]"), (dict(ratio=1.5), "(0, 1]"), (dict(ratio=None), "--ratio"),
    (dict(ratio=0.11, dtype="int8"), "--dtype"), (dict(ratio=0.11, opset=9), "--opset"),
    (dict(ratio=0.11, basis_method="kmeans"), "--basis-method"),
])
def test_export_config_validation(kwargs, words, tmp_path: Path) -> None:
    from apet.export.artifact import ExportConfig

    with pytest.raises(UsageError) as info:
        ExportConfig(model="tiny", out=tmp_path / "x", **kwargs)
    assert words in str(info.value)


def test_budget_planning_matches_the_paper() -> None:
    from apet.contracts.plan import CompressionPlan, plan_compression

    assert plan_compression(576, 32, ratio=0.11, stages=1).stage1_keep == 64
    two = plan_compression(576, 32, ratio=0.11)
    assert (two.stage1_keep, two.stage2.layer, two.stage2.keep) == (96, 16, 32) and two.mean_tokens(32) == 64
    assert (two.stage1.placement, two.stage2.compression.placement) == ("mask", "rank")
    full = plan_compression(576, 32, ratio=1.0)
    assert full.stage2 is None and full.stage1_keep == 576
    assert plan_compression(576, 32, tokens="128,48").stage2.keep == 48
    own = plan_compression(576, 32, ratio=0.11, basis_placement="own")
    assert (own.stage1.placement, own.stage2.compression.placement) == ("own", "own")
    assert CompressionPlan.from_json(two.to_json()) == two
    with pytest.raises(UsageError, match="basis"):
        plan_compression(64, 4, ratio=0.05)
    with pytest.raises(UsageError, match="K2=96 is not smaller than K1=32"):
        plan_compression(576, 32, tokens="32,96")


def test_unknown_model_and_offline_hub_id_fail_clearly() -> None:
    from apet.models.registry import resolve_checkpoint

    with pytest.raises(UsageError, match="neither a known alias"):
        resolve_checkpoint("not-a-model")
    with pytest.raises(UsageError, match="--model DIR"):
        resolve_checkpoint("llava")
    with pytest.raises(UsageError, match="HF_HUB_OFFLINE is set .*hf download someone/some-vlm"):
        resolve_checkpoint("someone/some-vlm")


def test_cli_export_acceptance(tmp_path: Path) -> None:
    """apet-export --model tiny --ratio 0.11 --stages 1 --dtype fp32 --out DIR (the issue's acceptance line)."""
    import subprocess
    import sys

    out = tmp_path / "a"
    result = subprocess.run([sys.executable, "-m", "apet.cli", "export", "--model", "tiny", "--ratio", "0.11",
                             "--stages", "1", "--dtype", "fp32", "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (out / "manifest.json").is_file() and (out / "vision.onnx").is_file()
    onnx.checker.check_model(str(out / "vision.onnx"), full_check=True)
    again = subprocess.run([sys.executable, "-m", "apet.cli", "export", "--model", "tiny", "--ratio", "0.11",
                            "--out", str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and "already exists" in again.stderr and "Traceback" not in again.stderr
