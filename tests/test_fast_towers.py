"""The vision towers' GPU fast path (apet.modeling.fast_path) computes what the graph form computes.

On the GPU the fast path runs packed window segments (FlashAttention varlen), mask-free SDPA, one-pass norms and
concatenated projections; here it runs on CPU (forced), where the varlen call is SDPA with the equivalent
block-diagonal mask, so the window bookkeeping (window order, segment bounds of every image of the batch, the
permutation back) and the fused rotary / norm / projection math are checked against the graph form, which the
family tests check against Hugging Face. Odd grids make edge windows partial. scripts/gpu_towers.py runs the same
comparison on CUDA with the flash kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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



def _rotary_kernel_checks() -> None:
    """The Triton rotary pass == x·cos + rotate_half(x)·sin in fp32, for Qwen2.5-VL's and Qwen3-VL's head sizes,
    fp16 and fp32 outputs, a batch of two; the fast Rotary takes it."""
    from apet.adapters.qwen2_5_vl.vision import Rotary, _rotate_half
    from apet.kernels import rotary

    torch.manual_seed(0)
    for heads, head, dtype in ((2, 80, torch.float16), (3, 72, torch.float32)):
        qkv = torch.randn(2, 7, 3, heads, head).to(dtype)
        angles = torch.randn(7, head) * 3
        cos, sin = angles.cos(), angles.sin()
        fused = Rotary.of(cos, sin, fused=True)
        assert rotary.available(qkv)
        got = rotary.rotate_qk(qkv, fused.cos, fused.sin, dtype)
        x = qkv[:, :, :2].float()
        want = (x * cos[:, None, None] + _rotate_half(x) * sin[:, None, None]).to(dtype)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        q, k, v = fused.qkv(qkv, dtype)
        assert torch.equal(q, got[:, :, 0]) and torch.equal(k, got[:, :, 1]) and torch.equal(v, qkv[:, :, 2])


def _activation_kernel_checks() -> None:
    """silu(gate)·up and x·sigmoid(1.702x) in one pass == the torch ops (rows not a multiple of the block)."""
    from apet.kernels import activations

    torch.manual_seed(0)
    gate_up = torch.randn(3, 5, 2 * 1100) * 4
    assert activations.available(gate_up)
    gate, up = gate_up.split(1100, dim=-1)
    torch.testing.assert_close(activations.silu_mul(gate_up), torch.nn.functional.silu(gate) * up,
                               rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 1300) * 4
    torch.testing.assert_close(activations.quick_gelu(x), x * torch.sigmoid(1.702 * x), rtol=1e-6, atol=1e-6)


def _towers_with_kernels(qwen_checkpoint: str, llava_checkpoint: str) -> None:
    """The fast towers with every Triton pass taken (rotary, silu·up, quick_gelu) == the graph form."""
    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.adapters.qwen2_5_vl.adapter import QwenAdapter
    from apet.adapters.qwen2_5_vl.vision import QwenVisionStages
    from apet.adapters.shared.clip_tower import clip_features

    qwen, llava = QwenAdapter.load(qwen_checkpoint), LlavaAdapter.load(llava_checkpoint)
    recipe = QwenImageRecipe.from_json(qwen.spec.processor)
    layout = window_layout(10, 6, recipe)
    torch.manual_seed(1)
    inputs = (torch.randn(2, 60, recipe.patch_dim), *(torch.from_numpy(a) for a in layout.arrays().values()))
    graph, fast = _both(QwenVisionStages(qwen, lambda x: x).features, *inputs)
    torch.testing.assert_close(fast, graph, rtol=ATOL, atol=ATOL)
    pixels = torch.randn(2, 3, llava.spec.processor["crop_height"], llava.spec.processor["crop_width"])
    layer = llava.spec.extra["vision_feature_layer"]
    graph, fast = _both(lambda p: clip_features(llava.vision_tower(), p, layer, "default"), pixels)
    torch.testing.assert_close(fast, graph, rtol=ATOL, atol=ATOL)


def test_triton_kernels_under_the_interpreter(tiny_qwen_checkpoint, tiny_checkpoint, tmp_path) -> None:
    """apet.kernels.rotary and .activations (the uncompiled GPU fast path's Triton passes) run by Triton's
    interpreter on CPU: equal to the torch forms, and the towers that take them equal the graph form. A
    subprocess: TRITON_INTERPRET is read when the kernels are defined (as tests/test_kernels.py does)."""
    pytest.importorskip("triton")
    script = tmp_path / "run.py"
    script.write_text("import sys\nimport test_fast_towers as t\nt._rotary_kernel_checks()\n"
                      "t._activation_kernel_checks()\nt._towers_with_kernels(sys.argv[1], sys.argv[2])\n")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parents[1])])}
    done = subprocess.run([sys.executable, str(script), str(tiny_qwen_checkpoint), str(tiny_checkpoint)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def test_fast_linears_name_linears_the_towers_have(qwen, qwen3, llava) -> None:
    """What prepare_fast concatenates exists in each tower (CLIP: q/k/v; Qwen3-VL: none; Qwen2.5-VL: none, its
    gated MLPs are padded and fused by apet.modeling.aligned_mlp instead)."""
    from apet.models.registry import get_family

    for adapter, count in ((qwen, 0), (qwen3, 0), (llava, None)):
        stages = get_family(adapter.family).vision_stages(adapter, lambda x: x)
        linears = stages.fast_linears()
        assert len(linears) == count if count is not None else linears
        assert all(isinstance(getattr(owner, name), torch.nn.Linear) for owner, names in linears for name in names)
