"""Qwen2.5-VL graphs for engines: TensorRT-RTX AOT builds of the vision graph (per-image budget: TopK's K is a
shape computation of the image's token count) and the M-RoPE LLM graph with a split LM head; profiles, trtexec
lines, apet inspect; the split head's logits equal the single head's."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from apet.contracts.files import REPORT_NAME
from apet.engines.build import BuildConfig, build_artifact
from apet.engines.profiles import ShapeLimits, llm_profiles, vision_profiles
from apet.engines.trtexec import lm_head_slices, profiling_runs, write_trtexec_script
from apet.export.decoder import DecoderGraph
from apet.manifest import read_manifest
from apet.modeling.blocks import empty_past


@pytest.fixture(scope="module")
def fp16_artifact(qwen_artifact_factory, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("qwen_built") / "artifact"
    shutil.copytree(qwen_artifact_factory(ratio=0.3, dtype="fp16", split_lm_head=3), target)
    return target


def test_profiles_cover_every_image_the_processor_makes(fp16_artifact: Path) -> None:
    manifest = read_manifest(fp16_artifact)
    limits = ShapeLimits.from_manifest(manifest)
    assert limits.max_prompt == 614 + 512  # K of the largest image (int(0.3 * 2048)) + text
    (vision,) = vision_profiles(manifest, limits)
    assert vision.shapes["pixel_values"] == ((1, 1024, 1176), (1, 1564, 1176), (4, 8192, 1176))
    assert vision.shapes["window_index"] == ((16, 64), (30, 64), (206, 64))
    assert vision.shapes["patch_positions"][2] == (8192, 2) and vision.shapes["window_slot"][0] == (1024,)
    prefill, decode = llm_profiles(manifest)
    assert prefill.shapes["position_ids"][2] == (3, 4, 614 + 512) and decode.shapes["position_ids"][0] == (3, 1, 1)


def test_trtexec_lines_use_real_window_indices_and_note_small_devices(fp16_artifact: Path) -> None:
    manifest = read_manifest(fp16_artifact)
    limits = ShapeLimits.from_manifest(manifest)
    script = write_trtexec_script(fp16_artifact, limits).read_text()
    vision = next(run for run in profiling_runs(manifest, limits, fp16_artifact) if run.name == "vision_b1")
    assert vision.shapes["pixel_values"] == (1, 1564, 1176) and vision.shapes["window_index"] == (30, 64)
    saved = np.fromfile(fp16_artifact / "trtexec/inputs/vision_b1.window_slot.bin", dtype=np.int64)
    assert len(saved) == 1564 == len(set(saved.tolist())) and saved.max() < 30 * 64
    assert "--loadInputs=patch_positions:trtexec/inputs/vision_b1.patch_positions.bin" in script
    assert "${SMALL_DEVICE:+--memPoolSize=workspace:1024M}" in script
    assert "3 vocabulary slices" in script and lm_head_slices(fp16_artifact / "llm.onnx") == 3


def test_split_lm_head_gives_the_same_logits(tiny_qwen_adapter) -> None:
    adapter = tiny_qwen_adapter
    torch.manual_seed(0)
    embeds = torch.randn(2, 7, adapter.spec.decoder.hidden_size)
    positions = torch.arange(7).expand(3, 2, -1)
    args = (embeds, positions, torch.ones(2, 7, dtype=torch.long), *empty_past(adapter, 2))
    with torch.no_grad():
        single = DecoderGraph(adapter)(*args)[0]
        split = DecoderGraph(adapter, lm_head_slices=3)(*args)[0]
    assert split.shape == single.shape == (2, 1, adapter.spec.decoder.vocab_size)
    torch.testing.assert_close(split, single, rtol=0, atol=1e-5)


@pytest.mark.trt
def test_tensorrt_rtx_aot_builds_vision_and_llm(fp16_artifact: Path, rtx_api) -> None:
    from apet.cli import main

    build_artifact(BuildConfig(artifact=fp16_artifact, compute_capabilities=("sm86",), max_context=2048),
                   api=rtx_api)
    report = json.loads((fp16_artifact / REPORT_NAME).read_text())
    for name in ("vision", "llm"):
        engine = report["engines"][name]
        assert engine["bytes"] > 10_000 and engine["compute_capabilities"] == ["SM86"]
    outputs = {o["name"]: o for o in report["engines"]["vision"]["outputs"]}
    assert outputs["visual_embeds"]["shape"] == [-1, -1, 64]  # K follows each image's token count
    assert main(["inspect", str(fp16_artifact)]) == 0
