"""Qwen2.5-VL's ``--pixel-range`` (issue 26 item 6): ``authors`` (default) = the authors' 256..2048 merged tokens,
``checkpoint`` = the checkpoint's own min/max pixels exactly as Hugging Face's image processor reads them, ``MIN:MAX``
= bounds in tokens; declared by the family (``Family.export_options``), checked before the model loads, recorded in
the manifest and honoured by the processor of every backend, ``apet-eval``, the engine profiles and ``apet inspect``.

References are Hugging Face's ``Qwen2VLImageProcessorPil`` (loaded from the tiny checkpoint's own files, or built
with explicit bounds) and exact grid counts worked out by hand from the bounds."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image
from qwen_reference import MAX_PIXELS, MIN_PIXELS

from apet.adapters.qwen2_5_vl.tiny import TINY_MAX_PIXELS, TINY_MIN_PIXELS
from apet.contracts.plan import plan_compression
from apet.errors import UsageError
from apet.manifest import in_memory_manifest, read_manifest
from apet.models.qwen2_5_vl.pixel_range import HF_DEFAULT_PIXELS, checkpoint_pixels, parse_pixel_range
from apet.models.qwen2_5_vl.preprocess import QwenImageRecipe, preprocess, processor_settings, recipe_from_settings
from apet.models.registry import get_family

# small (upscaled by both ranges), mid-size (inside the tiny checkpoint's range, below the authors'), large (downscaled)
SIZES = [(120, 90), (300, 200), (400, 300), (1600, 1200)]
CHECKPOINT = {"pixel-range": "checkpoint"}


def _hf_grid(processor, image) -> tuple[list[int], np.ndarray]:
    out = processor(images=[image], return_tensors="np")
    return out["image_grid_thw"][0].tolist(), out["pixel_values"]


def _recipe(checkpoint: Path, pixel_range: str) -> QwenImageRecipe:
    return recipe_from_settings(processor_settings(checkpoint), 112, parse_pixel_range(pixel_range))


def test_tiny_checkpoint_declares_its_own_range(tiny_qwen_checkpoint: Path) -> None:
    settings = json.loads((tiny_qwen_checkpoint / "processor_config.json").read_text())["image_processor"]
    assert (settings["min_pixels"], settings["max_pixels"]) == (TINY_MIN_PIXELS, TINY_MAX_PIXELS)
    assert (TINY_MIN_PIXELS, TINY_MAX_PIXELS) != (MIN_PIXELS, MAX_PIXELS)


@pytest.mark.parametrize("size", SIZES)
def test_checkpoint_range_equals_hf_image_processor_of_the_checkpoint(tiny_qwen_checkpoint: Path, size) -> None:
    from transformers import AutoImageProcessor, Qwen2VLImageProcessorPil

    image = make_image(5, size)
    hf = AutoImageProcessor.from_pretrained(tiny_qwen_checkpoint)
    assert isinstance(hf, Qwen2VLImageProcessorPil)
    want_grid, want_pixels = _hf_grid(hf, image)
    patches, grid = preprocess(image, _recipe(tiny_qwen_checkpoint, "checkpoint"))
    assert [1, *grid] == want_grid
    np.testing.assert_allclose(patches, want_pixels, rtol=0, atol=2e-6)
    # the default differs observably from the checkpoint's range for these sizes, and equals the authors'
    authors_grid, _ = _hf_grid(Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS), image)
    _, default_grid = preprocess(image, _recipe(tiny_qwen_checkpoint, "authors"))
    assert [1, *default_grid] == authors_grid != want_grid
    assert recipe_from_settings(processor_settings(tiny_qwen_checkpoint), 112) == QwenImageRecipe()


@pytest.mark.parametrize("size", SIZES)
def test_min_max_range_gives_the_grid_of_those_bounds(tiny_qwen_checkpoint: Path, size) -> None:
    from transformers import Qwen2VLImageProcessorPil

    image = make_image(6, size)
    recipe = _recipe(tiny_qwen_checkpoint, " 64 : 300")
    assert (recipe.pixel_range, recipe.min_pixels, recipe.max_pixels) == ("64:300", 64 * 784, 300 * 784)
    want_grid, _ = _hf_grid(Qwen2VLImageProcessorPil(min_pixels=64 * 784, max_pixels=300 * 784), image)
    _, grid = preprocess(image, recipe)
    assert [1, *grid] == want_grid and 64 <= grid[0] * grid[1] // 4 <= 300


@pytest.mark.parametrize("settings", [
    {"min_pixels": 5000, "max_pixels": 600000},  # the older keys only
    {"size": {"shortest_edge": 7000, "longest_edge": 500000}},  # transformers 5's size only
    {"min_pixels": 9000, "max_pixels": 400000, "size": {"shortest_edge": 1, "longest_edge": 2}},  # keys win
    {"min_pixels": 9000, "size": {"shortest_edge": 1, "longest_edge": 700000}},  # one of each
    {},  # neither: the class's own size
])
def test_checkpoint_pixels_are_read_as_hf_reads_them(settings: dict) -> None:
    from transformers import Qwen2VLImageProcessorPil

    hf = Qwen2VLImageProcessorPil(**copy.deepcopy(settings))
    assert checkpoint_pixels(settings) == (hf.size.shortest_edge, hf.size.longest_edge)
    assert checkpoint_pixels({}) == HF_DEFAULT_PIXELS


@pytest.mark.parametrize(("value", "want"), [("authors", "authors"), ("CHECKPOINT", "checkpoint"),
                                             ("1:1", "1:1"), ("256:2048", "256:2048"), ("4:16384", "4:16384")])
def test_pixel_range_values_are_normalised(value: str, want: str) -> None:
    assert parse_pixel_range(value) == want


@pytest.mark.parametrize("value", ["0:10", "10:5", "1:16385", "abc", "3.5:9", "64", "1:2:3", "-1:4", ""])
def test_bad_pixel_range_values_name_the_flag_and_the_fix(value: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_pixel_range(value)
    assert "--pixel-range" in str(info.value) and "MIN:MAX" in info.value.fix


def _copy_with_range(adapter, pixel_range: str):
    """The session adapter under another pixel range (a shallow copy: the shared one keeps its spec)."""
    other = copy.copy(adapter)
    other.set_pixel_range(parse_pixel_range(pixel_range))
    return other


def _manifest(adapter, ratio: float = 0.3):
    plan = plan_compression(adapter.spec.n_tokens, adapter.spec.decoder.num_layers, ratio=ratio, stages=1,
                            stage1_placement="blend", per_image=True)
    return in_memory_manifest(adapter.spec, plan, dtype="fp32", max_batch=2, max_context=4096)


def test_engine_profile_dims_follow_the_range(tiny_qwen_adapter) -> None:
    """Patches = 4 x merged tokens, even sides: the fewest are 4·ceil(min/784), the most 4·floor(max/784)."""
    family = get_family("qwen2_5_vl")
    expected = {"authors": (1024, 8192), "checkpoint": (4 * math.ceil(TINY_MIN_PIXELS / 784),
                                                         4 * (TINY_MAX_PIXELS // 784)), "64:300": (256, 1200)}
    assert expected["checkpoint"] == (512, 4080)
    for name, (low, high) in expected.items():
        adapter = _copy_with_range(tiny_qwen_adapter, name)
        assert adapter.spec.n_tokens == high // 4
        dims = family.vision_dims(_manifest(adapter), max_batch=2)
        assert (dims["patches"][0], dims["patches"][2]) == (low, high), name
        assert dims["batch"] == (1, 1, 2)
    assert tiny_qwen_adapter.spec.n_tokens == 2048 and tiny_qwen_adapter.spec.processor["pixel_range"] == "authors"


def test_a_manifest_before_the_option_reads_as_the_authors_range(tiny_qwen_adapter) -> None:
    processor = dict(tiny_qwen_adapter.spec.processor)
    del processor["pixel_range"]
    recipe = QwenImageRecipe.from_json(processor)
    assert recipe.pixel_range == "authors" and (recipe.min_pixels, recipe.max_pixels) == (MIN_PIXELS, MAX_PIXELS)


def test_bad_values_and_other_families_fail_before_the_model_loads(monkeypatch, tiny_qwen_checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    import apet.models.registry as registry
    from apet.export.artifact import ExportConfig, export_artifact

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(registry, "load_adapter", no_loading)
    for model, options, words in [(str(tiny_qwen_checkpoint), {"pixel-range": "512:64"}, "--pixel-range '512:64'"),
                                  ("tiny-qwen2.5-vl", {"pixel-range": "all"}, "--pixel-range 'all'"),
                                  ("tiny", CHECKPOINT, "--pixel-range is not available for the llava family"),
                                  ("tiny-qwen2.5-vl", {"frobnicate": "1"}, "--frobnicate is not available")]:
        with pytest.raises(UsageError) as info:
            export_artifact(ExportConfig(model=model, out=tmp_path / "x", ratio=0.3, family_options=options))
        assert words in str(info.value)
        assert not (tmp_path / "x").exists()


def test_cli_declares_the_family_option_and_refuses_bad_values(tmp_path: Path, capsys) -> None:
    from apet.cli import _parser, export_main

    help_text = _parser("export").format_help()
    assert "--pixel-range authors|checkpoint|MIN:MAX" in help_text and "qwen2_5_vl: default authors" in help_text
    args = _parser("export").parse_args(["--model", "m", "--ratio", "0.3", "--out", "o"])
    assert not hasattr(args, "pixel_range")  # absent: the family's default applies
    code = export_main(["--model", "tiny-qwen2.5-vl", "--ratio", "0.3", "--out", str(tmp_path / "x"),
                        "--pixel-range", "0:9"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --pixel-range '0:9'") and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def checkpoint_artifact(qwen_artifact_factory) -> Path:
    return qwen_artifact_factory(ratio=0.3, family_options=CHECKPOINT)


def test_manifest_and_inspect_record_the_range(checkpoint_artifact: Path, qwen_artifact_factory) -> None:
    from apet.inspect_artifact import describe

    manifest = read_manifest(checkpoint_artifact)
    processor = manifest.model.processor
    assert (processor["pixel_range"], processor["min_pixels"], processor["max_pixels"]) == \
        ("checkpoint", TINY_MIN_PIXELS, TINY_MAX_PIXELS)
    assert manifest.model.n_tokens == 1020 and manifest.compression.stage1.max_tokens == 1020
    assert "  images     pixel range checkpoint: 128..1020 merged tokens per image (100000..800000 px)" in \
        describe(checkpoint_artifact).splitlines()
    default = qwen_artifact_factory(ratio=0.3)
    assert read_manifest(default).model.processor["pixel_range"] == "authors"
    assert "  images     pixel range authors: 256..2048 merged tokens per image (200704..1605632 px)" in \
        describe(default).splitlines()


def test_engine_profiles_of_the_artifact_follow_the_range(checkpoint_artifact: Path) -> None:
    from apet.engines.profiles import ShapeLimits, vision_profiles

    manifest = read_manifest(checkpoint_artifact)
    profile = vision_profiles(manifest, ShapeLimits.from_manifest(manifest))[0]
    low, _, high = profile.shapes["pixel_values"]
    assert (low[1], high[1]) == (512, 4080) and high[0] == manifest.max_batch


def test_every_backend_and_eval_preprocess_with_the_recorded_range(checkpoint_artifact: Path, tiny_qwen_adapter,
                                                                   tiny_qwen_checkpoint: Path, tmp_path: Path) -> None:
    """A 1600x1200 photo: HF's grid under the checkpoint's range (972 merged tokens; 2028 under the authors')."""
    from transformers import AutoImageProcessor

    from apet.eval.runner import EvalConfig, run_eval
    from apet.runtime.pipeline import Pipeline

    image = make_image(9, (1600, 1200))
    grid, _ = _hf_grid(AutoImageProcessor.from_pretrained(tiny_qwen_checkpoint), image)
    tokens = grid[1] * grid[2] // 4
    assert grid == [1, 54, 72] and tokens == 972
    for backend in ("onnxruntime", "torch"):  # torch: the session adapter, exported with the authors' range
        pipeline = Pipeline.load(checkpoint_artifact, backend=backend,
                                 **({"adapter": tiny_qwen_adapter} if backend == "torch" else {}))
        assert [info.grid for info in pipeline.processor.vision_inputs([image]).meta] == [tuple(grid[1:])]
        result = pipeline.generate(image, "What is it?", max_new_tokens=2)
        assert result.stats.visual_tokens == [int(0.3 * tokens)], backend
    images = tmp_path / "images"
    images.mkdir()
    image.save(images / "0.png")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"id": "q0", "image": "0.png", "question": "What?", "answer": "x"}) + "\n")
    report = run_eval(EvalConfig(source=str(checkpoint_artifact), data=(data,), images=images, out=tmp_path / "o",
                                 ratios=(0.3,), backend="onnxruntime", max_new_tokens=1))
    assert report["conditions"]["apet@0.3"]["preprocessing"].startswith("pixel range checkpoint: 128..1020")
