"""InternVL3 / 3.5 end to end on a seeded tiny checkpoint: dynamic tiling and pixels against Hugging Face's image
processor, per-tile kept indices against the float64 oracle (ApET after and before the projector), greedy tokens
against Hugging Face ``generate`` (uncompressed, and with the same per-tile compression through HF modules),
options, engines and the CLI on the family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import numpy_reference as ref
import onnxruntime as ort
import pytest
import torch
from conftest import make_image

from apet.compression import compress
from apet.errors import ArtifactError, UsageError
from apet.manifest import read_manifest
from apet.models.internvl import tiling
from apet.models.registry import family_of
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

PROMPTS = ["What is in the picture?", "Describe the image.", "How many objects are there and what color are they?"]
# (width, height): one 448-px tile; a 3x2 grid + thumbnail; a 2x3 grid + thumbnail
SIZES = {"square": (256, 256), "wide": (300, 200), "tall": (180, 260)}
NEW_TOKENS = 10
N, K = 256, 64  # tokens per view; the compressed exports keep K per view (--tokens 64 = --ratio 0.25)


@pytest.fixture(scope="module")
def checkpoint(tiny_internvl_checkpoint: Path) -> Path:
    return tiny_internvl_checkpoint


@pytest.fixture(scope="module")
def adapter(checkpoint: Path):
    from apet.adapters.internvl.adapter import InternVLAdapter

    return InternVLAdapter.load(checkpoint)


@pytest.fixture(scope="module")
def export(internvl_artifact_factory):
    return internvl_artifact_factory


@pytest.fixture(scope="module")
def images() -> dict:
    return {name: make_image(i + 1, size) for i, (name, size) in enumerate(SIZES.items())}


def _pipelines(artifact: Path, adapter) -> dict[str, Pipeline]:
    return {"ort": Pipeline.load(artifact, backend="onnxruntime"),
            "torch": Pipeline.load(artifact, backend="torch", adapter=adapter)}


def _generate(pipeline: Pipeline, images: list, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list:
    return pipeline.generate_batch(images, prompts, GenerationConfig(max_new_tokens=new_tokens))


# -- an independent reference built from Hugging Face pieces only ---------------------------------------------------
def hf_image_processor(checkpoint: Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(checkpoint)  # GotOcr2ImageProcessorPil: no torchvision needed


def hf_batch(adapter, images: list, prompts: list[str], visual: list[int] | None = None) -> dict:
    """What ``InternVLProcessor`` returns: tiles (``crop_to_patches``, which the processor turns on), the chat
    template's text with each image placeholder expanded by the processor's own ``replace_image_token`` (``visual``
    overrides the tokens per image: the compressed reference), left-padded ids. The processor itself is not built:
    its video processor needs torchvision."""
    from transformers import AutoTokenizer, InternVLProcessor

    tokenizer = AutoTokenizer.from_pretrained(adapter.source_dir)
    processed = hf_image_processor(adapter.source_dir)(images=images, crop_to_patches=True, return_tensors="pt")
    expand = SimpleNamespace(start_image_token="<img>", end_image_token="</img>", image_token="<IMG_CONTEXT>",
                             image_seq_length=N)
    rows = []
    for i, prompt in enumerate(prompts):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if visual is None:
            span = InternVLProcessor.replace_image_token(expand, {"num_patches": processed["num_patches"]}, i)
        else:
            span = "<img>" + "<IMG_CONTEXT>" * visual[i] + "</img>"
        rows.append(tokenizer(text.replace("<IMG_CONTEXT>", span)).input_ids)
    longest = max(map(len, rows))
    pad = tokenizer.pad_token_id
    return {"input_ids": torch.tensor([[pad] * (longest - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows]),
            "pixel_values": processed["pixel_values"], "num_patches": processed["num_patches"].tolist()}


def _strip(out: torch.Tensor, prompt_length: int, eos: tuple[int, ...]) -> list[list[int]]:
    rows = []
    for row in out[:, prompt_length:].tolist():
        stops = [row.index(e) for e in eos if e in row]
        rows.append(row[: min(stops)] if stops else row)
    return rows


def hf_generate(adapter, images: list, prompts: list[str], new_tokens: int = NEW_TOKENS) -> list:
    batch = hf_batch(adapter, images, prompts)
    with torch.no_grad():
        out = adapter.model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     pixel_values=batch["pixel_values"], do_sample=False, max_new_tokens=new_tokens)
    return _strip(out, batch["input_ids"].shape[1], adapter.spec.eos_token_ids)


def hf_view_features(model, pixel_values: torch.Tensor, before_projector: bool) -> torch.Tensor:
    """What ApET sees per view, from Hugging Face's modules: ``get_image_features`` (after the projector), or its
    steps up to the projector (tower, CLS dropped, the model's ``pixel_shuffle``)."""
    inner = model.model
    with torch.no_grad():
        if not before_projector:
            return inner.get_image_features(pixel_values=pixel_values, vision_feature_layer=-1,
                                            vision_feature_select_strategy="default").pooler_output
        hidden = inner.vision_tower(pixel_values=pixel_values).last_hidden_state[:, 1:]
        side = int(hidden.shape[1] ** 0.5)
        shuffled = inner.pixel_shuffle(hidden.reshape(hidden.shape[0], side, side, -1), scale_factor=0.5)
        return shuffled.reshape(hidden.shape[0], -1, shuffled.shape[-1])


def hf_generate_compressed(adapter, images: list, prompts: list[str], keep: int, before_projector: bool) -> list:
    """Hugging Face generate whose image features are ApET on every view (HF's tower, shuffle and projector), the
    views' kept tokens in view order: the layout HF's masked_scatter gives, with K per view instead of 256."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    model = adapter.model
    batch = hf_batch(adapter, images, prompts)
    spans, start = [], 0
    with torch.no_grad():
        for views in batch["num_patches"]:
            features = hf_view_features(model, batch["pixel_values"][start:start + views], before_projector)
            kept = compress(features, keep=keep).tokens
            spans.append((model.model.multi_modal_projector(kept) if before_projector else kept).flatten(0, 1))
            start += views
    batch = hf_batch(adapter, images, prompts, visual=[len(s) for s in spans])
    with torch.no_grad():
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             mm_encoder_outputs={"image": BaseModelOutputWithPooling(pooler_output=torch.cat(spans))},
                             do_sample=False, max_new_tokens=NEW_TOKENS)
    return _strip(out, batch["input_ids"].shape[1], adapter.spec.eos_token_ids)


# -- tiling and preprocessing ---------------------------------------------------------------------------------------
def test_tiling_equals_hugging_face() -> None:
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
        get_optimal_tiled_canvas,
    )

    processor = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448})
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(10, 4000, (150, 2))]
    sizes += [(448, 896), (896, 448), (448, 448), (1344, 896), (200, 800), (20, 2000), (1, 3)]  # exact ratios: ties
    for min_tiles, max_tiles in ((1, 12), (1, 6), (2, 6), (1, 1), (1, 2), (3, 40)):
        kwargs = {"crop_to_patches": True, "min_patches": min_tiles, "max_patches": max_tiles}
        for size in sizes:
            ours = tiling.Tiling.of(size, 448, min_tiles, max_tiles)
            if max_tiles > 1:
                assert ours.grid == get_optimal_tiled_canvas(size, (448, 448), min_tiles, max_tiles), size
            assert ours.views == processor.get_number_of_image_patches(*size, kwargs), (size, max_tiles)
    assert tiling.most_views(1, 12) == 13 and tiling.fewest_views(1, 12) == 1 and tiling.most_views(2, 6) == 7
    assert tiling.most_views(1, 1) == 1 and tiling.views_for(1) == 1 and tiling.views_for(2) == 3


def test_views_equal_hugging_face_image_processor(adapter, checkpoint: Path) -> None:
    from apet.contracts.plan import plan_compression
    from apet.manifest import in_memory_manifest
    from apet.models.internvl.processor import InternVLProcessor

    manifest = in_memory_manifest(adapter.spec, plan_compression(N, 4, ratio=1.0, stages=1), dtype="fp32",
                                  max_batch=4, max_context=4096)
    processor = InternVLProcessor(checkpoint, manifest)
    sizes = [*SIZES.values(), (1000, 90), (90, 1000), (900, 900), (40, 30), (449, 448)]
    batch = [make_image(i, size) for i, size in enumerate(sizes)]
    ours = processor.vision_inputs(batch)
    want = hf_image_processor(checkpoint)(images=batch, crop_to_patches=True, return_tensors="np")
    assert [t.views for t in ours.meta] == want["num_patches"].tolist()
    assert [t.grid for t in ours.meta][:3] == [(1, 1), (3, 2), (2, 3)]  # the test images' three grids
    np.testing.assert_allclose(ours.arrays["pixel_values"], want["pixel_values"], atol=1e-5)


def test_chat_templates_render_to_one_image_span() -> None:
    from apet.adapters.internvl.tiny import CHAT_TEMPLATE
    from apet.models.internvl.templates import DEFAULT_TEMPLATE, render_prompt_template

    assert render_prompt_template(CHAT_TEMPLATE) == DEFAULT_TEMPLATE
    # transformers' conversion script wrote <image> (before InternVLProcessor expanded <IMG_CONTEXT>)
    assert render_prompt_template(CHAT_TEMPLATE.replace("<IMG_CONTEXT>", "<image>")) == DEFAULT_TEMPLATE
    with pytest.raises(ArtifactError, match="one image and one text"):
        render_prompt_template("{{ messages[0]['content'][1]['text'] }}")


# -- ratio 1.0 against Hugging Face generate ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full(export, adapter) -> dict:
    artifact = export(ratio=1.0)
    return {"artifact": artifact, **_pipelines(artifact, adapter)}


@pytest.mark.parametrize("name", list(SIZES))
def test_ratio_one_equals_hf_generate(full, adapter, images, name: str) -> None:
    image = images[name]
    want = hf_generate(adapter, [image], [PROMPTS[0]])
    views = hf_batch(adapter, [image], ["x"])["num_patches"][0]
    for backend in ("ort", "torch"):
        result = _generate(full[backend], [image], [PROMPTS[0]])[0]
        assert result.token_ids == want[0], backend
        assert result.stats.visual_tokens == [views * N] and np.array(result.keep_index).shape == (views, N)
    assert len(want[0]) >= 3


def test_ratio_one_batch_of_two_equals_hf_generate(full, adapter, images) -> None:
    batch, prompts = [images["tall"], images["square"]], [PROMPTS[2], PROMPTS[1]]  # 7 and 1 views, left padding
    want = hf_generate(adapter, batch, prompts)
    for backend in ("ort", "torch"):
        assert [r.token_ids for r in _generate(full[backend], batch, prompts)] == want, backend


def test_internvl3_qwen2_decoder_ratio_one_equals_hf_generate(images, tmp_path: Path) -> None:
    """InternVL3's language model (Qwen2.5: q/k/v bias, no q/k norm) through the same family."""
    from apet.adapters.internvl.adapter import InternVLAdapter
    from apet.adapters.internvl.tiny import TinyInternVLConfig, create_tiny_internvl
    from apet.export.artifact import ExportConfig, export_artifact

    checkpoint = create_tiny_internvl(tmp_path / "qwen2", config=TinyInternVLConfig(text_model="qwen2"))
    adapter = InternVLAdapter.load(checkpoint)
    assert not adapter.spec.decoder.qk_norm and adapter.model.config.text_config.model_type == "qwen2"
    export_artifact(ExportConfig(model=str(checkpoint), out=tmp_path / "art", ratio=1.0, dtype="fp32", max_batch=1))
    image = images["tall"]
    want = hf_generate(adapter, [image], [PROMPTS[1]])
    for pipeline in _pipelines(tmp_path / "art", adapter).values():
        assert _generate(pipeline, [image], [PROMPTS[1]])[0].token_ids == want[0]
    assert len(want[0]) >= 3


# -- compressed: per-tile indices, HF-modules reference -------------------------------------------------------------
@pytest.fixture(scope="module")
def compressed(export, adapter) -> dict:
    """--tokens 64 with ApET after the projector (default) and before it."""
    out = {}
    for where in ("after-projector", "before-projector"):
        artifact = export(tokens=str(K), family_options={"apet-at": where})
        out[where] = {"artifact": artifact, **_pipelines(artifact, adapter)}
    return out


@pytest.mark.parametrize("where", ["after-projector", "before-projector"])
def test_per_tile_kept_indices_equal_oracle(compressed, adapter, images, where: str) -> None:
    pipeline = compressed[where]["ort"]
    inputs = pipeline.processor.vision_inputs([images["wide"], images["square"]])
    pixels = inputs.arrays["pixel_values"]
    session = ort.InferenceSession(str(compressed[where]["artifact"] / "vision.onnx"),
                                   providers=["CPUExecutionProvider"])
    embeds, index = session.run(None, {"pixel_values": pixels})
    assert pixels.shape[0] == 7 + 1 and index.shape == (8, K) == embeds.shape[:2]
    before = where == "before-projector"
    features = hf_view_features(adapter.model, torch.from_numpy(pixels), before)
    oracle_tokens, oracle_index = ref.compress(features.double().numpy(), K, 10)
    np.testing.assert_array_equal(index, oracle_index)  # every view on its own, in position order
    oracle = torch.from_numpy(oracle_tokens).float()
    with torch.no_grad():
        oracle_embeds = adapter.model.model.multi_modal_projector(oracle) if before else oracle
    np.testing.assert_allclose(embeds, oracle_embeds.numpy(), rtol=1e-3, atol=1e-3)
    manifest = read_manifest(compressed[where]["artifact"])
    assert manifest.model.extra["apet_at"] == where
    assert manifest.model.vision_dim == (4 * 32 if before else 64)  # shuffled ViT width or the LLM width


@pytest.mark.parametrize(("where", "names"), [("after-projector", ("wide",)), ("after-projector", ("tall", "square")),
                                              ("before-projector", ("square", "tall"))])
def test_compressed_equals_hf_modules_reference(compressed, adapter, images, where: str, names: tuple) -> None:
    batch, prompts = [images[n] for n in names], PROMPTS[:len(names)]
    want = hf_generate_compressed(adapter, batch, prompts, keep=K, before_projector=where == "before-projector")
    for backend in ("ort", "torch"):
        results = _generate(compressed[where][backend], batch, prompts)
        assert [r.token_ids for r in results] == want, backend
        assert [np.array(r.keep_index).shape[1] for r in results] == [K] * len(names)


def test_compression_changes_the_answer(full, compressed, images) -> None:
    one = _generate(full["ort"], [images["wide"]], PROMPTS[:1], new_tokens=14)[0].token_ids
    kept = _generate(compressed["after-projector"]["ort"], [images["wide"]], PROMPTS[:1], new_tokens=14)[0].token_ids
    assert one != kept


# -- budgets, manifest, options ------------------------------------------------------------------------------------
def test_budgets_are_per_view(adapter) -> None:
    """--ratio r keeps round8(r·256) of every view; --tokens K exactly K; one stage."""
    from apet.contracts.plan import Budget, plan_for
    from apet.models.registry import get_family

    family = get_family("internvl")
    keeps = {r: plan_for(adapter.spec, family, Budget(ratio=r)).stage1_keep for r in (1.0, 0.5, 0.25, 0.11)}
    assert keeps == {1.0: 256, 0.5: 128, 0.25: 64, 0.11: 32}  # 0.11 * 256 = 28.2 -> 32
    assert plan_for(adapter.spec, family, Budget(tokens="37")).stage1_keep == 37
    assert plan_for(adapter.spec, family, Budget(ratio=0.25)).stage2 is None
    with pytest.raises(UsageError, match="has 1 stage"):
        plan_for(adapter.spec, family, Budget(ratio=0.25, stages=2))


def test_manifest_records_tiles_and_budgets(full, compressed) -> None:
    manifest = read_manifest(compressed["after-projector"]["artifact"], verify_checksums=True)
    family = family_of(manifest)
    assert manifest.model.family == "internvl" and manifest.visual_tokens == K
    assert manifest.model.decoder.qk_norm  # tiny-internvl is InternVL3.5-style: Qwen3 with q/k norm
    assert manifest.model.prompt_template_name == "checkpoint" and manifest.model.processor["max_tiles"] == 6
    assert family.max_visual_tokens(manifest) == 7 * K and family.typical_visual_tokens(manifest) == 7 * K
    assert family.vision_dims(manifest, 2) == {"views": (1, 7, 14)}  # 640x480 -> a 3x2 grid + thumbnail
    assert family.max_visual_tokens(read_manifest(full["artifact"])) == 7 * N
    assert "64 per view x up to 7 views" in family.visual_summary(manifest)
    assert family.preprocessing_summary(manifest).startswith("1..6 448-px tiles per image")


def test_max_tiles_bounds_views_and_options_fail_clearly(export, adapter, images) -> None:
    artifact = export(tokens=str(K), family_options={"max-tiles": "2"})
    manifest = read_manifest(artifact)
    family = family_of(manifest)
    # a 640x480 photo stays one tile (4:3 is closer to 1:1 than to 2:1), the most is a 2-tile grid + thumbnail
    assert family.vision_dims(manifest, 2) == {"views": (1, 1, 6)} and family.max_visual_tokens(manifest) == 3 * K
    assert "--max-tiles" in family.preprocessing_summary(manifest)
    pipeline = Pipeline.load(artifact, backend="onnxruntime")
    result = _generate(pipeline, [images["tall"]], PROMPTS[:1], new_tokens=3)[0]
    assert np.array(result.keep_index).shape == (3, K)  # 180x260 -> a 1x2 grid + thumbnail
    with pytest.raises(UsageError, match=r"--max-tiles 9 is outside \[1, 6\]"):
        export(tokens=str(K), family_options={"max-tiles": "9"})
    with pytest.raises(UsageError, match="not a positive number"):
        export(tokens=str(K), family_options={"max-tiles": "0"})
    with pytest.raises(UsageError, match="--max-views is not available for the internvl family.*--max-tiles"):
        export(tokens=str(K), family_options={"max-views": "3"})
    with pytest.raises(UsageError, match="--apet-at 'middle' is not available"):
        export(tokens=str(K), family_options={"apet-at": "middle"})
    with pytest.raises(UsageError, match="--prompt-template 'nope' is unknown for internvl.*internvl_chat"):
        export(tokens=str(K), family_options={"prompt-template": "nope"})


def test_internvl35_8b_shapes_has_the_real_sizes() -> None:
    """The benchmark model without allocating it (meta device): InternViT-300M + Qwen3-8B, 256 tokens per view."""
    from apet.contracts.plan import plan_compression
    from apet.manifest import in_memory_manifest
    from apet.models.registry import load_adapter

    adapter = load_adapter("internvl3.5-8b-shapes", dtype=torch.float16, device="meta")
    spec = adapter.spec
    assert (spec.n_tokens, spec.vision_dim, spec.image_token_id) == (256, 4096, 151671)
    assert (spec.decoder.num_layers, spec.decoder.num_heads, spec.decoder.num_kv_heads, spec.decoder.head_dim) == \
        (36, 32, 8, 128)
    assert spec.decoder.qk_norm and spec.decoder.intermediate_size == 12288 and spec.decoder.vocab_size == 151936
    manifest = in_memory_manifest(spec, plan_compression(256, 36, ratio=0.25, stages=1), dtype="fp16", max_batch=1,
                                  max_context=4096)
    assert family_of(manifest).max_visual_tokens(manifest) == 13 * 64  # 12 tiles + thumbnail


@pytest.mark.trt
def test_tensorrt_rtx_builds_both_graphs_with_view_profiles(compressed, rtx_api, tmp_path: Path) -> None:
    from apet.engines.build import BuildConfig, build_artifact

    target = tmp_path / "built"
    shutil.copytree(compressed["after-projector"]["artifact"], target)
    build_artifact(BuildConfig(artifact=target, compute_capabilities=("sm86",), max_context=1024, max_batch=2),
                   api=rtx_api)
    report = json.loads((target / "build_report.json").read_text())
    vision = report["engines"]["vision"]["profiles"][0]["shapes"]["pixel_values"]
    assert vision == [[1, 3, 448, 448], [7, 3, 448, 448], [14, 3, 448, 448]]
    prefill, decode = report["engines"]["llm"]["profiles"]
    assert prefill["shapes"]["inputs_embeds"][2] == [2, 7 * K + 512, 64]  # the most visual tokens + 512 text
    assert decode["shapes"]["past_key.0"][2][2] == 1023
    assert (target / "vision.plan").stat().st_size > 10_000 and (target / "llm.plan").stat().st_size > 10_000


def test_cli_export_inspect_run(checkpoint: Path, tmp_path: Path, capsys) -> None:
    from apet.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--model", str(checkpoint), "--ratio", "0.11", "--max-tiles", "3", "--dtype", "fp32",
                 "--max-batch", "1", "--out", str(out)]) == 0
    assert "up to 128 per image" in capsys.readouterr().out  # 32 per view x (3 tiles + thumbnail)
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "32 per view x up to 4 views" in text and "1..3 448-px tiles" in text
    image = tmp_path / "wide.png"
    make_image(5, (300, 120)).save(image)
    assert main(["run", str(out), "--image", str(image), "--prompt", "What is it?", "--json",
                 "--max-new-tokens", "4"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert 1 <= len(record["token_ids"]) <= 4 and np.array(record["keep_index"]).shape == (3, 32)  # 2x1 + thumbnail
