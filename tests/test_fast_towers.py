"""The vision towers' GPU fast path (apet.modeling.fast_path) computes what the graph form computes.

On the GPU the fast path runs packed window segments (FlashAttention varlen), mask-free SDPA, one-pass norms and
concatenated projections; here it runs on CPU (forced), where the varlen call is SDPA with the equivalent
block-diagonal mask, so the window bookkeeping (window order, segment bounds of every image of the batch, the
permutation back) and the fused rotary / norm / projection math are checked against the graph form, which the
family tests check against Hugging Face. Odd grids make edge windows partial. scripts/gpu_towers.py runs the same
comparison on CUDA with the flash kernels."""

from __future__ import annotations

import pytest
import torch

from apet.modeling.fast_path import FAST_TOWERS, fast_tower
from apet.models.qwen2_5_vl.geometry import patch_positions, window_layout
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe

ATOL = 1e-5


# fresh copies of the tiny models: the fast path re-points q/k/v and gate/up weights at slices of their
# concatenation (same values), which the session adapters other tests export should not see
@pytest.fixture(scope="module")
def llava(tiny_checkpoint):
    from apet.adapters.llava.adapter import LlavaAdapter

    return LlavaAdapter.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def qwen(tiny_qwen_checkpoint):
    from apet.adapters.qwen2_5_vl.adapter import QwenAdapter

    return QwenAdapter.load(tiny_qwen_checkpoint)


@pytest.fixture(scope="module")
def qwen3(tiny_qwen3_checkpoint):
    from apet.adapters.qwen3_vl.adapter import Qwen3Adapter

    return Qwen3Adapter.load(tiny_qwen3_checkpoint)


def _both(features, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(graph form, fast path) of one tower call."""
    with torch.no_grad():
        FAST_TOWERS["off_cuda"] = False
        graph = features(*inputs)
        FAST_TOWERS["off_cuda"] = True
        try:
            fast = features(*inputs)
        finally:
            FAST_TOWERS["off_cuda"] = False
    return graph, fast


def test_fast_path_is_eager_cuda_only() -> None:
    x = torch.zeros(2, 3)
    assert not fast_tower(x)  # CPU: the reference forms, unchanged
    FAST_TOWERS["off_cuda"] = True
    try:
        assert fast_tower(x)
        traced = torch.jit.trace(lambda t: t + float(fast_tower(t)), (x,))
        assert torch.equal(traced(x), x)  # never while tracing: exported graphs keep their forms
        FAST_TOWERS["enabled"] = False
        assert not fast_tower(x)
    finally:
        FAST_TOWERS["off_cuda"], FAST_TOWERS["enabled"] = False, True


@pytest.mark.parametrize(("rows", "cols", "batch"), [(10, 14, 2), (16, 6, 1), (8, 8, 3)])
def test_qwen2_5_windows_as_packed_segments_equal_the_graph_form(qwen, rows: int, cols: int,
                                                                  batch: int) -> None:
    """Patches in window order, every window of every image one segment, back in merge-block order before the
    merger: the merged tokens equal the graph form's (gathered windows with a key mask) to 1e-5."""
    from apet.adapters.qwen2_5_vl.vision import PackedWindows, QwenVisionStages

    adapter = qwen
    recipe = QwenImageRecipe.from_json(adapter.spec.processor)
    layout = window_layout(rows, cols, recipe)
    torch.manual_seed(rows * cols + batch)
    pixels = torch.randn(batch, rows * cols, recipe.patch_dim)
    inputs = (pixels, *(torch.from_numpy(a) for a in layout.arrays().values()))
    stages = QwenVisionStages(adapter, lambda x: x)
    graph, fast = _both(stages.features, *inputs)
    assert graph.shape == fast.shape == (batch, rows * cols // 4, adapter.spec.decoder.hidden_size)
    torch.testing.assert_close(fast, graph, rtol=ATOL, atol=ATOL)
    # the segments: each window's real patches, image after image; order/restore invert each other
    windows = PackedWindows.of(*(torch.from_numpy(layout.arrays()[n]) for n in ("window_index", "window_slot")),
                               batch)
    lengths = (layout.window_index >= 0).sum(1)
    assert windows.cu_seqlens.tolist() == [0, *torch.tensor(lengths).repeat(batch).cumsum(0).tolist()]
    assert windows.order.tolist() == [p for p in layout.window_index.reshape(-1).tolist() if p >= 0]
    assert torch.equal(windows.order[windows.restore], torch.arange(rows * cols))
    assert lengths.min() < layout.window_index.shape[1] or rows * cols == 64  # partial edge windows exercised


@pytest.mark.parametrize(("rows", "cols", "batch"), [(10, 14, 2), (6, 8, 1)])
def test_qwen3_full_attention_and_deepstack_taps_equal_the_graph_form(qwen3, rows: int, cols: int,
                                                                      batch: int) -> None:
    from apet.adapters.qwen3_vl.vision import Qwen3VisionStages

    adapter = qwen3
    recipe = adapter.recipe()
    torch.manual_seed(rows + cols)
    pixels = torch.randn(batch, rows * cols, recipe.patch_dim)
    positions = torch.from_numpy(patch_positions(rows, cols, recipe.merge_size))
    stages = Qwen3VisionStages(adapter, lambda x: x)
    graph, fast = _both(stages.features, pixels, positions)
    levels = len(stages.levels)
    assert fast.shape == (batch, rows * cols // 4, (1 + levels) * stages.hidden)
    torch.testing.assert_close(fast, graph, rtol=ATOL, atol=ATOL)


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_clip_fused_layers_equal_hugging_face_layers(llava, strategy: str) -> None:
    """CLIP (LLaVA-1.5, NeXT, Video-LLaVA) with q/k/v as one matmul and mask-free SDPA == Hugging Face's
    CLIPEncoderLayer loop up to the select layer, for a stack of views; the modules still compute what they did
    (their weights are slices of the concatenation)."""
    from apet.adapters.shared.clip_tower import clip_features

    adapter = llava
    tower = adapter.vision_tower()
    recipe = adapter.spec.processor
    torch.manual_seed(5)
    pixels = torch.randn(3, 3, recipe["crop_height"], recipe["crop_width"])
    layer = adapter.spec.extra["vision_feature_layer"]
    graph, fast = _both(lambda p: clip_features(tower, p, layer, strategy), pixels)
    torch.testing.assert_close(fast, graph, rtol=ATOL, atol=ATOL)
    with torch.no_grad():
        hidden = tower(pixels, output_hidden_states=True).hidden_states[layer]
    torch.testing.assert_close(graph, hidden[:, 1:] if strategy == "default" else hidden, rtol=0, atol=0)
