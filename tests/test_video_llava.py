"""Video-LLaVA end to end on the tiny checkpoint: HF generate parity at ratio 1.0, the authors' per-frame ApET
(kept indices, token order, values) when compressed, spatial-order ablation, Video-LLaVA's own preprocessing."""

from __future__ import annotations

from pathlib import Path

import authors_reference as authors
import numpy as np
import numpy_reference as ref
import onnxruntime as ort
import pytest
import torch
from videos import decode_all, make_frames, uniform, write_video

from apet.compression import selector
from apet.contracts.compression import CompressionConfig
from apet.export.artifact import ExportConfig, export_artifact
from apet.manifest import read_manifest
from apet.models.registry import family_of
from apet.runtime.pipeline import Pipeline
from apet.runtime.sampling import GenerationConfig

PROMPTS = ["What happens in the video?", "Describe the clip in detail please."]
NEW_TOKENS = 10
FRAMES = 8


@pytest.fixture(scope="module")
def checkpoint(tiny_video_checkpoint: Path) -> Path:
    return tiny_video_checkpoint


@pytest.fixture(scope="module")
def adapter(checkpoint: Path):
    from apet.adapters.video_llava.adapter import VideoLlavaAdapter

    return VideoLlavaAdapter.load(checkpoint)


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("clips")
    return [write_video(root / "a.mp4", make_frames(3, 21, (160, 120))),
            write_video(root / "b.mp4", make_frames(4, 13, (100, 140)))]


@pytest.fixture(scope="module")
def artifacts(video_artifact_factory) -> dict[float, Path]:
    return {ratio: video_artifact_factory(ratio=ratio) for ratio in (1.0, 0.125)}


@pytest.fixture(scope="module")
def pipelines(artifacts, adapter) -> dict:
    return {(ratio, backend): Pipeline.load(path, backend=backend, adapter=adapter) if backend == "torch" else
            Pipeline.load(path, backend=backend) for ratio, path in artifacts.items()
            for backend in ("onnxruntime", "torch")}


# -- independent references ------------------------------------------------------------------------
def hf_pixels(checkpoint: Path, clip: Path) -> torch.Tensor:
    """[T, 3, H, W]: the test's own decode + the authors' sampling + HF's VideoLlavaImageProcessor per frame."""
    from transformers import VideoLlavaImageProcessor

    from apet.models.shared.clip import video_processor_settings

    settings = {k: v for k, v in video_processor_settings(checkpoint).items() if not k.endswith("_type")}
    settings.pop("do_sample_frames", None)
    processor = VideoLlavaImageProcessor(**settings)
    frames = decode_all(clip)
    picked = list(frames[uniform(len(frames), FRAMES)])
    return processor(images=picked, return_tensors="pt", return_legacy_image_output=False)["pixel_values"]


_HF_RUNS: dict[tuple, list[list[int]]] = {}


def hf_greedy(adapter, checkpoint: Path, clips: list[Path], prompts: list[str], per_frame: int,
              compress_frames=None) -> list[list[int]]:
    """Cached per arguments: the ONNX Runtime and torch tests compare with one HF run."""
    key = (str(checkpoint), tuple(map(str, clips)), tuple(prompts), per_frame, compress_frames)
    if key not in _HF_RUNS:
        _HF_RUNS[key] = _hf_greedy(adapter, checkpoint, clips, prompts, per_frame, compress_frames)
    return _HF_RUNS[key]


def _hf_greedy(adapter, checkpoint: Path, clips: list[Path], prompts: list[str], per_frame: int,
               compress_frames=None) -> list[list[int]]:
    """HF ``generate`` on the same frames. ``compress_frames`` ([T, 257, H] projected -> [T, per_frame, H]) replaces
    the model's video features: the HF-modules reference of the compressed model."""
    from tokenizers import Tokenizer
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    model, video_id = adapter.model, model_video_id(adapter)
    rows = []
    for prompt in prompts:
        ids = tokenizer.encode(adapter.format_prompt(prompt)).ids
        at = ids.index(video_id)
        rows.append(ids[:at] + [video_id] * (FRAMES * per_frame) + ids[at + 1:])
    pad = adapter.spec.pad_token_id
    longest = max(map(len, rows))
    input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    pixels = torch.stack([hf_pixels(checkpoint, clip) for clip in clips])
    original = model.model.get_video_features
    if compress_frames is not None:
        def features(pixel_values_videos, **kwargs):
            full = original(pixel_values_videos=pixel_values_videos, **kwargs).pooler_output
            return BaseModelOutputWithPooling(pooler_output=torch.cat(
                [compress_frames(f) for f in full.unflatten(0, (len(clips), FRAMES))]))
        model.model.get_video_features = features
    try:
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, pixel_values_videos=pixels,
                                 do_sample=False, max_new_tokens=NEW_TOKENS, pad_token_id=pad)
    finally:
        if compress_frames is not None:
            del model.model.get_video_features
    eos = adapter.spec.eos_token_ids[0]
    return [row[: row.index(eos)] if eos in row else row for row in out[:, longest:].tolist()]


def model_video_id(adapter) -> int:
    return int(adapter.model.config.video_token_index)


def authors_frames(frames: torch.Tensor) -> torch.Tensor:
    """[T, 257, H] -> [T, 33, H]: CLS kept aside, the authors' encode_videos on the patches (float64)."""
    tokens, _ = authors.video_frame(frames[:, 1:], selected=22, k=10)
    return torch.cat([frames[:, :1].double(), tokens], 1).to(frames.dtype)


def _generate(pipeline: Pipeline, clips, prompts) -> list[list[int]]:
    results = pipeline.generate_batch([str(c) for c in clips], prompts, GenerationConfig(max_new_tokens=NEW_TOKENS))
    return [r.token_ids for r in results]


# -- tests -----------------------------------------------------------------------------------------
def test_manifest_and_graph_shapes(artifacts) -> None:
    manifest = read_manifest(artifacts[0.125])
    assert manifest.model.family == "video-llava" and manifest.model.image_placeholder == "<video>"
    assert manifest.compression.stage1.keep == 32 and manifest.compression.stage1.placement == "append"
    assert manifest.compression.stage2 is None and manifest.model.extra["frames"] == FRAMES
    assert family_of(manifest).max_visual_tokens(manifest) == 264
    assert family_of(manifest).visual_summary(manifest) == "264 per video: 8 frames x 33 (CLS + 32 kept)"
    vision = manifest.graphs["vision"]
    assert [i["shape"] for i in vision.inputs] == [["batch", 8, 3, 224, 224]]
    assert [o["shape"] for o in vision.outputs] == [["batch", 264, 64], ["batch", 264]]
    full = read_manifest(artifacts[1.0])
    assert family_of(full).max_visual_tokens(full) == 8 * 257 and full.max_context >= 8 * 257 + 512


def test_frame_preprocessing_equals_hf_image_processor(checkpoint, clips, pipelines) -> None:
    processor = pipelines[(0.125, "onnxruntime")].processor
    got = processor.vision_inputs([str(clips[0])]).arrays["pixel_values_videos"][0]
    np.testing.assert_allclose(got, hf_pixels(checkpoint, clips[0]).numpy(), atol=1e-5)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("batch", [1, 2])
def test_ratio_one_equals_hf_generate(pipelines, adapter, checkpoint, clips, backend: str, batch: int) -> None:
    """Every frame token (CLS + 256 patches, 8 frames = 2056) through apet == HF generate, token for token."""
    want = hf_greedy(adapter, checkpoint, clips[:batch], PROMPTS[:batch], per_frame=257)
    got = _generate(pipelines[(1.0, backend)], clips[:batch], PROMPTS[:batch])
    assert got == want and all(len(t) > 0 for t in got)


def test_kept_indices_order_and_values_equal_the_oracles(artifacts, adapter, checkpoint, clips) -> None:
    """vision.onnx per frame: [CLS, 22 error-selected in descending error, 10 basis in FPS order] == the float64
    oracle (placement append) and the authors' encode_videos, on HF's own projected frame features."""
    pixels = hf_pixels(checkpoint, clips[1])
    with torch.no_grad():
        frames = adapter.model.model.get_video_features(pixel_values_videos=pixels[None]).pooler_output
    session = ort.InferenceSession(str(artifacts[0.125] / "vision.onnx"), providers=["CPUExecutionProvider"])
    embeds, index = session.run(None, {"pixel_values_videos": pixels[None].numpy()})
    embeds, index = embeds.reshape(FRAMES, 33, -1), index.reshape(FRAMES, 33)
    oracle_tokens, oracle_index = ref.compress(frames[:, 1:].double().numpy(), 32, 10, placement="append")
    _, authors_index = authors.video_frame(frames[:, 1:], selected=22, k=10)
    assert (index[:, 0] == 0).all()
    assert (index[:, 1:] - 1).tolist() == oracle_index.tolist() == authors_index.tolist()
    np.testing.assert_allclose(embeds[:, 0], frames[:, 0].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embeds[:, 1:], oracle_tokens, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(embeds, authors_frames(frames).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
@pytest.mark.parametrize("batch", [1, 2])
def test_compressed_equals_hf_modules_reference(pipelines, adapter, checkpoint, clips, backend: str,
                                                batch: int) -> None:
    """8 x 33 = 264 visual tokens: apet's tokens == HF generate with the authors' encode_videos in its place."""
    want = hf_greedy(adapter, checkpoint, clips[:batch], PROMPTS[:batch], per_frame=33, compress_frames=authors_frames)
    results = pipelines[(0.125, backend)].generate_batch([str(c) for c in clips[:batch]], PROMPTS[:batch],
                                                          GenerationConfig(max_new_tokens=NEW_TOKENS))
    assert [r.token_ids for r in results] == want
    assert results[0].stats.visual_tokens == [264] * batch and len(results[0].keep_index) == 264


def test_compression_changes_the_answer_and_keeps_fewer_tokens(pipelines, clips) -> None:
    full = pipelines[(1.0, "onnxruntime")].generate(video=str(clips[0]), prompt=PROMPTS[0], max_new_tokens=NEW_TOKENS)
    low = pipelines[(0.125, "onnxruntime")].generate(video=str(clips[0]), prompt=PROMPTS[0],
                                                     max_new_tokens=NEW_TOKENS)
    assert full.stats.prompt_tokens[0] - low.stats.prompt_tokens[0] == 8 * (257 - 33)
    assert full.stats.ttft_ms > 0 and low.stats.visual_tokens == [264]


def test_spatial_order_ablation_sorts_each_frame(adapter) -> None:
    from apet.adapters.video_llava.vision import VideoLlavaVisionStages

    pixels = torch.randn(1, FRAMES, 3, 224, 224)
    paper = VideoLlavaVisionStages(adapter, selector(CompressionConfig(keep=32, placement="append")))
    spatial = VideoLlavaVisionStages(adapter, selector(CompressionConfig(keep=32, placement="append_spatial")))
    with torch.no_grad():
        (paper_embeds, paper_index), (spatial_embeds, spatial_index) = paper(pixels), spatial(pixels)
    paper_index, spatial_index = paper_index.view(FRAMES, 33), spatial_index.view(FRAMES, 33)
    for f in range(FRAMES):
        order = torch.argsort(paper_index[f])
        assert spatial_index[f].tolist() == paper_index[f, order].tolist() == sorted(paper_index[f].tolist())
        torch.testing.assert_close(spatial_embeds.view(FRAMES, 33, -1)[f], paper_embeds.view(FRAMES, 33, -1)[f, order])


def test_video_and_image_arguments_are_checked(pipelines, clips) -> None:
    from apet.errors import UsageError

    pipeline = pipelines[(0.125, "onnxruntime")]
    with pytest.raises(UsageError, match="takes a video, not an image"):
        pipeline.generate(str(clips[0]), PROMPTS[0])
    with pytest.raises(UsageError, match="exactly one"):
        pipeline.generate(prompt=PROMPTS[0])


# -- the tools around the pipeline -------------------------------------------------------------------
@pytest.mark.trt
def test_tensorrt_rtx_builds_the_video_graph_ahead_of_time(checkpoint, artifacts, rtx_api, tmp_path: Path) -> None:
    """The fp16 vision graph (8 frames per video, per-frame ApET) builds with the family's profile; the LLM's
    profiles and the trtexec lines follow the 8 x 33 visual tokens."""
    from apet.adapters.video_llava.adapter import VideoLlavaAdapter
    from apet.engines.profiles import ShapeLimits, llm_profiles, vision_profiles
    from apet.engines.trt import BuildOptions, build_engine
    from apet.engines.trtexec import write_trtexec_script
    from apet.export.vision import export_vision

    manifest = read_manifest(artifacts[0.125])
    half = VideoLlavaAdapter.load(checkpoint, dtype=torch.float16)
    export_vision(half, manifest.compression.stage1, tmp_path / "vision.onnx", opset=manifest.opset)
    profiles = vision_profiles(manifest, ShapeLimits.from_manifest(manifest))
    assert profiles[0].shapes == {"pixel_values_videos": ((1, 8, 3, 224, 224), (1, 8, 3, 224, 224),
                                                          (2, 8, 3, 224, 224))}
    built = build_engine(rtx_api, tmp_path / "vision.onnx", profiles, BuildOptions(compute_capabilities=("sm86",)))
    assert len(built.plan) > 10_000 and built.num_layers > 100
    assert built.inputs == [{"name": "pixel_values_videos", "shape": [-1, 8, 3, 224, 224], "dtype": "half"}]
    assert [(o["name"], o["shape"]) for o in built.outputs] == [("visual_embeds", [-1, 264, 64]),
                                                                ("keep_index", [-1, 264])]
    prefill, decode = llm_profiles(manifest, max_context=512)
    assert prefill.shapes["inputs_embeds"] == ((1, 2, 64), (1, 264 + 40, 64), (2, 512, 64))
    script = write_trtexec_script(artifacts[0.125], ShapeLimits.from_manifest(manifest)).read_text()
    assert "--shapes=pixel_values_videos:1x8x3x224x224" in script and "inputs_embeds:1x304x64" in script


def test_bench_ratio_one_against_the_paper_budget(checkpoint, tmp_path: Path) -> None:
    """apet-bench's runs and baselines on video (2 frames here to keep CI short): 2 x 257 tokens at ratio 1.0
    vs 2 x 33 at 0.125, with HF generate and the paper-style path in the same run."""
    from apet.adapters.video_llava.adapter import VideoLlavaAdapter
    from apet.bench.run import BenchConfig, run_bench

    adapter = VideoLlavaAdapter.load(checkpoint)
    adapter.customize(frames=2)
    results = run_bench(BenchConfig(model="tiny-video-llava", out=tmp_path / "bench", ratios=(1.0, 0.125),
                                    repeats=1, new_tokens=2, prompt_tokens=20), adapter=adapter)
    full, low = results["runs"]
    assert low["budgets"]["k1"] == 32 and low["budgets"]["k2"] is None and full["budgets"]["k1"] == 256
    assert results["baselines"]["hf_generate"]["1"]["visual_tokens"] == 2 * 257
    per_token = 4 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head dim x fp32
    assert (full["kv_cache_bytes"], low["kv_cache_bytes"]) == (per_token * (20 + 2 * 257 + 2),
                                                               per_token * (20 + 2 * 33 + 2))
    assert low["stages"]["apet_stage1"]["median_ms"] > 0 and "vs_hf_generate_ttft" in low["speedup"]
    assert "| 1 | 0.125 |" in (tmp_path / "bench" / "results.md").read_text()


def test_eval_rows_with_video(artifacts, clips, tmp_path: Path) -> None:
    """apet-eval reads "video" rows; a corrupt clip is recorded as an error and the run goes on."""
    import json

    from apet.eval.runner import EvalConfig, run_eval

    (tmp_path / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x01" * 300)
    data = tmp_path / "clips.jsonl"
    rows = [{"id": "a", "video": str(clips[0]), "question": "What moves?", "answer": "square"},
            {"id": "b", "video": "broken.mp4", "question": "What moves?", "answer": "square"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run_eval(EvalConfig(source=str(artifacts[0.125]), data=(data,), images=tmp_path, out=tmp_path / "eval",
                        ratios=(0.125,), backend="onnxruntime", max_new_tokens=4))
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == ["a", "b"]
    assert "error" not in records[0] and "cannot be decoded" in records[1]["error"]


def test_cli_run_with_video_and_bad_inputs(artifacts, pipelines, clips, tmp_path: Path, capsys) -> None:
    import json

    from apet.cli import main

    code = main(["run", str(artifacts[0.125]), "--video", str(clips[0]), "--prompt", PROMPTS[0], "--json",
                 "--max-new-tokens", str(NEW_TOKENS)])
    record = json.loads(capsys.readouterr().out)
    assert code == 0 and record["stats"]["visual_tokens"] == [264]
    assert record["token_ids"] == _generate(pipelines[(0.125, "onnxruntime")], clips[:1], PROMPTS[:1])[0]
    short = write_video(tmp_path / "short.mp4", make_frames(5, 6))
    (tmp_path / "corrupt.mp4").write_bytes(b"RIFF0000AVI " + b"\x00" * 64)
    for path, words in ((short, "6 frame(s), fewer than the 8"), (tmp_path / "corrupt.mp4", "cannot be decoded")):
        assert main(["run", str(artifacts[0.125]), "--video", str(path), "--prompt", "Hi"]) == 3
        assert words in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.mp4", "short.mp4"]  # nothing written
    assert main(["run", str(artifacts[0.125]), "--image", "@demo", "--prompt", "Hi"]) == 2
    assert "takes a video" in capsys.readouterr().err
    assert main(["run", str(artifacts[0.125]), "--video", "@demo", "--prompt", "Hi", "--max-new-tokens", "2"]) == 0


# -- images through the image tower (apet-export --media image) ----------------------------------------
@pytest.fixture(scope="module")
def image_artifact(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("video-llava-image") / "image"
    export_artifact(ExportConfig(model=str(checkpoint), out=out, ratio=1.0, dtype="fp32", max_batch=2,
                                 family_options={"media": "image"}))
    return out


def hf_image_greedy(adapter, checkpoint: Path, images: list, prompts: list[str]) -> list[list[int]]:
    """HF generate on images: the authors' padding to a square, HF's image processor (``pixel_values``, not the
    legacy ``pixel_values_images``), 256 ``<image>`` tokens, the image tower without CLS."""
    from test_runtime import expand2square
    from tokenizers import Tokenizer
    from transformers import VideoLlavaImageProcessor

    from apet.models.shared.clip import processor_settings

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    image_id = int(adapter.model.config.image_token_index)
    settings = {k: v for k, v in processor_settings(checkpoint, "image_processor").items() if not k.endswith("_type")}
    processor = VideoLlavaImageProcessor(**settings)
    rows = []
    for prompt in prompts:
        ids = tokenizer.encode(adapter.format_prompt(prompt).replace("<video>", "<image>")).ids
        at = ids.index(image_id)
        rows.append(ids[:at] + [image_id] * 256 + ids[at + 1:])
    pad, longest = adapter.spec.pad_token_id, max(map(len, rows))
    pixels = processor(images=[expand2square(i, processor.image_mean) for i in images], return_tensors="pt",
                       return_legacy_image_output=False)["pixel_values"]
    input_ids = torch.tensor([[pad] * (longest - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        out = adapter.model.generate(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, do_sample=False,
                                     max_new_tokens=NEW_TOKENS, pad_token_id=pad)
    eos = adapter.spec.eos_token_ids[0]
    return [row[: row.index(eos)] if eos in row else row for row in out[:, longest:].tolist()]


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_images_through_the_image_tower_equal_hf_generate(image_artifact, adapter, checkpoint, backend: str) -> None:
    from conftest import make_image

    from apet.errors import UsageError

    images = [make_image(11, (300, 200)), make_image(12, (150, 240))]
    manifest = read_manifest(image_artifact)
    assert manifest.model.image_placeholder == "<image>" and manifest.graphs["vision"].inputs[0]["name"] == \
        "pixel_values" and family_of(manifest).max_visual_tokens(manifest) == 256
    pipeline = Pipeline.load(image_artifact, backend=backend, **({"adapter": adapter} if backend == "torch" else {}))
    results = pipeline.generate_batch(images, PROMPTS, GenerationConfig(max_new_tokens=NEW_TOKENS))
    want = hf_image_greedy(adapter, checkpoint, images, PROMPTS)
    assert [r.token_ids for r in results] == want and all(want)
    with pytest.raises(UsageError, match="takes an image, not a video"):
        pipeline.generate(video="@demo", prompt=PROMPTS[0])


def test_media_and_frames_options_are_checked(checkpoint, tiny_adapter) -> None:
    from apet.adapters.video_llava.adapter import VideoLlavaAdapter
    from apet.errors import UsageError

    video = VideoLlavaAdapter.load(checkpoint)
    with pytest.raises(UsageError, match="--frames applies to video"):
        video.customize(media="image", frames=4)
    with pytest.raises(UsageError, match="outside the allowed range"):
        VideoLlavaAdapter.load(checkpoint).customize(frames=0)
    with pytest.raises(UsageError, match="--media is not available for llava"):
        tiny_adapter.customize(media="video")
    with pytest.raises(UsageError, match="--frames is not available for llava"):
        tiny_adapter.customize(frames=8)


def test_ratio_and_tokens_map_to_the_per_frame_budget() -> None:
    """--ratio r keeps round8(r x 256) patch tokens per frame (0.125 -> 22 error-selected + 10 basis); --tokens
    sets K exactly; video has one stage whatever --stages says."""
    from apet.contracts.plan import plan_compression

    def keep(**kwargs) -> int:
        plan = plan_compression(256, 32, stages=1, stage1_placement="append", **kwargs)
        assert plan.stage2 is None and plan.stage1.placement == "append"
        return plan.stage1.keep

    assert [keep(ratio=r) for r in (0.125, 0.25, 0.5, 1.0)] == [32, 64, 128, 256]
    assert keep(tokens="27") == 27
    assert plan_compression(256, 32, ratio=0.125, stages=1, stage1_placement="append",
                            basis_placement="spatial").stage1.placement == "append_spatial"


def test_apet_serve_answers_a_video_part_like_apet_run(artifacts, pipelines, clips) -> None:
    """apet-serve over real HTTP with a video_url data URL (an MP4): the same tokens and kept indices as the
    pipeline on the file, streamed and not."""
    pytest.importorskip("starlette", reason='apet-serve needs pip install "apet[serve]"')
    import base64

    import httpx

    from apet.serve.app import create_app
    from apet.serve.config import ServeConfig
    from apet.serve.server import BackgroundServer

    artifact = artifacts[0.125]
    expected = pipelines[(0.125, "onnxruntime")].generate_batch([str(clips[0])], PROMPTS[:1],
                                                                 GenerationConfig(max_new_tokens=6))[0]
    url = "data:video/mp4;base64," + base64.b64encode(clips[0].read_bytes()).decode()
    body = {"model": "tiny", "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
        {"type": "text", "text": PROMPTS[0]}, {"type": "video_url", "video_url": {"url": url}}]}]}
    config = ServeConfig(artifact=artifact, backend="onnxruntime", threads=1, model_name="tiny")
    with BackgroundServer(create_app(Pipeline.load(artifact, backend="onnxruntime", threads=1), config)) as server:
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        data = answer.json()
        assert data["apet"]["token_ids"] == expected.token_ids and data["apet"]["keep_index"] == expected.keep_index
        assert data["choices"][0]["message"]["content"] == expected.text
        assert data["usage"]["visual_tokens"] == FRAMES * 33
        image_part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
        wrong = {**body, "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}, image_part]}]}
        refused = httpx.post(f"{server.url}/v1/chat/completions", json=wrong, timeout=60)
        assert refused.status_code == 400 and "video" in refused.text
