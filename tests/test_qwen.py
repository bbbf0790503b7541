"""Qwen2.5-VL end to end on the tiny checkpoint: apet-run (ONNX Runtime, torch) against Hugging Face generate at
ratio 1.0, and the compressed pipeline against the float64 oracle, get_rope_index and the authors' pipeline
restated on Hugging Face modules (tests/qwen_reference.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from authors_reference import qwen_stage1
from conftest import make_image
from numpy_reference import compress_one
from qwen_reference import hf_batch, hf_compressed_generate, hf_generate, merged_tokens

from apet.manifest import read_manifest
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

NEW_TOKENS = 10
PROMPTS = ["What is in the picture?", "How many objects are there and what color are they?", "Describe the image."]


@pytest.fixture(scope="module")
def images() -> list:
    """Landscape, portrait and wide images: three grids, three visual-token counts."""
    return [make_image(1, (300, 200)), make_image(2, (180, 260)), make_image(3, (420, 140))]


def _pipelines(artifact: Path, adapter) -> dict[str, Pipeline]:
    return {"onnxruntime": Pipeline.load(artifact, backend="onnxruntime"),
            "torch": Pipeline.load(artifact, backend="torch", adapter=adapter)}


@pytest.fixture(scope="module")
def full(qwen_artifact_factory, tiny_qwen_adapter) -> dict[str, Pipeline]:
    return _pipelines(qwen_artifact_factory(ratio=1.0), tiny_qwen_adapter)


@pytest.fixture(scope="module")
def compressed(qwen_artifact_factory, tiny_qwen_adapter) -> dict[str, Pipeline]:
    return _pipelines(qwen_artifact_factory(ratio=0.3), tiny_qwen_adapter)


def _generate(pipeline: Pipeline, images: list, prompts: list[str], new_tokens: int = NEW_TOKENS):
    return pipeline.generate_batch(images, prompts, GenerationConfig(max_new_tokens=new_tokens))


def test_ratio_one_equals_hf_generate(full, tiny_qwen_adapter, images) -> None:
    for image, prompt in zip(images, PROMPTS):
        want = hf_generate(tiny_qwen_adapter, [image], [prompt], NEW_TOKENS)
        assert len(want[0]) >= 3
        for name, pipeline in full.items():
            result = _generate(pipeline, [image], [prompt])[0]
            assert result.token_ids == want[0], name
            assert result.stats.visual_tokens == [len(result.keep_index)] and result.keep_index == \
                list(range(len(result.keep_index)))
    # the positions matter: without mm_token_type_ids, generate falls back to 1-D positions and differs
    assert hf_generate(tiny_qwen_adapter, images[:1], PROMPTS[:1], NEW_TOKENS, with_token_types=False) != \
        hf_generate(tiny_qwen_adapter, images[:1], PROMPTS[:1], NEW_TOKENS)


def test_ratio_one_batch_of_two_equals_hf_generate(full, tiny_qwen_adapter, images) -> None:
    prompts = PROMPTS[:2]  # different lengths and image sizes: left padding, two vision runs
    want = hf_generate(tiny_qwen_adapter, images[:2], prompts, NEW_TOKENS)
    for name, pipeline in full.items():
        assert [r.token_ids for r in _generate(pipeline, images[:2], prompts)] == want, name


def test_kept_indices_equal_float64_oracle_on_merger_output(compressed, tiny_qwen_adapter, images) -> None:
    """The vision graph (ONNX Runtime) on each image: kept indices == the float64 oracle (blend placement) and
    the authors' code restated, on Hugging Face's merger output; values within float32 tolerance."""
    pipeline = compressed["onnxruntime"]
    session = ort.InferenceSession(str(pipeline.artifact_dir / "vision.onnx"))
    for image in images:
        inputs = pipeline.processor.vision_inputs([image])
        embeds, index = session.run(None, inputs.arrays)
        merged = merged_tokens(tiny_qwen_adapter, hf_batch(tiny_qwen_adapter, [image], ["x"]))[0]
        n = merged.shape[0]
        keep = int(0.3 * n)
        assert index.shape == (1, keep) and embeds.shape == (1, keep, merged.shape[1])
        want_tokens, want_index = compress_one(merged.double().numpy(), keep, placement="blend")
        np.testing.assert_array_equal(index[0], want_index)
        authors_tokens, authors_index = qwen_stage1(merged, keep)
        np.testing.assert_array_equal(index[0], authors_index.numpy())
        scale = np.abs(want_tokens).max()
        np.testing.assert_allclose(embeds[0], want_tokens, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(authors_tokens.numpy(), want_tokens, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("batch", [1, 2, 4])
def test_compressed_equals_authors_pipeline_on_hf_modules(compressed, tiny_qwen_adapter, images, batch: int) -> None:
    """Greedy tokens, kept indices and the kept tokens' positions (get_rope_index gathered) against the authors'
    pipeline restated on Hugging Face modules; batches of 1 (each image), 2 and 4 (mixed sizes, one repeated)."""
    cases = [[0], [1], [2]] if batch == 1 else [[0, 1]] if batch == 2 else [[0, 1, 1, 2]]
    for rows in cases:
        chosen = [images[i] for i in rows]
        prompts = [PROMPTS[i % 3] for i in range(len(rows))]
        want, reference = hf_compressed_generate(tiny_qwen_adapter, chosen, prompts, 0.3, NEW_TOKENS)
        backends = compressed.items() if batch < 4 else [("onnxruntime", compressed["onnxruntime"])]
        for name, pipeline in backends:
            results = _generate(pipeline, chosen, prompts)
            assert [r.token_ids for r in results] == want, name
            assert [r.keep_index for r in results] == [k.tolist() for k in reference.kept], name
        processor = compressed["onnxruntime"].processor
        inputs = processor.vision_inputs(chosen)
        layout = processor.layout(prompts, inputs, reference.kept, NEW_TOKENS)
        for b in range(len(rows)):
            mask = reference.attention_mask[b].bool().numpy()
            np.testing.assert_array_equal(layout.positions[:, b][:, layout.attention_mask[b] == 1],
                                          reference.position_ids[:, b][:, mask].numpy())


def test_fixed_budget_vision_graph_keeps_k_of_every_image(tiny_qwen_adapter, images, tmp_path: Path) -> None:
    """--tokens K: a static K (engines get static shapes), every image resized to at least K tokens (min_pixels
    raised), kept indices == the float64 oracle on Hugging Face's merger output at those sizes."""
    from apet.contracts.plan import plan_compression
    from apet.export.vision import export_vision
    from apet.manifest import in_memory_manifest
    from apet.models.qwen2_5_vl.processor import QwenProcessor

    adapter, keep = tiny_qwen_adapter, 300
    plan = plan_compression(adapter.spec.n_tokens, 4, tokens=str(keep), stages=1, stage1_placement="blend",
                            per_image=True)
    spec = adapter.spec
    try:
        adapter.fit_budget(plan)
        export_vision(adapter, plan.stage1, tmp_path / "vision.onnx", opset=17)
        processor = QwenProcessor(None, in_memory_manifest(adapter.spec, plan, dtype="fp32", max_batch=4,
                                                           max_context=4096))
    finally:
        adapter.spec = spec
    session = ort.InferenceSession(str(tmp_path / "vision.onnx"))
    assert [o.shape for o in session.get_outputs()] == [["batch", keep, 64], ["batch", keep]]  # static K
    for image in images:
        embeds, index = session.run(None, processor.vision_inputs([image]).arrays)
        merged = merged_tokens(adapter, hf_batch(adapter, [image], ["x"], min_pixels=keep * 28 * 28))[0]
        assert merged.shape[0] >= keep and index.shape == (1, keep)
        want_tokens, want_index = compress_one(merged.double().numpy(), keep, placement="blend")
        np.testing.assert_array_equal(index[0], want_index)
        np.testing.assert_allclose(embeds[0], want_tokens, rtol=0, atol=1e-4 * np.abs(want_tokens).max())


def test_manifest_and_stats_of_a_compressed_run(compressed, images) -> None:
    pipeline = compressed["onnxruntime"]
    manifest = read_manifest(pipeline.artifact_dir)
    stage1 = manifest.compression.stage1
    assert manifest.model.family == "qwen2_5_vl" and manifest.model.decoder.position_rank == 3
    assert (stage1.placement, stage1.keep_ratio, stage1.max_tokens, stage1.keep) == ("blend", 0.3, 2048, 614)
    assert manifest.compression.stage2 is None and manifest.model.bos_token_id is None
    assert {s["name"]: s["shape"] for s in manifest.graphs["llm"].inputs}["position_ids"] == [3, "batch", "seq"]
    result = _generate(pipeline, images[:1], PROMPTS[:1], new_tokens=4)[0]
    assert result.stats.visual_tokens == [int(0.3 * 280)] and result.stats.cache_lengths
    from apet.inspect_artifact import describe

    text = describe(pipeline.artifact_dir)
    assert "N <= 2048 per image -> int(0.3*N) visual tokens (<= 614)" in text
    assert "position_ids: int64[3, batch, seq]" in text


def test_apet_run_cli_json_on_tiny(compressed, capsys) -> None:
    from apet.cli import main

    artifact = compressed["onnxruntime"].artifact_dir
    assert main(["run", str(artifact), "--image", "@demo", "--prompt", "Describe the image.", "--max-new-tokens",
                 "5", "--json"]) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["stats"]["visual_tokens"] == [len(record["keep_index"])] and record["token_ids"]


def test_bench_on_tiny_qwen(tiny_qwen_adapter, tmp_path: Path) -> None:
    """apet-bench's Qwen path (what --model qwen2.5-vl-7b-shapes runs on a GPU): per-image budgets at the
    request's image size, 3-D positions through the static decoder, the HF baseline with mm_token_type_ids."""
    from apet.bench.run import BenchConfig, run_bench

    cfg = BenchConfig(model="tiny-qwen2.5-vl", out=tmp_path, ratios=(0.3,), batches=(2,), image_size=(448, 448),
                      repeats=1, new_tokens=2, prompt_tokens=30)
    results = run_bench(cfg, adapter=tiny_qwen_adapter)
    (low,) = results["runs"]
    assert low["visual_tokens"] == int(0.3 * 256)  # at the LLM input: 448x448 -> 16x16 merged tokens, 30% kept
    assert low["budgets"] == {"k1": int(0.3 * 256), "stage2_layer": None, "k2": None, "mean_tokens": 76.0,
                              "tokens_per_view": 256, "visual_tokens": 76, "views": 1}
    assert low["costs"]["apet_stage1"]["flops"] > 0 and low["costs"]["projector"]["flops"] == 0
    assert low["stages"]["vision_tower"]["median_ms"] > 0 and low["generation"]["decode_per_token"]
    assert results["baselines"]["hf_generate"]["2"]["visual_tokens"] == 256
    assert (tmp_path / "results.md").is_file() and results["config"]["image_size"] == [448, 448]
