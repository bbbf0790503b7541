"""Qwen3-VL on the tiny checkpoint (tests/qwen3_reference.py has the Hugging Face references).

* the torch-free half and the graphs against Hugging Face: preprocessing, prompt, M-RoPE positions (full and
  gathered), the ViT's merger output and DeepStack levels, the interleaved M-RoPE tables;
* ratio 1.0: apet-run (ONNX Runtime, torch) == ``Qwen3VLForConditionalGeneration.generate`` for a square, a wide
  and a tall image, batch 1 and 2;
* compressed: kept indices == the float64 oracle on the merger output, and every DeepStack level == the oracle's
  merge weights applied to it (``--deepstack merge``) or its kept rows (``gather``); greedy tokens == the same rule
  applied on Hugging Face modules;
* the manifest, ``apet inspect`` and the family options; TensorRT-RTX builds both graphs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import make_image
from numpy_reference import compress_one, compress_weights
from qwen3_reference import hf_batch, hf_compressed_generate, hf_generate, image_processor, vision_outputs

from apet.compression import compress_assigned
from apet.contracts.compression import CompressionConfig
from apet.contracts.plan import plan_compression
from apet.errors import UsageError
from apet.manifest import in_memory_manifest, read_manifest
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

NEW_TOKENS = 10
PROMPTS = ["What is in the picture?", "How many objects are there and what color are they?", "Describe the image."]
LEVELS = 3  # the tiny ViT's DeepStack levels


@pytest.fixture(scope="module")
def images() -> list:
    """Square, wide and tall: 12x12, 6x18 and 14x6 merged tokens (grids above and below the 16x16 position table)."""
    return [make_image(1, (384, 384)), make_image(2, (576, 192)), make_image(3, (192, 448))]


def _pipelines(artifact: Path, adapter) -> dict[str, Pipeline]:
    return {"onnxruntime": Pipeline.load(artifact, backend="onnxruntime"),
            "torch": Pipeline.load(artifact, backend="torch", adapter=adapter)}


@pytest.fixture(scope="module")
def full(qwen3_artifact_factory, tiny_qwen3_adapter) -> dict[str, Pipeline]:
    return _pipelines(qwen3_artifact_factory(ratio=1.0), tiny_qwen3_adapter)


@pytest.fixture(scope="module")
def compressed(qwen3_artifact_factory, tiny_qwen3_adapter) -> dict[str, Pipeline]:
    return _pipelines(qwen3_artifact_factory(ratio=0.3), tiny_qwen3_adapter)


@pytest.fixture(scope="module")
def gathered(qwen3_artifact_factory, tiny_qwen3_adapter) -> dict[str, Pipeline]:
    return _pipelines(qwen3_artifact_factory(ratio=0.3, family_options={"deepstack": "gather"}), tiny_qwen3_adapter)


def _generate(pipeline: Pipeline, images: list, prompts: list[str]):
    return pipeline.generate_batch(images, prompts, GenerationConfig(max_new_tokens=NEW_TOKENS))


def _vision(pipeline: Pipeline, image) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(pipeline.artifact_dir / "vision.onnx"))
    arrays = pipeline.processor.vision_inputs([image]).arrays
    return dict(zip([o.name for o in session.get_outputs()], session.run(None, arrays)))


def test_processor_prompt_and_positions_equal_hugging_face(tiny_qwen3_adapter, images) -> None:
    """Patches and grids == Qwen2VLImageProcessorPil with the checkpoint's settings (16-px patches, its own pixel
    range: the family default); ids == the chat template; positions == get_rope_index, and its entries gathered
    at a kept subset; decode continues at the last position + steps."""
    adapter = tiny_qwen3_adapter
    plan = plan_compression(adapter.spec.n_tokens, 4, ratio=1.0, stages=1, stage1_placement="blend", per_image=True)
    processor = in_memory_manifest(adapter.spec, plan, dtype="fp32", max_batch=4, max_context=4096)
    from apet.models.qwen3_vl.processor import Qwen3Processor

    processor = Qwen3Processor(adapter.source_dir, processor)
    hf = image_processor(adapter.source_dir)(images=images, return_tensors="np")
    inputs = processor.vision_inputs(images)
    assert [(1, *i.grid) for i in inputs.meta] == [tuple(g) for g in hf["image_grid_thw"].tolist()] == \
        [(1, 24, 24), (1, 12, 36), (1, 28, 12)]
    np.testing.assert_allclose(np.concatenate([i.patches for i in inputs.meta]), hf["pixel_values"], rtol=0,
                               atol=2e-6)
    assert set(inputs.all_runs()[0]) == {"pixel_values", "patch_positions"}

    batch = hf_batch(adapter, images[:2], PROMPTS[:2])
    full_positions, _ = adapter.model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                                           image_grid_thw=batch.image_grid_thw,
                                                           attention_mask=batch.attention_mask)
    two = processor.vision_inputs(images[:2])
    layout = processor.layout(PROMPTS[:2], two, [np.arange(i.tokens) for i in two.meta], 8)
    np.testing.assert_array_equal(layout.token_ids, batch.input_ids.numpy())
    np.testing.assert_array_equal(layout.attention_mask, batch.attention_mask.numpy())
    real = batch.attention_mask.numpy() == 1
    np.testing.assert_array_equal(layout.positions[:, real], full_positions.numpy()[:, real])
    assert adapter.spec.prompt_template.startswith("<|im_start|>user\n<|vision_start|>")  # no system turn

    kept = [np.sort(np.random.default_rng(b).choice(i.tokens, size=30, replace=False)) for b, i in enumerate(two.meta)]
    gathered = processor.layout(PROMPTS[:2], two, kept, 8)
    for b in range(2):
        ids = batch.input_ids[b][real[b]].numpy()
        image = np.nonzero(ids == batch.image_token_id)[0]
        keep = np.ones(len(ids), dtype=bool)
        keep[image] = False
        keep[image[kept[b]]] = True
        np.testing.assert_array_equal(gathered.positions[:, b][:, gathered.attention_mask[b] == 1],
                                      full_positions.numpy()[:, b][:, real[b]][:, keep])
    steps = np.ones((2, gathered.token_ids.shape[1] + 3), dtype=np.int64)
    np.testing.assert_array_equal(processor.decode_positions(gathered, steps)[:, :, 0],
                                  gathered.positions[:, :, -1] + 3)


def test_vision_graph_and_rotary_equal_hugging_face_modules(full, tiny_qwen3_adapter, images) -> None:
    """vision.onnx at ratio 1.0 (ONNX Runtime): visual_embeds == the HF merger's output and injected_embeds == the
    HF DeepStack levels (learned positions interpolated in the graph, 2-D rotary, full attention), rows in
    visual_embeds' order for a batch of two same-size images; the adapter's interleaved M-RoPE tables == HF's
    Qwen3VLTextRotaryEmbedding bit for bit."""
    adapter = tiny_qwen3_adapter
    session = ort.InferenceSession(str(full["onnxruntime"].artifact_dir / "vision.onnx"))
    assert [o.name for o in session.get_outputs()] == ["visual_embeds", "keep_index", "injected_embeds"]
    for pair in ([images[0]], [images[1], make_image(4, (576, 192))]):
        arrays = full["onnxruntime"].processor.vision_inputs(pair).arrays
        embeds, index, injected = session.run(None, arrays)
        merged, levels = vision_outputs(adapter, hf_batch(adapter, pair, ["x"] * len(pair)))
        want_levels = torch.cat(levels, dim=1).numpy()
        assert injected.shape == (LEVELS, embeds.shape[0] * embeds.shape[1], 64) == want_levels.shape
        np.testing.assert_allclose(embeds.reshape(-1, 64), torch.cat(merged).numpy(), rtol=0, atol=2e-4)
        np.testing.assert_allclose(injected, want_levels, rtol=0, atol=2e-4)
        np.testing.assert_array_equal(index, np.tile(np.arange(merged[0].shape[0]), (len(pair), 1)))
    positions = torch.randint(0, 3000, (3, 2, 11))
    hidden = torch.zeros(2, 11, 64)
    ours, theirs = adapter.rotary(hidden, positions), adapter.hf_position_embeddings(hidden, positions)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs)) and ours[0].shape == (2, 11, 16)


def test_ratio_one_equals_hf_generate(full, tiny_qwen3_adapter, images) -> None:
    for image, prompt in zip(images, PROMPTS):
        want = hf_generate(tiny_qwen3_adapter, [image], [prompt], NEW_TOKENS)
        assert len(want[0]) >= 3
        for name, pipeline in full.items():
            result = _generate(pipeline, [image], [prompt])[0]
            assert result.token_ids == want[0], name
            assert result.keep_index == list(range(len(result.keep_index)))


def test_ratio_one_batch_of_two_equals_hf_generate(full, tiny_qwen3_adapter, images) -> None:
    """Different image sizes and prompt lengths: two vision runs, left padding, DeepStack rows concatenated."""
    want = hf_generate(tiny_qwen3_adapter, images[:2], PROMPTS[:2], NEW_TOKENS)
    for name, pipeline in full.items():
        assert [r.token_ids for r in _generate(pipeline, images[:2], PROMPTS[:2])] == want, name


def test_kept_indices_and_deepstack_levels_equal_float64_oracle(compressed, gathered, tiny_qwen3_adapter,
                                                                images) -> None:
    """vision.onnx at ratio 0.3 on each image: kept indices == the float64 oracle (blend) on HF's merger output,
    kept tokens == its rows; every DeepStack level == the oracle's merge weights applied to HF's level (merge) or
    HF's level at the kept indices (gather)."""
    adapter = tiny_qwen3_adapter
    for image in images:
        merged, levels = vision_outputs(adapter, hf_batch(adapter, [image], ["x"]))
        x, stack = merged[0].double().numpy(), levels[0].double().numpy()
        keep = int(0.3 * x.shape[0])
        weights, want_index = compress_weights(x, keep)
        oracle_tokens, oracle_index = compress_one(x, keep, placement="blend")
        np.testing.assert_array_equal(want_index, oracle_index)
        np.testing.assert_allclose(weights @ x, oracle_tokens, rtol=0, atol=1e-12 * np.abs(x).max())
        got, got_gather = _vision(compressed["onnxruntime"], image), _vision(gathered["onnxruntime"], image)
        scale = np.abs(stack).max()
        for out in (got, got_gather):
            np.testing.assert_array_equal(out["keep_index"][0], want_index)
            np.testing.assert_allclose(out["visual_embeds"][0], oracle_tokens, rtol=0, atol=1e-4 * np.abs(x).max())
            assert out["injected_embeds"].shape == (LEVELS, keep, 64)
        np.testing.assert_allclose(got["injected_embeds"], weights @ stack, rtol=0, atol=1e-4 * scale)
        np.testing.assert_allclose(got_gather["injected_embeds"], stack[:, want_index], rtol=0, atol=1e-4 * scale)
        assert np.abs(got["injected_embeds"] - got_gather["injected_embeds"]).max() > 1e-2 * scale


@pytest.mark.parametrize("placement", ["blend", "mask", "rank"])
def test_assignment_forms_other_features_with_the_oracle_weights(placement: str) -> None:
    """compress_assigned: the stage's own rows and Assignment.apply on other per-token features (a DeepStack
    level) == the float64 oracle's weights applied to each."""
    generator = torch.Generator().manual_seed(3)
    x, level = torch.randn(2, 90, 24, generator=generator), torch.randn(2, 90, 40, generator=generator)
    kept, assignment = compress_assigned(CompressionConfig(keep=27, placement=placement), x)
    for b in range(2):
        weights, index = compress_weights(x[b].double().numpy(), 27, placement=placement)
        np.testing.assert_array_equal(kept.index[b].numpy(), index)
        np.testing.assert_allclose(kept.tokens[b].numpy(), weights @ x[b].double().numpy(), rtol=0, atol=1e-5)
        np.testing.assert_allclose(assignment.apply(level)[b].numpy(), weights @ level[b].double().numpy(), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("deepstack", ["merge", "gather"])
def test_compressed_equals_the_rule_on_hf_modules(compressed, gathered, tiny_qwen3_adapter, images,
                                                  deepstack: str) -> None:
    """Greedy tokens and kept indices == tests/qwen3_reference.py (selection and merge from the float64 oracle on
    HF's merger output, applied to every HF DeepStack level or gathered, positions from get_rope_index gathered,
    HF generate); each image alone and a batch of two of different sizes (merge), the batch (gather)."""
    pipelines = compressed if deepstack == "merge" else gathered
    cases = [[0], [1], [2], [0, 1]] if deepstack == "merge" else [[0, 1]]
    for rows in cases:
        chosen, prompts = [images[i] for i in rows], [PROMPTS[i] for i in rows]
        want, reference = hf_compressed_generate(tiny_qwen3_adapter, chosen, prompts, 0.3, NEW_TOKENS, deepstack)
        for name, pipeline in pipelines.items():
            results = _generate(pipeline, chosen, prompts)
            assert [r.token_ids for r in results] == want, (name, rows)
            assert [r.keep_index for r in results] == [k.tolist() for k in reference.kept], name


def test_attention_op_form_gives_the_same_tokens(compressed, qwen3_artifact_factory, images) -> None:
    """--attention op (ONNX Attention + RotaryEmbedding, opset 23; the vision blocks through the attention interface,
    the interleaved M-RoPE tables through RotaryEmbedding) == the pattern form, token for token (ONNX Runtime)."""
    op = Pipeline.load(qwen3_artifact_factory(ratio=0.3, attention="op"), backend="onnxruntime")
    assert read_manifest(op.artifact_dir).attention == "op"
    want = _generate(compressed["onnxruntime"], images[:2], PROMPTS[:2])
    assert [r.token_ids for r in _generate(op, images[:2], PROMPTS[:2])] == [r.token_ids for r in want]


def test_deepstack_levels_change_the_answer(tiny_qwen3_adapter, images) -> None:
    """The levels reach the LLM: merging or gathering them gives another answer for the wide image (the reference
    applies them through Hugging Face's own _deepstack_process)."""
    merge, _ = hf_compressed_generate(tiny_qwen3_adapter, images[1:2], PROMPTS[1:2], 0.3, NEW_TOKENS, "merge")
    gather, _ = hf_compressed_generate(tiny_qwen3_adapter, images[1:2], PROMPTS[1:2], 0.3, NEW_TOKENS, "gather")
    assert merge != gather


def test_manifest_inspect_and_family_options(compressed, gathered) -> None:
    from apet.inspect_artifact import describe
    from apet.models.registry import family_of_model, get_family

    manifest = read_manifest(compressed["onnxruntime"].artifact_dir)
    model, stage1 = manifest.model, manifest.compression.stage1
    assert model.family == "qwen3_vl" and model.bos_token_id is None and model.n_tokens == 292  # 300,000 px / 32²
    decoder = model.decoder
    assert (decoder.position_rank, decoder.qk_norm, decoder.injected_layers, decoder.head_dim) == (3, True, 3, 16)
    assert model.extra["deepstack"] == "merge" and model.extra["mrope_section"] == [4, 2, 2]
    assert read_manifest(gathered["onnxruntime"].artifact_dir).model.extra["deepstack"] == "gather"
    assert (model.processor["pixel_range"], model.processor["patch_size"], model.processor["window_size"]) == \
        ("checkpoint", 16, 0)
    assert (stage1.placement, stage1.keep_ratio, stage1.max_tokens, stage1.keep) == ("blend", 0.3, 292, 87)
    assert manifest.compression.stage2 is None
    vision = {s["name"]: s["shape"] for s in manifest.graphs["vision"].outputs}
    assert vision["injected_embeds"] == [3, "visual_rows", 64]
    llm = {s["name"]: s["shape"] for s in manifest.graphs["llm"].inputs}
    assert llm["injected_embeds"] == [3, "visual_rows", 64] and llm["injected_rows"] == ["batch", "seq"]
    text = describe(compressed["onnxruntime"].artifact_dir)
    assert "pixel range checkpoint: 59..292 merged tokens per image" in text and "DeepStack levels: merge" in text

    family = get_family("qwen3_vl")
    assert family_of_model("tiny-qwen3-vl") is family and family.aliases["qwen3-vl-8b"] == "Qwen/Qwen3-VL-8B-Instruct"
    assert family.resolve_export_options({}) == {"pixel-range": "checkpoint", "deepstack": "merge"}
    assert family.resolve_export_options({"pixel-range": "64:512"})["pixel-range"] == "64:512"
    with pytest.raises(UsageError, match="--deepstack 'sum' is not available for qwen3_vl"):
        family.resolve_export_options({"deepstack": "sum"})
    with pytest.raises(UsageError, match="--deepstack is not available for the qwen2_5_vl family"):
        get_family("qwen2_5_vl").resolve_export_options({"deepstack": "gather"})


def test_apet_export_cli_help_lists_the_family(capsys) -> None:
    from apet.cli import main

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "qwen3_vl: default merge" in text and "qwen3_vl: default checkpoint" in text


def test_bench_static_path_and_awq_calibration_feed_deepstack(tiny_qwen3_adapter) -> None:
    """apet-bench's static-cache path (CUDA graphs off) and AWQ's calibration forward add the DeepStack levels as
    the torch reference does: the same greedy tokens, the same last-position logits."""
    from apet.bench.stages import ApetPath, Request, synthetic_request
    from apet.contracts.plan import Budget, plan_for
    from apet.export.calibration import build_calibration
    from apet.media.images import DEMO
    from apet.modeling.reference import Reference
    from apet.models.registry import get_family
    from apet.quant.agreement import sequence_logits
    from apet.runtime.backends.torch import embedding_table, splice

    adapter = tiny_qwen3_adapter
    plan = plan_for(adapter.spec, get_family("qwen3_vl"), Budget(ratio=0.3, stages=1))
    request = Request(batch=2, prompt_tokens=30, new_tokens=4, image_size=(512, 384))
    path = ApetPath(adapter, plan, request, graphs=False)
    bench_tokens, _ = path.generate()
    processor, inputs, make_layout = synthetic_request(adapter, plan, request, 2048)
    reference = Reference(adapter, plan.stage1)
    out = reference.vision.named(reference.vision(*(torch.from_numpy(inputs.arrays[n])
                                                    for n in reference.vision.input_names)))
    layout = make_layout(out["keep_index"].numpy())
    table, rows = embedding_table(adapter), torch.from_numpy(layout.visual_rows)
    embeds = splice(table, torch.from_numpy(layout.token_ids), out["visual_embeds"], rows)
    mask, positions = torch.from_numpy(layout.attention_mask), torch.from_numpy(layout.positions)
    with torch.no_grad():
        logits, state = reference.prefill(embeds, mask, torch.from_numpy(layout.image_start), positions,
                                          out["injected_embeds"], rows)
        token, tokens, steps = logits[:, -1].argmax(-1), [], layout.attention_mask
        # the bench's request span (host arrays, the prompt laid out from the kept positions) gives these logits
        torch.testing.assert_close(path.request_logits().reshape(logits[:, -1].shape), logits[:, -1], rtol=0,
                                   atol=1e-4)
        for _ in range(request.new_tokens):
            tokens.append(token)
            steps = np.concatenate([steps, np.ones_like(steps[:, :1])], axis=1)
            step = reference.decode(table[token][:, None], state, torch.from_numpy(processor.decode_positions(layout,
                                                                                                        steps)))
            token = step[:, -1].argmax(-1)
    assert bench_tokens.tolist() == torch.stack(tokens, 1).tolist()

    (sample,) = build_calibration(adapter, plan, [(DEMO, PROMPTS[0])], {}).samples
    assert sample.injected.shape[0] == LEVELS and int((sample.rows >= 0).sum()) == sample.injected.shape[1]
    with torch.no_grad():
        want, _ = reference.prefill(sample.embeds, sample.mask, torch.zeros(1, dtype=torch.long), sample.positions,
                                    sample.injected, sample.rows)
    got = sequence_logits(adapter, sample.embeds, sample.mask, sample.positions, sample.injected, sample.rows)
    torch.testing.assert_close(got[-1], want[0, -1], rtol=0, atol=1e-4)
    assert (sequence_logits(adapter, sample.embeds, sample.mask, sample.positions)[-1] - got[-1]).abs().max() > 1e-2


def test_export_warns_when_k_exceeds_tensorrt_topk(tiny_qwen3_adapter, caplog) -> None:
    """The published checkpoints' range reaches 16,384 tokens: K = 4,915 at --ratio 0.3, above TensorRT's TopK."""
    adapter = tiny_qwen3_adapter
    spec = adapter.spec
    try:
        adapter.set_pixel_range("64:16384")
        plan = plan_compression(adapter.spec.n_tokens, 4, ratio=0.3, stages=1, stage1_placement="blend",
                                per_image=True)
        with caplog.at_level("WARNING"):
            adapter.fit_budget(plan)
    finally:
        adapter.spec = spec
    assert "above TensorRT's TopK limit of 3840" in caplog.text and "--pixel-range 64:12803" in caplog.text


@pytest.mark.trt
def test_tensorrt_rtx_aot_builds_vision_and_llm(qwen3_artifact_factory, tmp_path: Path, rtx_api) -> None:
    """fp16 graphs at ratio 0.3: the vision engine's profile covers every grid of the tiny pixel range and returns
    K per image plus the DeepStack rows; the LLM engine takes the injected inputs."""
    from apet.contracts.files import REPORT_NAME
    from apet.engines.build import BuildConfig, build_artifact

    artifact = tmp_path / "artifact"
    shutil.copytree(qwen3_artifact_factory(ratio=0.3, dtype="fp16"), artifact)
    build_artifact(BuildConfig(artifact=artifact, compute_capabilities=("sm86",), max_context=1024), api=rtx_api)
    report = json.loads((artifact / REPORT_NAME).read_text())
    for name in ("vision", "llm"):
        assert report["engines"][name]["bytes"] > 10_000
    outputs = {o["name"]: o["shape"] for o in report["engines"]["vision"]["outputs"]}
    assert outputs["visual_embeds"] == [-1, -1, 64] and outputs["injected_embeds"] == [3, -1, 64]
    inputs = {i["name"]: i["shape"] for i in report["engines"]["llm"]["inputs"]}
    assert inputs["injected_embeds"] == [3, -1, 64] and inputs["injected_rows"] == [-1, -1]
