"""Runtime parity: apet-run (ONNX Runtime, torch) against Hugging Face generate (docs/algorithm.md, check 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image
from PIL import Image

from apet.compression import compress
from apet.errors import BackendError, InputError
from apet.media.images import load_image
from apet.models.shared.clip import ClipRecipe, preprocess, processor_settings, recipe_from_settings
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

PROMPTS = ["What is in the picture?", "Describe the image.", "How many objects are there and what color are they?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def images() -> list:
    return [make_image(1, (300, 200)), make_image(2, (180, 260))]


def expand2square(image, mean: list[float]):
    """The original LLaVA's padding (llava/mm_utils.py), restated here independently of apet."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), tuple(int(x * 255) for x in mean))
    result.paste(image, (0, (side - height) // 2) if width > height else ((side - width) // 2, 0))
    return result


def hf_generate(adapter, images: list, prompts: list[str], keep: int, new_tokens: int) -> list[list[int]]:
    """Hugging Face generate on the same checkpoint with ApET stage 1 applied to its image features; images
    padded to a square first, as the original LLaVA-1.5 (and apet's default ``image_fit: pad``) does."""
    from transformers import AutoProcessor
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    processor = AutoProcessor.from_pretrained(adapter.source_dir)
    tokenizer, model = processor.tokenizer, adapter.model
    image_id = model.config.image_token_index
    rows = []
    for prompt in prompts:
        ids = tokenizer(adapter.format_prompt(prompt)).input_ids
        at = ids.index(image_id)
        rows.append(ids[:at] + [image_id] * keep + ids[at + 1:])
    longest = max(map(len, rows))
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    mean = processor.image_processor.image_mean
    pixels = processor.image_processor(images=[expand2square(i, mean) for i in images],
                                       return_tensors="pt")["pixel_values"]

    def compressed_features(pixel_values, **kwargs):
        kept = compress(adapter.vision_features(pixel_values), keep=keep)
        return BaseModelOutputWithPooling(pooler_output=list(adapter.project(kept.tokens)))

    model.model.get_image_features = compressed_features
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
    finally:
        del model.model.get_image_features
    eos = tokenizer.eos_token_id
    return [row[: row.index(eos)] if eos in row else row for row in out[:, longest:].tolist()]  # apet omits EOS


def _generate(pipeline: Pipeline, images: list, prompts: list[str], **kwargs) -> list:
    config = GenerationConfig(max_new_tokens=kwargs.pop("max_new_tokens", NEW_TOKENS), **kwargs)
    return pipeline.generate_batch(images, prompts, config)


@pytest.fixture(scope="module")
def single_stage(artifact_factory, tiny_adapter):
    artifact = artifact_factory(ratio=0.11, stages=1)
    return {"artifact": artifact, "ort": Pipeline.load(artifact, backend="onnxruntime"),
            "torch": Pipeline.load(artifact, backend="torch", adapter=tiny_adapter)}


@pytest.fixture(scope="module")
def two_stage(artifact_factory, tiny_adapter):
    artifact = artifact_factory(ratio=0.11, stages=2)
    return {"artifact": artifact, "ort": Pipeline.load(artifact, backend="onnxruntime"),
            "torch": Pipeline.load(artifact, backend="torch", adapter=tiny_adapter)}


@pytest.mark.parametrize("prompt_index", range(3))
@pytest.mark.parametrize("image_index", range(2))
def test_onnxruntime_and_torch_equal_hf_generate_single_stage(single_stage, tiny_adapter, images, prompt_index: int,
                                                              image_index: int) -> None:
    image, prompt = images[image_index], PROMPTS[prompt_index]
    want = hf_generate(tiny_adapter, [image], [prompt], keep=32, new_tokens=NEW_TOKENS)
    for backend in ("ort", "torch"):
        result = _generate(single_stage[backend], [image], [prompt])[0]
        assert result.token_ids == want[0], backend
        assert result.finish_reason == ("length" if len(want[0]) == NEW_TOKENS else "eos")
    assert len(want[0]) >= 3


def test_batch_of_two_equals_hf_generate_single_stage(single_stage, tiny_adapter, images) -> None:
    prompts = [PROMPTS[0], PROMPTS[2]]  # different lengths: left padding is exercised
    want = hf_generate(tiny_adapter, images, prompts, keep=32, new_tokens=NEW_TOKENS)
    for backend in ("ort", "torch"):
        results = _generate(single_stage[backend], images, prompts)
        assert [r.token_ids for r in results] == want, backend
    single = [_generate(single_stage["ort"], [images[i]], [prompts[i]])[0].token_ids for i in range(2)]
    assert single == want


@pytest.mark.parametrize("batch", [1, 2])
def test_two_stage_onnxruntime_equals_torch_reference(two_stage, images, batch: int) -> None:
    for prompt_index in range(3):
        prompts = [PROMPTS[(prompt_index + i) % 3] for i in range(batch)]
        ort_results = _generate(two_stage["ort"], images[:batch], prompts, max_new_tokens=16)
        torch_results = _generate(two_stage["torch"], images[:batch], prompts, max_new_tokens=16)
        assert [r.token_ids for r in ort_results] == [r.token_ids for r in torch_results]
        assert ort_results[0].keep_index == torch_results[0].keep_index
        stats = ort_results[0].stats
        assert stats.cache_lengths[:2] == [stats.cache_lengths[0]] * 2
        assert stats.cache_lengths[0] - stats.cache_lengths[-1] == 40 - 16  # stage 2 shortened layers 2..3


def test_two_stage_differs_from_single_stage(single_stage, two_stage, images) -> None:
    """Stage 2 really changes the computation (it is not silently skipped)."""
    a = _generate(single_stage["ort"], images[:1], PROMPTS[:1], max_new_tokens=16)[0].token_ids
    b = _generate(two_stage["ort"], images[:1], PROMPTS[:1], max_new_tokens=16)[0].token_ids
    assert a != b


def test_seeded_sampling_is_reproducible(two_stage, images) -> None:
    kwargs = dict(temperature=0.9, top_p=0.9, max_new_tokens=16)
    first = _generate(two_stage["ort"], images[:1], PROMPTS[:1], seed=5, **kwargs)[0].token_ids
    again = _generate(two_stage["ort"], images[:1], PROMPTS[:1], seed=5, **kwargs)[0].token_ids
    other = _generate(two_stage["ort"], images[:1], PROMPTS[:1], seed=6, **kwargs)[0].token_ids
    torch_same = _generate(two_stage["torch"], images[:1], PROMPTS[:1], seed=5, **kwargs)[0].token_ids
    assert first == again == torch_same and first != other


def test_streaming_stop_strings_and_limits(single_stage, images) -> None:
    pipeline = single_stage["ort"]
    pieces: list[str] = []
    full = pipeline.generate(images[1], PROMPTS[1], max_new_tokens=20, stream=lambda row, d: pieces.append(d))
    assert "".join(pieces) == full.text and full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    streamed: list[str] = []
    stopped = pipeline.generate(images[1], PROMPTS[1], max_new_tokens=20, stop=[stop],
                                stream=lambda row, d: streamed.append(d))
    assert stopped.finish_reason == "stop" and stop not in stopped.text and full.text.startswith(stopped.text)
    assert len(stopped.token_ids) < 20
    assert "".join(streamed) == stopped.text  # the stream never shows the stop string, not even in part


def test_eos_ends_generation(single_stage, images, monkeypatch: pytest.MonkeyPatch) -> None:
    pipeline = single_stage["ort"]
    first = pipeline.generate(images[0], PROMPTS[0], max_new_tokens=8).token_ids
    monkeypatch.setattr(pipeline, "eos_ids", {first[3]})
    result = pipeline.generate(images[0], PROMPTS[0], max_new_tokens=8)
    assert result.finish_reason == "eos" and result.token_ids == first[:3]


def test_preprocessing_equals_hf_image_processor(tiny_checkpoint: Path) -> None:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_checkpoint).image_processor
    from apet.adapters.llava.adapter import LlavaAdapter

    default = ClipRecipe.from_json(LlavaAdapter.load(tiny_checkpoint).spec.processor)
    assert default.image_fit == "pad"  # the original LLaVA-1.5 recipe is the default
    padded = recipe_from_settings(processor_settings(tiny_checkpoint), 224, "pad")
    assert padded == default
    cropped = replace(padded, image_fit="crop")
    for seed, size in enumerate([(300, 200), (200, 300), (224, 224), (640, 97), (50, 40), (301, 200)]):
        image = make_image(seed, size)
        want = processor(images=image, return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(preprocess(load_image(image), cropped), want, atol=1e-5)
        want = processor(images=expand2square(image, processor.image_mean), return_tensors="np")["pixel_values"][0]
        np.testing.assert_allclose(preprocess(load_image(image), padded), want, atol=1e-5)


def test_stats_are_populated(two_stage, images) -> None:
    result = _generate(two_stage["torch"], images[:1], PROMPTS[:1], max_new_tokens=4)[0]
    s = result.stats
    assert s.backend == "torch" and s.visual_tokens == [40] and s.new_tokens == 4
    assert s.ttft_ms >= s.prefill_ms > 0 and s.apet_ms is not None and s.decode_tokens_per_s > 0
    assert s.peak_rss_mb > 10


def test_prompt_over_max_context_fails_before_compute(single_stage, images) -> None:
    pipeline = single_stage["ort"]
    with pytest.raises(InputError, match="max_context"):
        pipeline.generate(images[0], "word " * 2000, max_new_tokens=4)
    with pytest.raises(InputError, match="max batch"):
        pipeline.generate_batch(images * 3, PROMPTS * 2, GenerationConfig(max_new_tokens=2))


def test_tensorrt_backend_needs_a_gpu(single_stage) -> None:
    from apet.runtime.pipeline import make_backend

    with pytest.raises(BackendError, match="CUDA"):
        make_backend("tensorrt", single_stage["artifact"], single_stage["ort"].manifest, device="cpu")


def test_readme_demo_commands(tmp_path: Path) -> None:
    """apet-export --model tiny --ratio 0.11 --out demo && apet-run demo --image @demo --prompt ..."""
    demo = tmp_path / "demo"
    export = subprocess.run([sys.executable, "-m", "apet.cli", "export", "--model", "tiny", "--ratio", "0.11",
                             "--out", str(demo)], capture_output=True, text=True)
    assert export.returncode == 0, export.stderr
    run = subprocess.run([sys.executable, "-m", "apet.cli", "run", str(demo), "--image", "@demo", "--prompt",
                          "Describe the image.", "--json", "--max-new-tokens", "8"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    record = json.loads(run.stdout)
    assert len(record["token_ids"]) == 8 and record["stats"]["backend"] == "onnxruntime"
    assert record["stats"]["cache_lengths"][0] > record["stats"]["cache_lengths"][-1]
    streamed = subprocess.run([sys.executable, "-m", "apet.cli", "run", str(demo), "--image", "@demo", "--prompt",
                               "Describe the image.", "--stats", "--max-new-tokens", "8"], capture_output=True,
                              text=True)
    assert streamed.returncode == 0 and "TTFT" in streamed.stderr and "tokens/s" in streamed.stderr



@pytest.mark.parametrize("batch", [1, 2])
def test_static_cache_path_equals_reference(two_stage, tiny_adapter, images, batch: int) -> None:
    """The GPU fast path (static KV cache, bucketed prompts; graphs off on CPU) gives the same tokens."""
    static = Pipeline.load(two_stage["artifact"], backend="torch", adapter=tiny_adapter, torch_mode="static")
    prompts = [PROMPTS[2], PROMPTS[0]][:batch]
    want = _generate(two_stage["torch"], images[:batch], prompts, max_new_tokens=16)
    got = _generate(static, images[:batch], prompts, max_new_tokens=16)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert got[0].stats.cache_lengths == want[0].stats.cache_lengths


def test_grouped_decode_attention_equals_repeated_kv() -> None:
    """The static decoder's decode step folds each kv head's query group instead of copying the cache per head."""
    import torch.nn.functional as F

    from apet.modeling.blocks import repeat_kv
    from apet.runtime.static_decoder import grouped_decode_attention

    generator = torch.Generator().manual_seed(0)
    batch, kv, groups, length, dim = 2, 3, 4, 11, 8
    q = torch.randn(batch, kv * groups, 1, dim, generator=generator, dtype=torch.float64)
    keys, values = (torch.randn(batch, kv, length, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    valid = torch.rand(batch, length, generator=generator) > 0.4
    valid[:, -1] = True
    bias = torch.zeros(batch, length, dtype=torch.float64).masked_fill(~valid, -1e30)[:, None, None, :]
    want = F.scaled_dot_product_attention(q, repeat_kv(keys, groups), repeat_kv(values, groups), attn_mask=bias)
    got = grouped_decode_attention(q, keys, values, bias, groups)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # a wrong head-to-group assignment would not pass: swap two kv heads
    swapped = grouped_decode_attention(q, keys[:, [1, 0, 2]], values[:, [1, 0, 2]], bias, groups)
    assert not torch.allclose(swapped, want)


def test_decode_span_doubles_from_the_quantum_up_to_the_capacity() -> None:
    from apet.runtime.static_decoder import decode_span

    assert [decode_span(n, 2472) for n in (1, 256, 257, 600, 1025, 2048, 2049, 2472)] == \
        [256, 256, 512, 1024, 2048, 2048, 2472, 2472]
    assert decode_span(60, 64) == 64  # a buffer smaller than the quantum
    with pytest.raises(ValueError, match="holds 2472"):
        decode_span(2473, 2472)


def test_decode_over_a_span_equals_decode_over_the_whole_buffer(tiny_adapter) -> None:
    """Attending over the span (the buffer's used prefix, rounded up) is the same step as over the whole static
    buffer, in both cache groups of a two-stage schedule; a span that misses the new token's position is not."""
    from apet.contracts.plan import plan_compression
    from apet.runtime.static_decoder import StaticDecoder

    spec = tiny_adapter.spec
    plan = plan_compression(spec.n_tokens, spec.decoder.num_layers, ratio=0.11, stages=2)
    start, length, hidden = 5, 5 + plan.stage1_keep + 10, spec.decoder.hidden_size
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, length, hidden, generator=generator)
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    steps = [torch.randn(2, 1, hidden, generator=generator) for _ in range(4)]

    def run(span_of) -> list[torch.Tensor]:
        decoder = StaticDecoder(tiny_adapter, plan.stage2, max_batch=2, max_context=1200)
        out = [decoder.prefill(embeds, mask, positions, torch.tensor([start, start]))]
        for i, step in enumerate(steps):
            out.append(decoder.decode(step, positions[:, -1:] + 1 + i, span_of(decoder, length + i)))
        return out

    whole = run(lambda decoder, context: None)
    spanned = run(lambda decoder, context: decoder.span(context))
    assert StaticDecoder(tiny_adapter, plan.stage2, 2, 1200).span(length) == 256 < 1200
    for got, want in zip(spanned, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    short = run(lambda decoder, context: context)  # leaves out the position written this step
    assert not torch.allclose(short[1], whole[1], atol=1e-3)
