"""The static-KV form of the LLM (``apet-export --kv-cache static``, docs/architecture.md): its greedy tokens and
logits equal the concatenating form's and the torch reference's (HF modules) on the tiny LLaVA with stage 2,
Qwen2.5-VL (M-RoPE) and Qwen3-VL (injected inputs); the caches are written in place; the decode graph has no
stage 2 and no shape computation left once its batch is fixed; TensorRT-RTX builds both graphs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image

from apet.contracts.io import LLM_DECODE, LLM_PREFILL
from apet.errors import ArtifactError, InputError, UsageError
from apet.manifest import read_manifest
from apet.runtime.pipeline import Pipeline

STEPS = 8


def _greedy(pipeline: Pipeline, images: list, prompts: list[str], steps: int = STEPS) -> dict:
    """Prefill and ``steps`` greedy decode steps through the backend alone: tokens, logits per step, indices."""
    backend, processor = pipeline.backend, pipeline.processor
    inputs = processor.vision_inputs(images)
    visual = backend.encode(inputs)
    layout = processor.layout(prompts, inputs, visual.keep_index, steps)
    logits, mask = [backend.prefill(layout, visual)], layout.attention_mask
    tokens = []
    for _ in range(steps):
        token = logits[-1].argmax(-1)
        tokens.append(token.tolist())
        mask = np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        logits.append(backend.decode(token.astype(np.int64), mask, processor.decode_positions(layout, mask)))
    return {"tokens": tokens, "logits": np.stack(logits), "keep": visual.keep_index,
            "stage2": getattr(backend, "stage2_index", None), "lengths": backend.cache_lengths()}


def _assert_same(static: dict, other: dict, atol: float) -> None:
    assert static["tokens"] == other["tokens"]
    np.testing.assert_array_equal(np.asarray(static["keep"]), np.asarray(other["keep"]))
    np.testing.assert_allclose(static["logits"], other["logits"], atol=atol, rtol=0)
    assert static["lengths"] == other["lengths"]


@pytest.fixture(scope="module")
def images() -> list:
    return [make_image(1, (300, 200)), make_image(2, (180, 260))]


@pytest.fixture(scope="module")
def llava_static(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2, kv_cache="static")


def test_llava_static_equals_concatenating_form_and_torch(llava_static, artifact_factory, tiny_adapter,
                                                          images) -> None:
    """Batch 2 with left padding and ApET's second stage: same tokens, stage-2 indices and logits at every step."""
    prompts = ["What is in the picture?", "How many objects are there and what color are they?"]
    static = _greedy(Pipeline.load(llava_static, backend="onnxruntime"), images, prompts)
    dynamic = _greedy(Pipeline.load(artifact_factory(ratio=0.11, stages=2), backend="onnxruntime"), images, prompts)
    reference = _greedy(Pipeline.load(llava_static, backend="torch", adapter=tiny_adapter), images, prompts)
    _assert_same(static, dynamic, atol=1e-4)
    _assert_same(static, reference, atol=1e-4)
    np.testing.assert_array_equal(static["stage2"], dynamic["stage2"])
    assert static["lengths"][0] - static["lengths"][-1] == 40 - 16  # stage 2 shortened the layers from 2 on
    assert len(set(map(tuple, static["tokens"]))) > 1


def test_the_decode_graph_reads_the_prefill_weights(tiny_checkpoint, llava_static, images, tmp_path: Path,
                                                    monkeypatch) -> None:
    """Where the weights are external data (every 7B export), llm_decode.onnx keeps no copy of its own: its weights
    point into llm_prefill.onnx.data, its few own constants sit in a small file of its own, and ONNX Runtime runs
    the artifact as it runs the one whose graphs embed their weights (tensor by tensor equal; the same tokens)."""
    import onnx
    from onnx import numpy_helper

    from apet.export import onnx_utils
    from apet.export.artifact import ExportConfig, export_artifact

    monkeypatch.setattr(onnx_utils, "PROTOBUF_LIMIT", 0)  # the path of models above 2 GB: external data
    out = tmp_path / "external"
    export_artifact(ExportConfig(model=str(tiny_checkpoint), out=out, ratio=0.11, stages=2, dtype="fp32",
                                 kv_cache="static"))
    graphs = read_manifest(out).graphs
    assert graphs[LLM_DECODE].external_data == ["llm_decode.onnx.data", "llm_prefill.onnx.data"]
    assert graphs[LLM_PREFILL].external_data == ["llm_prefill.onnx.data"]
    assert (out / "llm_decode.onnx.data").stat().st_size < 0.05 * (out / "llm_prefill.onnx.data").stat().st_size
    embedded, external = (onnx.load(str(d / "llm_decode.onnx")).graph.initializer for d in (llava_static, out))
    assert len(embedded) == len(external) and len(external) > 20
    for want, got in zip(embedded, external):
        np.testing.assert_array_equal(numpy_helper.to_array(got), numpy_helper.to_array(want), err_msg=got.name)
    prompts = ["What is in the picture?", "Describe the colors."]
    shared = _greedy(Pipeline.load(out, backend="onnxruntime"), images, prompts)
    _assert_same(shared, _greedy(Pipeline.load(llava_static, backend="onnxruntime"), images, prompts), atol=1e-5)


def test_qwen_static_equals_concatenating_form_and_torch(qwen_artifact_factory, tiny_qwen_adapter) -> None:
    """M-RoPE positions [3, B, 1], one stage with a per-image K."""
    image, prompt = [make_image(4, (224, 168))], ["Describe the image."]
    static_art = qwen_artifact_factory(kv_cache="static")
    static = _greedy(Pipeline.load(static_art, backend="onnxruntime"), image, prompt)
    dynamic = _greedy(Pipeline.load(qwen_artifact_factory(), backend="onnxruntime"), image, prompt)
    reference = _greedy(Pipeline.load(static_art, backend="torch", adapter=tiny_qwen_adapter), image, prompt)
    _assert_same(static, dynamic, atol=1e-4)
    _assert_same(static, reference, atol=1e-4)


def test_qwen3_static_equals_concatenating_form(qwen3_artifact_factory, tiny_qwen3_adapter) -> None:
    """Injected per-layer inputs (DeepStack) at prefill; decode has no visual rows and takes none."""
    image, prompt = [make_image(5, (256, 192))], ["What is this?"]
    static_art = qwen3_artifact_factory(ratio=0.3, kv_cache="static")
    decode_inputs = [spec["name"] for spec in read_manifest(static_art).graphs[LLM_DECODE].inputs]
    assert "injected_embeds" not in decode_inputs
    static = _greedy(Pipeline.load(static_art, backend="onnxruntime"), image, prompt)
    dynamic = _greedy(Pipeline.load(qwen3_artifact_factory(ratio=0.3), backend="onnxruntime"), image, prompt)
    reference = _greedy(Pipeline.load(static_art, backend="torch", adapter=tiny_qwen3_adapter), image, prompt)
    _assert_same(static, dynamic, atol=1e-4)
    _assert_same(static, reference, atol=1e-4)


def test_caches_are_written_in_place_and_decode_needs_no_shape_nodes(llava_static, images, tmp_path: Path) -> None:
    """The caches bound as input and output hold the prompt after prefill (zeros beyond it): the graphs wrote the
    device buffers themselves. With its batch fixed, ONNX Runtime folds every shape computation of the decode
    graph (nothing left for the host, what CUDA graphs need); stage 2 is in the prefill graph only."""
    import onnx
    import onnxruntime as ort

    pipeline = Pipeline.load(llava_static, backend="onnxruntime")
    result = pipeline.generate_batch([images[0]], ["What is in the picture?"],
                                     pipeline_config(max_new_tokens=3))[0]
    static = pipeline.backend.static
    for layer, cache in ((0, static.caches[1][0]), (3, static.caches[1][6])):  # keys before / after stage 2
        keys = cache.numpy()  # [1, kv, capacity, d]
        written = int(np.flatnonzero(np.abs(keys[0, 0]).sum(-1)).max()) + 1
        assert written == pipeline.backend.cache_lengths()[layer]
        assert not np.any(keys[:, :, written:])
    assert pipeline.backend.cache_lengths()[0] == result.stats.prompt_tokens[0] + 2  # prompt + 2 decode steps

    manifest = read_manifest(llava_static)
    names = {g: {n.name.split("/")[1] for n in onnx.load(str(llava_static / manifest.graphs[g].file),
                                                         load_external_data=False).graph.node if "/" in n.name}
             for g in (LLM_PREFILL, LLM_DECODE)}
    assert "apet_stage2" in names[LLM_PREFILL] and "apet_stage2" not in names[LLM_DECODE]
    options = ort.SessionOptions()
    options.add_free_dimension_override_by_name("batch", 2)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "decode.onnx")
    ort.InferenceSession(str(llava_static / manifest.graphs[LLM_DECODE].file), options,
                         providers=["CPUExecutionProvider"])
    folded = onnx.load(str(tmp_path / "decode.onnx"), load_external_data=False).graph
    assert not [n.op_type for n in folded.node if n.op_type in ("Shape", "Size", "If", "Loop")]
    producers = {out: n.op_type for n in folded.node for out in n.output}
    assert {producers[o.name] for o in folded.output if o.name.startswith("present_")} == {"ScatterElements"}


def pipeline_config(**kwargs):
    from apet.runtime.sampling import GenerationConfig

    return GenerationConfig(**kwargs)


def test_bad_requests_and_options_fail_clearly(llava_static, images) -> None:
    pipeline = Pipeline.load(llava_static, backend="onnxruntime")
    manifest = pipeline.manifest
    with pytest.raises(InputError, match="max_context"):
        pipeline.generate_batch([images[0]], ["word " * manifest.max_context], pipeline_config(max_new_tokens=2))
    backend = pipeline.backend
    with pytest.raises(InputError, match="run prefill first"):  # a decode step that does not follow the cache
        backend.decode(np.array([1]), np.ones((1, 7), dtype=np.int64), np.full((1, 1), 6))
    with pytest.raises(InputError, match="exceeds the static cache"):
        backend.decode(np.array([1]), np.ones((1, manifest.max_context + 1), dtype=np.int64),
                       np.full((1, 1), manifest.max_context))
    from apet.export.artifact import ExportConfig

    with pytest.raises(UsageError, match="--kv-cache"):
        ExportConfig(model="tiny", out=Path("x"), ratio=0.11, kv_cache="paged")
    with pytest.raises(UsageError, match="--all-logits"):
        ExportConfig(model="tiny", out=Path("x"), ratio=0.11, kv_cache="static", all_logits=True)
    from apet.runtime.pipeline import make_backend

    with pytest.raises(Exception, match="dynamic KV-cache form"):
        make_backend("tensorrt", llava_static, manifest, "cuda")


def test_manifest_records_the_form_and_old_manifests_load_as_dynamic(llava_static, artifact_factory) -> None:
    from apet.manifest import manifest_from_json, sign

    static = read_manifest(llava_static)
    assert static.kv_cache == "static" and set(static.graphs) == {"vision", LLM_PREFILL, LLM_DECODE}
    data = json.loads((artifact_factory(ratio=0.11, stages=2) / "manifest.json").read_text())
    assert data["kv_cache"] == "dynamic"
    data.pop("kv_cache")
    data.pop("digest")
    assert manifest_from_json(sign(data)).kv_cache == "dynamic"  # written before the field
    with pytest.raises(ArtifactError, match="kv_cache"):
        manifest_from_json(sign({**data, "kv_cache": "paged"}))


@pytest.mark.trt
def test_tensorrt_rtx_builds_both_static_graphs(llava_static, rtx_api) -> None:
    """The prefill (stage 2, dynamic prompt length) and decode graphs parse and build in TensorRT-RTX, the cache
    writes (ScatterElements) included."""
    from apet.engines.trt import BuildOptions, Profile, build_engine

    manifest = read_manifest(llava_static)
    spec, context = manifest.model.decoder, manifest.max_context
    layout = manifest.cache_layout
    caches = {f"past_{kind}.{i}": (1, spec.num_kv_heads, layout.capacity(i, context), spec.head_dim)
              for i in range(spec.num_layers) for kind in ("key", "value")}

    def profile(name: str, shapes: dict[str, list[tuple]]) -> Profile:
        return Profile(name, {k: tuple(v) if isinstance(v, list) else (v, v, v) for k, v in shapes.items()})

    span = manifest.compression.stage2.span
    lengths = [span + 1, span + 40, span + 200]
    prefill = profile("prefill", {"inputs_embeds": [(1, n, spec.hidden_size) for n in lengths],
                                  "position_ids": [(1, n) for n in lengths],
                                  "attention_mask": [(1, n) for n in lengths], "image_start": (1,), **caches})
    decode = profile("decode", {"inputs_embeds": (1, 1, spec.hidden_size), "position_ids": (1, 1),
                                "attention_mask": (1, context), "cache_position": (1,), **caches})
    for graph, profiles in ((LLM_PREFILL, [prefill]), (LLM_DECODE, [decode])):
        built = build_engine(rtx_api, llava_static / manifest.graphs[graph].file, profiles,
                             BuildOptions(compute_capabilities=("sm86",)))
        assert len(built.plan) > 0 and [s["name"] for s in built.inputs][0] == "inputs_embeds"


def test_bench_takes_the_static_form() -> None:
    """apet-bench --kv-cache static (what scripts/device_run.sh ortstatic runs on the H200) is validated."""
    from apet.bench.run import BenchConfig

    assert BenchConfig(model="tiny", out=Path("x"), kv_cache="static").kv_cache == "static"
    with pytest.raises(UsageError, match="--kv-cache"):
        BenchConfig(model="tiny", out=Path("x"), kv_cache="paged")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ort_gpu_kernels_sums_the_trace_per_call() -> None:
    """scripts/ort_gpu_kernels.py (the H200's account of ONNX Runtime's kernels, docs/benchmarks.md): GPU events
    by category, per call, kernels ranked by time; host-side events ignored."""
    script = _script("ort_gpu_kernels")
    events = [{"cat": "kernel", "name": "a", "dur": 1000.0}, {"cat": "kernel", "name": "a", "dur": 500.0},
              {"cat": "Kernel", "name": "b", "dur": 3000.0}, {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "dur": 200.0},
              {"cat": "cpu_op", "name": "aten::mm", "dur": 9000.0}]
    got = script.summarize_trace(events, [5.0, 7.0, 6.0])
    assert got["calls"] == 3 and got["wall_ms_median"] == 6.0 and got["wall_ms_min"] == 5.0
    assert got["gpu_ms_per_call"] == {"kernels": round(4.5 / 3, 4), "copies": round(0.2 / 3, 4)}
    assert got["gpu_busy_ms_per_call"] == round(4.7 / 3, 4)
    assert got["host_ms_per_call"] == round(6.0 - 4.7 / 3, 4)
    assert got["count_per_call"] == {"kernels": 1.0, "copies": 0.3}
    assert got["top_kernels_ms_per_call"] == [["b", 1.0], ["a", 0.5]]
    assert got["timeline"] == {}  # no call ranges in this trace


def test_ort_gpu_kernels_splits_each_call_around_its_gpu_work() -> None:
    """Per call (the profiler range around it): time before the first GPU event, the span of GPU work, the idle
    time inside it (overlapping events count once), time after the last; gaps named by the events around them."""
    script = _script("ort_gpu_kernels")
    mark = script.CALL_MARK
    events = [{"name": mark, "ph": "X", "cat": "user_annotation", "ts": 0.0, "dur": 100.0},
              {"name": mark, "ph": "X", "cat": "gpu_user_annotation", "ts": 10.0, "dur": 70.0},  # not a call
              {"cat": "gpu_memcpy", "name": "HtoD", "ts": 10.0, "dur": 5.0},
              {"cat": "kernel", "name": "k1", "ts": 20.0, "dur": 30.0},
              {"cat": "kernel", "name": "k2", "ts": 40.0, "dur": 20.0},  # overlaps k1: no gap
              {"cat": "kernel", "name": "k3", "ts": 70.0, "dur": 10.0},
              {"name": mark, "ph": "X", "cat": "user_annotation", "ts": 200.0, "dur": 50.0},
              {"cat": "kernel", "name": "k1", "ts": 210.0, "dur": 10.0},
              {"cat": "kernel", "name": "k2", "ts": 240.0, "dur": 5.0},
              {"cat": "kernel", "name": "late", "ts": 400.0, "dur": 1.0}]  # outside every call
    got = script.call_timeline(events)
    assert got["calls"] == 2
    # call 1: before 10, span 70, idle 5 + 10, after 20; call 2: before 10, span 35, idle 20, after 5 (µs; medians)
    assert got["before_gpu_ms"] == 0.01 and got["gpu_span_ms"] == 0.0525 and got["after_gpu_ms"] == 0.0125
    assert got["idle_in_span_ms"] == 0.0175
    assert got["largest_gaps_ms_per_call"][0] == ["k1 -> k2", 0.01]  # call 2's 20 µs, over 2 calls


def test_ort_gpu_kernels_runs_the_static_form(llava_static: Path) -> None:
    """The script's phases on the tiny static artifact (CPU: wall times, no GPU events): the decode phase follows
    a fresh prefill and runs its steps without exceeding the cache."""
    result = _script("ort_gpu_kernels").run(llava_static, cuda_graphs=True, calls=2, decode_steps=3)
    assert result["kv_cache"] == "static" and \
        list(result["phases"]) == ["vision", "prefill", "first_token", "decode_step"]
    assert [p["calls"] for p in result["phases"].values()] == [2, 2, 2, 3]
    assert all(p["wall_ms_median"] > 0 for p in result["phases"].values())
