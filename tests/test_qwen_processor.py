"""Qwen2.5-VL's torch-free half against Hugging Face: preprocessing, processor files in both layouts, the chat
prompt, window bookkeeping, M-RoPE positions (full and gathered), budgets and their errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from qwen_reference import MAX_PIXELS, MIN_PIXELS, hf_batch

from apet.compression import compress
from apet.contracts.compression import CompressionConfig
from apet.contracts.plan import CompressionPlan, plan_compression
from apet.errors import InputError, UsageError
from apet.manifest import in_memory_manifest
from apet.models.qwen2_5_vl.geometry import grid_bounds, window_layout
from apet.models.qwen2_5_vl.preprocess import (
    QwenImageRecipe,
    preprocess,
    processor_settings,
    recipe_from_settings,
    smart_resize,
)
from apet.models.qwen2_5_vl.processor import QwenProcessor
from apet.models.qwen2_5_vl.templates import prompt_template

SIZES = [(300, 200), (180, 260), (420, 140)]  # landscape, portrait, wide: all upscaled to >= 256 tokens


def _manifest(adapter, ratio: float | None = 1.0, tokens: str | None = None, max_context: int = 4096):
    plan = plan_compression(adapter.spec.n_tokens, adapter.spec.decoder.num_layers, ratio=ratio, tokens=tokens,
                            stages=1, stage1_placement="blend", per_image=True)
    return in_memory_manifest(adapter.spec, plan, dtype="fp32", max_batch=4, max_context=max_context)


@pytest.mark.parametrize("size", SIZES + [(1600, 1200)])
def test_preprocessing_equals_hf_image_processor(size: tuple[int, int]) -> None:
    from transformers import Qwen2VLImageProcessorPil

    image = make_image(7, size)
    patches, grid = preprocess(image, QwenImageRecipe())
    want = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)(images=[image], return_tensors="np")
    assert [1, *grid] == want["image_grid_thw"][0].tolist()
    assert MIN_PIXELS <= grid[0] * grid[1] * 196 <= MAX_PIXELS
    np.testing.assert_allclose(patches, want["pixel_values"], rtol=0, atol=2e-6)


def test_processor_files_in_both_layouts(tiny_qwen_checkpoint: Path, tmp_path: Path) -> None:
    """save_pretrained's nested processor_config.json + chat_template.jinja, and the hub's older
    preprocessor_config.json + chat_template.json, give the same recipe and the same prompt."""
    from transformers import AutoTokenizer

    older = tmp_path / "older"
    shutil.copytree(tiny_qwen_checkpoint, older)
    nested = json.loads((older / "processor_config.json").read_text())
    settings = {**nested["image_processor"], "patch_size": 14, "image_mean": [0.5, 0.5, 0.5]}
    (older / "processor_config.json").unlink()
    (older / "preprocessor_config.json").write_text(json.dumps(settings))
    template_source = (older / "chat_template.jinja").read_text()
    (older / "chat_template.json").write_text(json.dumps({"chat_template": template_source}))
    (older / "chat_template.jinja").unlink()

    assert processor_settings(older)["image_mean"] == [0.5, 0.5, 0.5]
    assert recipe_from_settings(processor_settings(tiny_qwen_checkpoint), 112) == QwenImageRecipe()
    assert recipe_from_settings(processor_settings(older), 112).image_mean == (0.5, 0.5, 0.5)
    template, name = prompt_template(tiny_qwen_checkpoint)
    assert prompt_template(older) == (template, name) and name == "checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen_checkpoint)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is {this}?"}]}]
    assert template.format(prompt="What is {this}?") == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    assert prompt_template(tmp_path)[1] == "qwen_chat"  # no template files: the built-in one


@pytest.mark.parametrize("grid", [(28, 40), (32, 32), (18, 40), (2, 10), (40, 18)])
def test_window_layout_equals_hf_window_index(grid: tuple[int, int]) -> None:
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    layout = window_layout(*grid, QwenImageRecipe())
    grid_thw = torch.tensor([[1, *grid]])
    window_index, cu_seqlens = get_vision_window_index(grid_thw, spatial_merge_size=2, window_size=112, patch_size=14)
    hf_order = (window_index[:, None] * 4 + torch.arange(4)).reshape(-1).numpy()
    ours = layout.window_index.reshape(-1)
    np.testing.assert_array_equal(ours[ours >= 0], hf_order)
    assert [int((w >= 0).sum()) for w in layout.window_index] == torch.diff(cu_seqlens).tolist()
    np.testing.assert_array_equal(layout.window_index.reshape(-1)[layout.window_slot], np.arange(grid[0] * grid[1]))
    np.testing.assert_array_equal(layout.patch_positions, get_vision_position_ids(grid_thw, 2).numpy())


def test_grid_bounds_cover_every_processor_output() -> None:
    recipe = QwenImageRecipe()
    bounds = grid_bounds(recipe)
    assert bounds["patches"] == (1024, 8192)
    for width, height in [(28, 28), (5000, 5000), (6000, 31), (31, 6000), (640, 480), (1344, 1344)]:
        h, w = smart_resize(height, width, 28, recipe.min_pixels, recipe.max_pixels)
        rows, cols = h // 14, w // 14
        layout = window_layout(rows, cols, recipe)
        assert bounds["patches"][0] <= rows * cols <= bounds["patches"][1]
        assert bounds["windows"][0] <= len(layout.window_index) <= bounds["windows"][1]


def test_prompt_ids_and_mrope_positions_equal_get_rope_index(tiny_qwen_adapter) -> None:
    """Left-padded batch of two images of different sizes: ids == the chat template with one image token per
    merged token, positions == get_rope_index; with a subset kept, positions are get_rope_index's gathered."""
    adapter = tiny_qwen_adapter
    images = [make_image(1, SIZES[0]), make_image(2, SIZES[1])]
    prompts = ["What is in the picture?", "How many objects are there and what color are they?"]
    hf = hf_batch(adapter, images, prompts)
    full, _ = adapter.model.model.get_rope_index(hf.input_ids, hf.mm_token_type_ids,
                                                 image_grid_thw=hf.image_grid_thw, attention_mask=hf.attention_mask)
    processor = QwenProcessor(adapter.source_dir, _manifest(adapter))
    inputs = processor.vision_inputs(images)
    assert len(inputs.all_runs()) == 2 and [i.grid for i in inputs.meta] == [tuple(g[1:]) for g in
                                                                            hf.image_grid_thw.tolist()]
    everything = [np.arange(i.tokens) for i in inputs.meta]
    layout = processor.layout(prompts, inputs, everything, 8)
    np.testing.assert_array_equal(layout.token_ids, hf.input_ids.numpy())
    np.testing.assert_array_equal(layout.attention_mask, hf.attention_mask.numpy())
    real = hf.attention_mask.numpy() == 1
    np.testing.assert_array_equal(layout.positions[:, real], full.numpy()[:, real])

    rng = np.random.default_rng(0)
    kept = [np.sort(rng.choice(i.tokens, size=40, replace=False)) for i in inputs.meta]
    compressed = processor.layout(prompts, inputs, kept, 8)
    for b in range(2):
        ids = hf.input_ids[b][real[b]].numpy()
        image = np.nonzero(ids == hf.image_token_id)[0]
        keep = np.ones(len(ids), dtype=bool)
        keep[image] = False
        keep[image[kept[b]]] = True
        want = full.numpy()[:, b][:, real[b]][:, keep]
        got = compressed.positions[:, b][:, compressed.attention_mask[b] == 1]
        np.testing.assert_array_equal(got, want)
    steps = np.ones((2, compressed.token_ids.shape[1] + 3), dtype=np.int64)
    np.testing.assert_array_equal(processor.decode_positions(compressed, steps)[:, :, 0],
                                  compressed.positions[:, :, -1] + 3)


def test_budget_is_the_authors_int_ratio_per_image() -> None:
    config = CompressionConfig(keep=614, keep_ratio=0.3, max_tokens=2048, placement="blend")
    for n in (256, 257, 280, 999, 2048):
        assert config.keep_for(n) == int(0.3 * n)
    assert CompressionConfig(keep=14, keep_ratio=0.7, max_tokens=100).keep_for(90) == int(0.7 * 90) == 62
    assert config.keep_for(20) == 11  # clamped to basis + 1 (the authors would fail there)
    plan = plan_compression(2048, 28, ratio=0.3, stages=1, stage1_placement="blend", per_image=True)
    assert (plan.stage1.keep, plan.stage1.keep_ratio, plan.stage1.max_tokens) == (614, 0.3, 2048)
    assert CompressionPlan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    fixed = plan_compression(2048, 28, tokens="300", stages=1, stage1_placement="blend", per_image=True)
    assert (fixed.stage1.keep, fixed.stage1.keep_ratio, fixed.ratio) == (300, None, None)


def test_fixed_budget_resizes_images_to_at_least_k_tokens(tiny_qwen_adapter) -> None:
    adapter = tiny_qwen_adapter
    manifest = _manifest(adapter, ratio=None, tokens="600")
    spec = adapter.spec
    try:
        adapter.fit_budget(manifest.compression)
        recipe = QwenImageRecipe.from_json(adapter.spec.processor)
        assert recipe.min_pixels == 600 * 28 * 28
        patches, grid = preprocess(make_image(3, (100, 80)), recipe)
        assert grid[0] * grid[1] // 4 >= 600
    finally:
        adapter.spec = spec


def test_budget_and_input_errors() -> None:
    with pytest.raises(UsageError, match="no second ApET stage"):
        plan_compression(2048, 28, ratio=0.3, stages=2, per_image=True)
    with pytest.raises(UsageError, match="two budgets"):
        plan_compression(2048, 28, tokens="96,32", stages=1, per_image=True)
    with pytest.raises(UsageError, match="outside"):
        plan_compression(2048, 28, tokens="4096", stages=1, per_image=True)
    with pytest.raises(UsageError, match="fixed token count"):
        CompressionConfig(keep=30, max_tokens=100, seed=3).validate(50)
    with pytest.raises(InputError, match="outside this budget's range"):
        compress(torch.randn(1, 120, 8), keep=30, keep_ratio=0.3, max_tokens=100)
    with pytest.raises(InputError, match="below the fixed budget"):
        compress(torch.randn(1, 20, 8), keep=30, max_tokens=100)
    with pytest.raises(InputError, match="aspect ratio"):
        smart_resize(10, 2100, 28, MIN_PIXELS, MAX_PIXELS)
