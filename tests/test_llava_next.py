"""LLaVA-NeXT (AnyRes) end to end on a seeded tiny checkpoint: preprocessing and geometry against Hugging Face,
per-view kept indices against the float64 oracle, the assembled sequence against an independent
re-implementation of the authors' ``prepare_inputs_labels_for_multimodal_x``, greedy tokens against Hugging
Face ``generate`` (uncompressed, and with the same stage-1 compression through HF modules), ONNX Runtime
against the torch reference with two stages, engines, CLI, bench and eval on the family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import numpy_reference as ref
import onnxruntime as ort
import pytest
import torch
from conftest import make_image

from apet.compression import compress
from apet.errors import UsageError
from apet.manifest import read_manifest
from apet.models.llava_next import anyres
from apet.models.registry import family_of
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

PROMPTS = ["What is in the picture?", "Describe the image.", "How many objects are there and what color are they?"]
SIZES = {"square": (256, 256), "wide": (300, 200), "tall": (180, 260)}  # (width, height)
NEW_TOKENS = 10
TILE, PATCHES, N = 112, 16, 256  # the tiny checkpoint: 112-px views of 16x16 tokens


@pytest.fixture(scope="module")
def checkpoint(tiny_next_checkpoint: Path) -> Path:
    return tiny_next_checkpoint


@pytest.fixture(scope="module")
def adapter(checkpoint: Path):
    from apet.adapters.llava_next.adapter import LlavaNextAdapter

    return LlavaNextAdapter.load(checkpoint)


@pytest.fixture(scope="module")
def hf_processor(checkpoint: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(checkpoint)  # the PIL image processor: no torchvision needed


@pytest.fixture(scope="module")
def export(next_artifact_factory):
    """export(**ExportConfig options) -> artifact dir (fp32 unless told), cached per option set for the session
    (the torch-free runtime's tests share them); each export loads its own adapter (options such as --max-views
    change the adapter's spec)."""
    return next_artifact_factory


@pytest.fixture(scope="module")
def images() -> dict:
    return {name: make_image(i + 1, size) for i, (name, size) in enumerate(SIZES.items())}


def _pipelines(artifact: Path, adapter) -> dict[str, Pipeline]:
    return {"ort": Pipeline.load(artifact, backend="onnxruntime"),
            "torch": Pipeline.load(artifact, backend="torch", adapter=adapter)}


def _generate(pipeline: Pipeline, images: list, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list:
    return pipeline.generate_batch(images, prompts, GenerationConfig(max_new_tokens=new_tokens))


# -- an independent re-implementation of the authors' assembly (llava_arch.py, spatial_unpad + anyres) ----------
def authors_assembly(features: torch.Tensor, mask: torch.Tensor, size_hw: tuple[int, int], pinpoints: list,
                     newline: torch.Tensor) -> torch.Tensor:
    """features [views, N, D] (values at dropped positions are ignored), mask [views, N] = the kept positions ->
    the image's span [T, D], written after ``prepare_inputs_labels_for_multimodal_x`` with Hugging Face's
    ``get_anyres_image_grid_shape`` and ``unpad_image`` (rounding)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    side = int(round(features.shape[1] ** 0.5))
    base, base_mask = features[0], mask[0]
    rows, cols = get_anyres_image_grid_shape(list(size_hw), pinpoints, TILE)
    tiles = features[1:].view(rows, cols, side, side, -1).permute(4, 0, 2, 1, 3).contiguous()
    tile_mask = mask[1:].view(rows, cols, side, side).permute(0, 2, 1, 3).contiguous().unsqueeze(0)
    tiles, tile_mask = tiles.flatten(1, 2).flatten(2, 3), tile_mask.flatten(1, 2).flatten(2, 3)
    tiles, tile_mask = unpad_image(tiles, list(size_hw)), unpad_image(tile_mask, list(size_hw))
    tiles = torch.cat((tiles, newline[:, None, None].expand(*tiles.shape[:-1], 1)), dim=-1)
    tile_mask = torch.cat((tile_mask, torch.ones(*tile_mask.shape[:-1], 1, dtype=torch.bool)), dim=-1)
    tiles, tile_mask = tiles.flatten(1, 2).transpose(0, 1), tile_mask.flatten(1, 2).squeeze(0)
    return torch.cat((base[base_mask], tiles[tile_mask]), dim=0)


def _mask(keep_index: np.ndarray, n_tokens: int = N) -> torch.Tensor:
    mask = torch.zeros(keep_index.shape[0], n_tokens, dtype=torch.bool)
    mask.scatter_(1, torch.from_numpy(keep_index), True)
    return mask


def _codes_of_layout(rows: np.ndarray, keep_index: np.ndarray) -> list[int]:
    """Our span as codes view·N + position (-1 for a newline)."""
    k1 = keep_index.shape[1]
    return [-1 if r < 0 else int((r // k1) * N + keep_index[r // k1, r % k1]) for r in rows]


# -- geometry and preprocessing ---------------------------------------------------------------------------------
def test_anyres_geometry_equals_hugging_face() -> None:
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    rng = np.random.default_rng(0)
    sizes = [(h, w) for h, w in rng.integers(20, 2000, (120, 2))] + [(336, 672), (672, 672), (99, 1000), (1, 5)]
    for h, w in sizes:
        best = select_best_resolution((int(h), int(w)), pinpoints)
        assert anyres.select_best_resolution((int(h), int(w)), pinpoints) == best
        image = np.zeros((3, int(h), int(w)))
        assert anyres.resized_size((int(h), int(w)), best) == get_patch_output_size(image, best, "channels_first")
        grid = (best[0] // 336 * 24, best[1] // 336 * 24)
        cells = torch.arange(grid[0] * grid[1]).view(1, *grid)
        kept = unpad_image(cells, [int(h), int(w)])
        row0, row1, col0, col1 = anyres.unpad_bounds((int(h), int(w)), grid)
        assert torch.equal(kept, cells[:, row0:row1, col0:col1])
    assert anyres.max_visual_tokens(pinpoints, 336, 24, 576) == 576 + 4 * 576 + 48  # the 7B maximum: 2928
    assert anyres.most_views(pinpoints, 336) == 5 and anyres.fewest_views(pinpoints, 336) == 3


def test_views_equal_hugging_face_image_processor(adapter, hf_processor) -> None:
    from apet.contracts.plan import plan_compression
    from apet.manifest import in_memory_manifest
    from apet.models.llava_next.processor import LlavaNextProcessor

    manifest = in_memory_manifest(adapter.spec, plan_compression(N, 4, ratio=1.0, stages=1), dtype="fp32",
                                  max_batch=4, max_context=1024, extra_rows=adapter.extra_row_ids())
    processor = LlavaNextProcessor(adapter.source_dir, manifest)
    sizes = [*SIZES.values(), (500, 90), (90, 500), (113, 111), (40, 30), (1000, 999)]
    batch = [make_image(i, size) for i, size in enumerate(sizes)]
    ours = processor.vision_inputs(batch)
    want = hf_processor.image_processor(images=batch, return_tensors="np")
    start = 0
    for b, geometry in enumerate(ours.meta):
        views = ours.arrays["pixel_values"][start:start + geometry.views]
        start += geometry.views
        assert tuple(want["image_sizes"][b]) == geometry.size
        np.testing.assert_allclose(views, want["pixel_values"][b][:geometry.views], atol=1e-5)
        assert not want["pixel_values"][b][geometry.views:].any()  # HF pads the rest of the batch with zeros
    assert start == ours.arrays["pixel_values"].shape[0]


# -- ratio 1.0 against Hugging Face generate ---------------------------------------------------------------------
def hf_generate(adapter, hf_processor, images: list, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list:
    inputs = hf_processor(images=images, text=[adapter.format_prompt(p) for p in prompts], return_tensors="pt",
                          padding=True)
    pad = hf_processor.tokenizer.pad_token_id
    with torch.no_grad():
        out = adapter.model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens, pad_token_id=pad)
    eos = hf_processor.tokenizer.eos_token_id
    rows = out[:, inputs["input_ids"].shape[1]:].tolist()
    return [row[: row.index(eos)] if eos in row else row for row in rows]


@pytest.fixture(scope="module")
def full(export, adapter) -> dict:
    artifact = export(ratio=1.0, stages=1)
    return {"artifact": artifact, **_pipelines(artifact, adapter)}


@pytest.mark.parametrize("name", list(SIZES))
def test_ratio_one_equals_hf_generate(full, adapter, hf_processor, images, name: str) -> None:
    image = images[name]
    want = hf_generate(adapter, hf_processor, [image], [PROMPTS[0]])
    tokens = hf_processor(images=[image], text=[adapter.format_prompt("x")])["input_ids"][0]
    for backend in ("ort", "torch"):
        result = _generate(full[backend], [image], [PROMPTS[0]])[0]
        assert result.token_ids == want[0], backend
        assert result.stats.visual_tokens == [tokens.count(adapter.spec.image_token_id)]  # newlines included
    assert len(want[0]) >= 3


def test_ratio_one_batch_of_two_equals_hf_generate(full, adapter, hf_processor, images) -> None:
    batch, prompts = [images["wide"], images["tall"]], [PROMPTS[2], PROMPTS[1]]  # different lengths: left padding
    want = hf_generate(adapter, hf_processor, batch, prompts)
    for backend in ("ort", "torch"):
        assert [r.token_ids for r in _generate(full[backend], batch, prompts)] == want, backend


# -- compressed: indices, assembly, HF-modules reference ----------------------------------------------------------
@pytest.fixture(scope="module")
def stage1(export, adapter) -> dict:
    artifact = export(tokens="32", stages=1)
    return {"artifact": artifact, **_pipelines(artifact, adapter)}


@pytest.fixture(scope="module")
def two_stage(export, adapter) -> dict:
    artifact = export(tokens="32,16", stages=2)
    return {"artifact": artifact, **_pipelines(artifact, adapter)}


def test_per_view_kept_indices_equal_oracle(stage1, adapter, images) -> None:
    pipeline = stage1["ort"]
    inputs = pipeline.processor.vision_inputs([images["wide"], images["square"]])
    pixels = inputs.arrays["pixel_values"]
    session = ort.InferenceSession(str(stage1["artifact"] / "vision.onnx"), providers=["CPUExecutionProvider"])
    embeds, index = session.run(None, {"pixel_values": pixels})
    assert index.shape == (pixels.shape[0], 32) == embeds.shape[:2] and pixels.shape[0] == 5 + 5
    with torch.no_grad():
        features = adapter.vision_features(torch.from_numpy(pixels))
        want_embeds = adapter.project(compress(features, keep=32).tokens)
    oracle_tokens, oracle_index = ref.compress(features.double().numpy(), 32, 10)
    np.testing.assert_array_equal(index, oracle_index)  # every view on its own, in position order
    with torch.no_grad():
        oracle_embeds = adapter.project(torch.from_numpy(oracle_tokens).float())
    np.testing.assert_allclose(embeds, want_embeds.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embeds, oracle_embeds.numpy(), rtol=1e-3, atol=1e-3)


def test_assembly_equals_authors_on_random_kept_sets(adapter) -> None:
    """Order, newline positions and unpadding over many aspect ratios and kept sets (rows with no kept token,
    kept tokens in the padding) against the authors' code path."""
    from apet.models.llava_next.processor import image_span

    pinpoints = adapter.spec.processor["image_grid_pinpoints"]
    rng = np.random.default_rng(3)
    newline = torch.tensor([-1.0])
    for trial in range(60):
        size = (int(rng.integers(10, 700)), int(rng.integers(10, 700)))
        geometry = anyres.Geometry.of(size, pinpoints, TILE, PATCHES)
        k1 = int(rng.choice([11, 24, 40, 64]))
        keep = np.sort(np.stack([rng.choice(N, k1, replace=False) for _ in range(geometry.views)]), axis=1)
        rows, ids = image_span(geometry, keep, 0, image_id=7, newline_id=99)
        codes = torch.arange(geometry.views * N, dtype=torch.float32).view(geometry.views, N, 1)
        want = authors_assembly(codes, _mask(keep), size, pinpoints, newline)[:, 0].long().tolist()
        assert _codes_of_layout(rows, keep) == want, (size, k1)
        assert ((ids == 99) == (rows < 0)).all() and (ids[rows >= 0] == 7).all()
        assert len(rows) <= anyres.max_visual_tokens(pinpoints, TILE, PATCHES, k1)


def test_layout_from_the_vision_graph_equals_authors_assembly(two_stage, images) -> None:
    """The layout of a real two-image request: per image the authors' order, base view first at image_start
    (the stage-2 span), rows pointing into the flattened per-view embeddings."""
    pipeline = two_stage["ort"]
    batch = [images["tall"], images["wide"]]
    inputs = pipeline.processor.vision_inputs(batch)
    visual = pipeline.backend.encode(inputs)
    layout = pipeline.processor.layout(PROMPTS[:2], inputs, visual.keep_index, 8)
    pinpoints = pipeline.manifest.model.processor["image_grid_pinpoints"]
    newline_id = pipeline.manifest.extra_token_ids()["image_newline"]
    assert newline_id == pipeline.manifest.model.decoder.vocab_size
    view = 0
    for b, geometry in enumerate(inputs.meta):
        keep = visual.keep_index[view:view + geometry.views]
        start, length = int(layout.image_start[b]), layout.visual_tokens[b]
        rows = layout.visual_rows[b, start:start + length]
        assert (layout.visual_rows[b, :start] < 0).all() and (layout.visual_rows[b, start + length:] < 0).all()
        assert (rows[:32] == view * 32 + np.arange(32)).all()  # the base view's K1 rows open the span
        assert ((layout.token_ids[b, start:start + length] == newline_id) == (rows < 0)).all()
        codes = torch.arange(geometry.views * N, dtype=torch.float32).view(geometry.views, N, 1)
        want = authors_assembly(codes, _mask(keep), geometry.size, pinpoints, torch.tensor([-1.0]))
        local = np.where(rows >= 0, rows - view * 32, -1)
        assert _codes_of_layout(local, keep) == want[:, 0].long().tolist()
        view += geometry.views


def hf_generate_compressed(adapter, hf_processor, images: list, prompts: list[str], keep: int) -> list:
    """Hugging Face generate whose image features are ApET stage 1 on every view (HF's own CLIP tower and
    projector) laid out by :func:`authors_assembly`: an HF-modules reference independent of apet's layout."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model, tokenizer = adapter.model, hf_processor.tokenizer
    pixels = hf_processor.image_processor(images=images, return_tensors="pt")
    pinpoints = model.config.image_grid_pinpoints
    spans = []
    with torch.no_grad():
        for b, size in enumerate(pixels["image_sizes"].tolist()):
            views = anyres.Geometry.of(tuple(size), pinpoints, TILE, PATCHES).views
            hidden = model.model.vision_tower(pixels["pixel_values"][b, :views], output_hidden_states=True)
            kept = compress(hidden.hidden_states[-2][:, 1:], keep=keep)
            projected = model.model.multi_modal_projector(kept.tokens)
            full = torch.zeros(views, N, projected.shape[-1]).scatter(
                1, kept.index[..., None].expand(-1, -1, projected.shape[-1]), projected)
            spans.append(authors_assembly(full, _mask(kept.index.numpy()), tuple(size), pinpoints,
                                          model.model.image_newline))
    image_id = model.config.image_token_index
    rows = []
    for prompt, span in zip(prompts, spans):
        ids = tokenizer(adapter.format_prompt(prompt)).input_ids
        at = ids.index(image_id)
        rows.append(ids[:at] + [image_id] * len(span) + ids[at + 1:])
    longest = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(r)) + r for r in rows])
    mask = (torch.arange(longest)[None] >= torch.tensor([[longest - len(r)] for r in rows])).long()
    with torch.no_grad():  # the image features enter as pre-computed encoder outputs
        out = model.generate(input_ids=input_ids, attention_mask=mask,
                             mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=spans)},
                             do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in out[:, longest:].tolist()]


@pytest.mark.parametrize("names", [("tall",), ("square", "wide")])
def test_compressed_equals_hf_modules_reference(stage1, adapter, hf_processor, images, names: tuple) -> None:
    batch, prompts = [images[n] for n in names], PROMPTS[:len(names)]
    want = hf_generate_compressed(adapter, hf_processor, batch, prompts, keep=32)
    for backend in ("ort", "torch"):
        assert [r.token_ids for r in _generate(stage1[backend], batch, prompts)] == want, backend


@pytest.mark.parametrize("names", [("wide",), ("tall", "square")])
def test_two_stage_onnxruntime_equals_torch_reference(two_stage, images, names: tuple) -> None:
    batch, prompts = [images[n] for n in names], [PROMPTS[2], PROMPTS[0]][:len(names)]
    ort_results = _generate(two_stage["ort"], batch, prompts, new_tokens=14)
    torch_results = _generate(two_stage["torch"], batch, prompts, new_tokens=14)
    assert [r.token_ids for r in ort_results] == [r.token_ids for r in torch_results]
    assert [r.keep_index for r in ort_results] == [r.keep_index for r in torch_results]
    assert np.array(ort_results[0].keep_index).shape == (5, 32)  # [views, K1] per image
    lengths = ort_results[0].stats.cache_lengths
    assert lengths[0] == lengths[1] and lengths[0] - lengths[-1] == 32 - 16  # stage 2 removed K1 - K2 base tokens


def test_stage_two_changes_the_answer(stage1, two_stage, images) -> None:
    one = _generate(stage1["ort"], [images["square"]], PROMPTS[:1], new_tokens=14)[0].token_ids
    two = _generate(two_stage["ort"], [images["square"]], PROMPTS[:1], new_tokens=14)[0].token_ids
    assert one != two


# -- manifest, options, engines, CLI, bench, eval -----------------------------------------------------------------
def test_manifest_records_views_and_budgets(two_stage, full) -> None:
    manifest = read_manifest(two_stage["artifact"], verify_checksums=True)
    family = family_of(manifest)
    assert manifest.model.family == "llava-next" and manifest.model.extra["max_views"] == 5
    assert manifest.model.prompt_template_name == "vicuna_v1" and manifest.model.processor["image_fit"] == "anyres"
    assert manifest.visual_tokens == 32 and manifest.compression.stage2.keep == 16
    assert family.max_visual_tokens(manifest) == 32 + 4 * 32 + 32  # 2x2 grid: 32 token rows -> 32 newlines
    assert family.vision_dims(manifest, 4) == {"views": (3, 5, 20)}
    assert family.max_visual_tokens(read_manifest(full["artifact"])) == 5 * N + 2 * PATCHES
    assert "image_newline" in family.visual_summary(manifest)


def test_llava_next_shapes_has_the_v16_vicuna_7b_sizes() -> None:
    """The benchmark model without allocating it (meta device): paper budgets, 2,928 tokens at ratio 1, 5 views."""
    from apet.contracts.plan import plan_compression
    from apet.manifest import in_memory_manifest
    from apet.models.registry import load_adapter

    adapter = load_adapter("llava-next-shapes", dtype=torch.float16, device="meta")
    assert adapter.spec.n_tokens == 576 and adapter.spec.decoder.num_layers == 32 and adapter.extra_row_ids() == {
        "image_newline": 32064}
    for ratio, budgets, most in ((1.0, (576, None), 2928), (0.22, (192, 64), 192 * 5 + 48)):
        plan = plan_compression(576, 32, ratio=ratio, stages=2)
        assert (plan.stage1_keep, plan.stage2 and plan.stage2.keep) == budgets
        manifest = in_memory_manifest(adapter.spec, plan, dtype="fp16", max_batch=2, max_context=4096,
                                      extra_rows=adapter.extra_row_ids())
        assert family_of(manifest).max_visual_tokens(manifest) == most
        assert family_of(manifest).vision_dims(manifest, 2) == {"views": (3, 5, 10)}


def test_options_fail_clearly(export) -> None:
    with pytest.raises(UsageError, match="--max-views 2 is outside \\[3, 5\\]"):
        export(tokens="32", stages=1, family_options={"max-views": 2})
    with pytest.raises(UsageError, match="--image-fit"):
        export(tokens="32", stages=1, family_options={"image-fit": "pad"})
    with pytest.raises(UsageError, match="--prompt-template"):
        export(tokens="32", stages=1, family_options={"prompt-template": "nope"})


def test_mistral_and_chatml_checkpoints_get_their_conversations(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from apet.models.llava_next.templates import PROMPT_TEMPLATES, default_template

    assert default_template(SimpleNamespace(model_type="mistral"), None) == "mistral_instruct"
    (tmp_path / "tokenizer.json").write_text('{"added_tokens": [{"content": "<|im_start|>"}]}')
    assert default_template(SimpleNamespace(model_type="llama"), tmp_path) == "chatml_direct"
    assert default_template(SimpleNamespace(model_type="llama"), None) == "vicuna_v1"
    assert PROMPT_TEMPLATES["hf"].startswith("A chat between a curious human")


@pytest.mark.trt
def test_tensorrt_rtx_builds_both_graphs_with_view_profiles(stage1, rtx_api, tmp_path: Path) -> None:
    """The vision profile spans one image's views (3..5) to max_batch images at the largest grid; the prefill
    profile the resulting prompt lengths (--max-views is exercised through the CLI below)."""
    from apet.engines.build import BuildConfig, build_artifact

    target = tmp_path / "built"
    shutil.copytree(stage1["artifact"], target)
    build_artifact(BuildConfig(artifact=target, compute_capabilities=("sm86",), max_context=512, max_batch=2),
                   api=rtx_api)
    report = json.loads((target / "build_report.json").read_text())
    vision = report["engines"]["vision"]["profiles"][0]["shapes"]["pixel_values"]
    assert vision == [[3, 3, 112, 112], [5, 3, 112, 112], [10, 3, 112, 112]]
    prefill, decode = report["engines"]["llm"]["profiles"]
    visual = 32 + 4 * 32 + 2 * PATCHES  # a 2x2 grid: K1 per view + one newline per token row
    assert prefill["shapes"]["inputs_embeds"] == [[1, 2, 64], [1, visual + 40, 64], [2, 512, 64]]
    assert decode["shapes"]["past_key.0"][2] == [2, 2, 511, 16]
    assert (target / "vision.plan").stat().st_size > 10_000 and (target / "llm.plan").stat().st_size > 10_000


def test_cli_export_inspect_run_emit_trtexec(checkpoint: Path, tmp_path: Path, capsys) -> None:
    from apet.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--model", str(checkpoint), "--tokens", "32", "--stages", "1", "--max-views", "3",
                 "--dtype", "fp32", "--out", str(out)]) == 0
    assert "up to 128 per image" in capsys.readouterr().out
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "visual     up to 128 per image: 32 per view x up to 3 views" in text  # 2x1 grid: 32 + 2*32 + 32
    image = tmp_path / "wide.png"
    make_image(5, (300, 120)).save(image)
    assert main(["run", str(out), "--image", str(image), "--prompt", "What is it?", "--json",
                 "--max-new-tokens", "4"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["token_ids"]) == 4 and np.array(record["keep_index"]).shape == (3, 32)
    assert main(["run", str(out), "--image", str(image), "--prompt", "What is it?", "--stats",
                 "--max-new-tokens", "2"]) == 0
    assert "visual tokens [" in capsys.readouterr().err
    assert main(["build", str(out), "--emit-trtexec", "--max-batch", "2"]) == 0
    script = (out / "trtexec.sh").read_text()
    assert "--minShapes=pixel_values:3x3x112x112" in script and "--maxShapes=pixel_values:6x3x112x112" in script
    assert "--shapes=pixel_values:3x3x112x112" in script  # the profiling run: one image at the largest grid


def test_the_readme_ratio_fits_the_tiny_model(adapter) -> None:
    """apet-export --model tiny-llava-next --ratio 0.11 (the README's headline budget) plans two stages."""
    from apet.contracts.plan import plan_compression

    plan = plan_compression(adapter.spec.n_tokens, adapter.spec.decoder.num_layers, ratio=0.11, stages=2)
    assert adapter.spec.n_tokens == N and (plan.stage1_keep, plan.stage2.keep) == (40, 16)  # round8(42.2), (14.1)


def test_bench_on_tiny_llava_next(checkpoint: Path, tmp_path: Path) -> None:
    from apet.bench.run import BenchConfig, run_bench

    results = run_bench(BenchConfig(model=str(checkpoint), out=tmp_path / "bench", ratios=(0.5,), repeats=1,
                                    new_tokens=3, image_size=(224, 224)))
    half = results["runs"][0]["budgets"]
    assert half["views"] == 5 and half["k1"] == 192 and half["k2"] == 64  # 0.75 * 256, 0.25 * 256
    assert 192 + 2 * PATCHES <= half["visual_tokens"] <= 5 * 192 + 2 * PATCHES
    assert results["baselines"]["hf_generate"]["1"]["visual_tokens"] == 5 * N + 2 * PATCHES  # HF: every token
    assert "(5 views)" in (tmp_path / "bench" / "results.md").read_text()


def test_eval_on_the_family(checkpoint: Path, tmp_path: Path) -> None:
    from apet.eval.runner import EvalConfig, run_eval

    images = tmp_path / "images"
    images.mkdir()
    for i, size in enumerate(SIZES.values()):
        make_image(i, size).save(images / f"{i}.png")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "image": f"{i}.png", "question": "Is there a box?",
                                        "answer": "yes", "type": "yesno"}) + "\n" for i in range(3)))
    report = run_eval(EvalConfig(source=str(checkpoint), data=(data,), images=images, out=tmp_path / "out",
                                 ratios=(1.0, 0.5), max_new_tokens=3))
    assert {row["ratio"] for row in report["rows"]} == {1.0, 0.5} and all(row["n"] == 3 for row in report["rows"])
    assert report["conditions"]["full"]["image_fit"] == "anyres"
