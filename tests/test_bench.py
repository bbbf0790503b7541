"""apet-bench on the CPU (tiny model) and the FLOP/byte counter against hand-computed counts."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from apet.bench import flops


def test_random_init_is_seeded_and_leaves_the_callers_rng_alone() -> None:
    """``*-shapes`` weights are the same in every process, so two bench runs (e.g. the two attention forms in ONNX
    Runtime) can be compared token for token."""
    from transformers import AutoConfig

    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.adapters.llava.tiny import ensure_tiny_llava

    config = AutoConfig.from_pretrained(ensure_tiny_llava())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = (LlavaAdapter.random_init(config, dtype=torch.float32, device="cpu").model.state_dict()
                     for _ in range(2))
    assert torch.equal(torch.get_rng_state(), before)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = LlavaAdapter.random_init(config, dtype=torch.float32, device="cpu", seed=1).model.state_dict()
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_vision_cost_by_hand() -> None:
    v = flops.VisionShape(tokens=5, dim=4, mlp_dim=8, layers=2, patch=2, channels=3)
    # per layer: 4*5*4*4 (q,k,v,o) + 2*25*4 (QK^T, PV) + 2*5*4*8 (MLP) = 840; patch embed 4*3*2*2*4 = 192
    cost = flops.vision_cost(v)
    assert cost.flops == 2 * (2 * 840 + 192)
    # weights 2*(64 + 64) + 48 = 304 elements, activations 60 pixels + 40 = 100, fp16
    assert cost.bytes == 2 * (304 + 100)
    # a gated MLP (Qwen2.5-VL's gate, up and down) has three dim x mlp_dim matrices: 2*5*4*8 MACs more per layer
    gated = flops.vision_cost(flops.VisionShape(tokens=5, dim=4, mlp_dim=8, layers=2, patch=2, channels=3,
                                                mlp_matrices=3))
    assert gated.flops == cost.flops + 2 * 2 * 5 * 4 * 8 and gated.bytes == cost.bytes + 2 * 2 * 4 * 8


def test_llm_costs_by_hand() -> None:
    m = flops.LlmShape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, head_dim=4, vocab=10)
    # weights per layer: q,o 8*8 each, k,v 8*4 each = 192; MLP 3*8*16 = 384
    decode = flops.decode_cost(m, [3, 3])
    assert decode.flops == 2 * (2 * (192 + 2 * 4 * 2 * 4 + 384) + 80)
    assert decode.bytes == 2 * (2 * 576 + 80) + 2 * (2 * 4 * 1 * 4 * 2)
    prefill = flops.prefill_cost(m, [6, 4])  # stage 2 shortened layer 2 to 4 tokens
    layer1 = 6 * 192 + 2 * 6 * 3.5 * 2 * 4 + 6 * 384
    layer2 = 4 * 192 + 2 * 4 * 2.5 * 2 * 4 + 4 * 384
    assert prefill.flops == 2 * (layer1 + layer2 + 80)
    assert prefill.bytes == 2 * (2 * 576 + 80 + 7 * 8) + (2 * 6 * 4 * 2 + 2 * 4 * 4 * 2)
    assert flops.kv_bytes(m, [6, 4]) == 160


def test_apet_cost_and_floors_by_hand() -> None:
    cost = flops.apet_cost(tokens=10, dim=4, keep=6, basis=2)
    assert cost.flops == 2 * (80 + 16 + 80 + 40 + 80 + 40 + 160 + 160) and cost.bytes == 2 * (40 + 24)
    assert flops.Cost(2e12, 1e9).floor_ms(1.0, 1.0) == pytest.approx(2000.0)  # compute-bound
    assert flops.Cost(1e12, 3e9).floor_ms(1.0, 1.0) == pytest.approx(3000.0)  # bandwidth-bound
    projected = flops.project({"x": flops.Cost(42.6e12, 0)})
    assert projected["jetson-agx-orin-64gb"]["x"] == pytest.approx(1000.0)


def test_bench_cli_on_tiny_writes_json_md_png(tmp_path: Path) -> None:
    from apet.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "--model", "tiny", "--ratios", "1.0,0.11", "--repeats", "2", "--new-tokens", "4",
                 "--baselines", "hf,paper", "--backends", "torch,onnxruntime", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert not (out / "results.partial.json").exists()  # only a bench cut short leaves it
    assert results["schema"] == "apet-bench/2" and results["environment"]["ceilings"]["matmul_tflops"] > 0
    # one name for the network dtype: the header and every row say fp32 on the CPU (not float32 vs fp16)
    assert results["environment"]["dtype"] == "fp32" and {r["weights"] for r in results["runs"]} == {"fp32"}
    assert set(results["runs"][0]["generation"]["ttft"]) == {"median_ms", "p10_ms", "p90_ms", "min_ms", "repeats"}
    assert isinstance(results["noisy_timings"], dict) and results["noisy_spread"] == 1.5
    assert [r["ratio"] for r in results["runs"]] == [1.0, 0.11]
    low = results["runs"][1]
    assert low["budgets"] == {"k1": 40, "stage2_layer": 2, "k2": 16, "mean_tokens": 28.0, "tokens_per_view": 256,
                              "visual_tokens": 40, "views": 1}
    for key in ("vision_tower", "apet_stage1", "projector", "prefill", "apet_stage2"):
        assert low["stages"][key]["median_ms"] > 0 and low["stages"][key]["repeats"] == 6
    assert low["generation"]["decode_per_token"]["repeats"] == 2 * 3
    assert all(isinstance(r["vision_warmup_s"], float) and r["vision_warmup_s"] >= 0 for r in results["runs"])
    assert low["kv_cache_bytes"] < results["runs"][0]["kv_cache_bytes"]
    assert set(low["jetson_floors_ms"]) == {"jetson-agx-orin-64gb", "jetson-orin-nano-8gb"}
    assert {"vs_hf_generate_ttft", "vs_paper_style_ttft", "ttft_over_ratio_1"} <= set(low["speedup"])
    assert results["baselines"]["hf_generate"]["1"]["visual_tokens"] == 256
    # the exported graphs ran in ONNX Runtime and agree with the torch reference on the same weights (fp32 CPU)
    parity = low["onnxruntime"]["parity"]
    assert parity["stage1_index_equal"] and parity["stage2_index_equal"]
    assert parity["greedy_equal_steps"] == parity["greedy_steps"] == 32
    assert parity["max_abs_logit_diff"] < 1e-3 * max(1.0, parity["logit_scale"])
    assert low["onnxruntime"]["ttft"]["median_ms"] > 0 and low["visual_tokens"] == 40
    # the torch path over ORT's span too (host arrays to a token on the host), beside ORT's in the table
    request = low["generation"]["request_ttft"]
    assert request["repeats"] == 2 and request["median_ms"] > 0
    # timed as the device runtime runs: in a process of its own that never imported torch
    assert low["onnxruntime"]["process"] == "own" and low["onnxruntime"]["torch_in_process"] is False
    parts = low["onnxruntime"]["ttft_parts"]  # the first token's steps, timed in the same calls
    assert set(parts) == {"encode", "layout", "prefill"} and all(p["repeats"] == parts["encode"]["repeats"]
                                                                   for p in parts.values())
    ttft = low["onnxruntime"]["ttft"]
    assert 0.5 * ttft["min_ms"] <= sum(p["median_ms"] for p in parts.values()) <= 1.5 * ttft["p90_ms"]
    table = (out / "results.md").read_text()
    assert ", fp32; measured ceilings" in table and "| fp16 |" not in table and "| fp32 |" in table
    ttft = results["runs"][1]["generation"]["ttft"]
    assert f"| {ttft['median_ms']:.3f} [{ttft['p10_ms']:.3f}–{ttft['p90_ms']:.3f}] |" in table
    assert f" | {request['median_ms']:.3f} [{request['p10_ms']:.3f}–{request['p90_ms']:.3f}] | " in table
    assert table.count("\n| 1 | 0.11 |") >= 3 and "Against the baselines" in table and "vision warm-up s" in table
    for png in ("breakdown.png", "ttft.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # ApET's layers (parsed by TensorRT-RTX where it imports) projected onto the Jetsons beside what it saves
    if low["apet_layers"]:
        assert results["runs"][0]["apet_layers"] == {} and 0 < low["apet_layers"]["apet_stage1"] <= 255
        agx = low["jetson_apet_ms"]["jetson-agx-orin-64gb"]["apet_stage1"]
        assert agx["launch_ms"] == pytest.approx(agx["layers"] * 5e-3, abs=1e-3)
        assert "## ApET on Jetson: projected cost against what it saves" in table


def test_a_bench_cut_short_keeps_what_it_measured(tmp_path: Path, monkeypatch) -> None:
    """A GPU lease or CI job that stops the bench mid-way leaves results.partial.json with every finished run."""
    from apet.bench import run

    calls = []

    def bench_ratio(model, cfg, ceilings, ratio, batch):
        calls.append(ratio)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a timeout's signal turns into
        return {"ratio": ratio, "batch": batch, "generation": {}}

    monkeypatch.setattr(run, "bench_ratio", bench_ratio)
    cfg = run.BenchConfig(model="tiny", ratios=(1.0, 0.5, 0.11), batches=(1,), out=tmp_path / "bench",
                          baselines=(), repeats=2)
    with pytest.raises(KeyboardInterrupt):
        run.run_bench(cfg)
    partial = json.loads((tmp_path / "bench" / "results.partial.json").read_text())
    assert [r["ratio"] for r in partial["runs"]] == [1.0] and partial["schema"] == "apet-bench/2"
    assert not (tmp_path / "bench" / "results.json").exists()


def test_spread_of_repeats_is_kept_and_noisy_timings_are_warned(caplog) -> None:
    import logging

    from apet.bench.report import _ms, _noise
    from apet.bench.run import _flag_noise
    from apet.bench.timing import summarize

    steady = summarize([14.0, 10.0, 11.0, 12.0, 13.0, 15.0, 16.0, 17.0, 18.0, 19.0])
    # nearest-rank percentiles of 10 sorted samples: p10 = 2nd, p90 = 9th
    assert (steady.median_ms, steady.p10_ms, steady.p90_ms, steady.min_ms) == (14.5, 11.0, 18.0, 10.0)
    noisy = summarize([10.0] * 7 + [40.0] * 3)  # three repeats in ten slowed 4x by another process
    assert (noisy.median_ms, noisy.p90_ms, noisy.spread) == (10.0, 40.0, 4.0)
    results = {"environment": {"device": "cpu"}, "baselines": {"hf_generate": {"1": {"ttft": steady.to_json()}}},
               "runs": [{"generation": {"ttft": steady.to_json(), "decode_per_token": noisy.to_json()}}]}
    with caplog.at_level(logging.WARNING, logger="apet.bench.run"):
        _flag_noise(results)
    assert results["noisy_timings"] == {"runs[0].generation.decode_per_token": 4.0}
    assert len(caplog.records) == 1 and "1 of 3 timings are noisy" in caplog.text
    assert "runs[0].generation.decode_per_token: 4.00x" in caplog.text and "--repeats" in caplog.text
    assert _ms(steady.to_json()) == "14.500 [11.000–18.000]"
    assert "**Noisy timings**: 1 have a p90 above 1.5x" in "\n".join(_noise(results))
    caplog.clear()
    _flag_noise({**results, "runs": results["runs"][:0]})
    assert caplog.records == []


def test_apet_projection_on_jetson_by_hand() -> None:
    """Layers x the per-layer cost (an assumption, overridable) + the stage's floor; the report weighs it against
    the prefill and projector floors saved against ratio 1.0."""
    from apet.bench.report import jetson_apet_lines

    floors = {"jetson-agx-orin-64gb": {"apet_stage1": 0.1, "prefill": 60.0, "projector": 1.0},
              "jetson-orin-nano-8gb": {"apet_stage1": 0.2, "prefill": 120.0, "projector": 2.0}}
    projected = flops.project_apet({"apet_stage1": 200}, floors)
    assert projected["jetson-agx-orin-64gb"]["apet_stage1"] == {"layers": 200, "layer_us": 5.0, "launch_ms": 1.0,
                                                               "floor_ms": 0.1, "ms": 1.1}
    assert projected["jetson-orin-nano-8gb"]["apet_stage1"]["launch_ms"] == pytest.approx(1.3)
    mine = flops.project_apet({"apet_stage1": 200}, floors, {"jetson-orin-nano-8gb": 10.0})
    assert mine["jetson-orin-nano-8gb"]["apet_stage1"]["ms"] == pytest.approx(2.2)
    full = {"batch": 1, "ratio": 1.0, "weights": "fp16", "jetson_apet_ms": {},
            "jetson_floors_ms": {"jetson-agx-orin-64gb": {"prefill": 190.0, "projector": 3.0},
                                 "jetson-orin-nano-8gb": {"prefill": 480.0, "projector": 6.0}}}
    low = {"batch": 1, "ratio": 0.11, "weights": "fp16", "jetson_apet_ms": projected, "jetson_floors_ms": floors}
    lines = "\n".join(jetson_apet_lines([full, low]))
    assert "| 1 | 0.11 | jetson-agx-orin-64gb | 200 | 5.0 | 1.10 | 132.0 | 130.9 |" in lines
    assert "| 1 | 0.11 | jetson-orin-nano-8gb | 200 | 6.5 | 1.50 | 364.0 | 362.5 |" in lines
    uncounted = {**low, "jetson_apet_ms": {"jetson-agx-orin-64gb": {}, "jetson-orin-nano-8gb": {}}}
    lines = "\n".join(jetson_apet_lines([full, uncounted]))  # a bench where no TensorRT module parses (the H200)
    assert "| 1 | 0.11 | jetson-agx-orin-64gb | not counted (no TensorRT module here) | – | – | 132.0 | – |" in lines


def test_ort_profile_splits_runs_and_attributes_nodes_and_kernels() -> None:
    from apet.bench.ort_profile import split_runs, summarize

    events = [{"cat": "Session", "name": "model_run", "ts": 0, "dur": 1000},
              {"cat": "Node", "name": "/vision/conv/Conv_kernel_time", "ts": 10, "dur": 300},
              {"cat": "Kernel", "name": "implicit_gemm", "ts": 20, "dur": 250},
              {"cat": "Node", "name": "Sub_300_kernel_time", "ts": 320, "dur": 20},  # made by ORT: the node before
              {"cat": "Node", "name": "/apet_stage1/TopK_kernel_time", "ts": 400, "dur": 100},
              {"cat": "Node", "name": "/apet_stage1/TopK_fence_before", "ts": 399, "dur": 1},
              {"cat": "Node", "name": "InsertedPrecisionFreeCast_/projector/MatMul_kernel_time", "ts": 600, "dur": 50},
              {"cat": "Session", "name": "model_run", "ts": 2000, "dur": 500},
              {"cat": "Node", "name": "/apet_stage1/ArgMax_kernel_time", "ts": 2100, "dur": 40}]
    runs = split_runs(events)
    assert [r["run_ms"] for r in runs] == [1.0, 0.5]
    assert dict(runs[0]["host_ms"]) == pytest.approx({"vision": 0.32, "apet_stage1": 0.1, "projector": 0.05})
    assert dict(runs[0]["gpu_ms"]) == pytest.approx({"vision": 0.25})
    assert summarize(runs)["host_ms"]["apet_stage1"] == pytest.approx(0.07)


def test_ort_profile_of_the_tiny_artifact_on_cpu(artifact_factory, tmp_path: Path) -> None:
    from apet.bench.ort_profile import main

    out = tmp_path / "profile.json"
    assert main([str(artifact_factory(ratio=0.11, stages=2)), "--device", "cpu", "--repeats", "2", "--warmup", "1",
                 "--decode-steps", "2", "--out", str(out)]) == 0
    profile = json.loads(out.read_text())["profiles"][0]
    assert profile["vision"]["runs"] == 2 and profile["prefill"]["runs"] == 2 and profile["decode_step"]["runs"] == 4
    for phase, stage in (("vision", "vision"), ("vision", "apet_stage1"), ("prefill", "llm layers"),
                         ("prefill", "apet_stage2")):
        assert profile[phase]["host_ms"][stage] > 0
    assert sum(profile["vision"]["host_ms"].values()) <= profile["vision"]["run_ms"]
    assert 0 < profile["apet_share"]["apet_stage1_over_vision"] and profile["family"] == "llava"


def test_ort_process_refuses_timings_of_another_request() -> None:
    """The bench trusts its own-process ONNX Runtime numbers only for its own request: other pixels, another
    input set or another prompt layout is an error naming what differs and the way out."""
    import numpy as np

    from apet.bench.ort_process import INPUT_PREFIX, _check_same_request
    from apet.errors import BackendError

    pixels = np.arange(6, dtype=np.float32).reshape(1, 6)
    ids = np.array([[1, 2, 3]])
    child = {INPUT_PREFIX + "pixel_values": pixels, "keep_index": np.array([[0]]), "token_ids": ids}

    def layout(_keep):
        return SimpleNamespace(token_ids=ids)

    _check_same_request(child, {"pixel_values": pixels}, layout)  # the same request passes
    for vision, make, named in (({"pixel_values": pixels + 1}, layout, "pixel_values"),
                                ({"pixel_values": pixels, "grid": ids}, layout, "grid"),
                                ({"pixel_values": pixels}, lambda k: SimpleNamespace(token_ids=ids + 1),
                                 "token_ids")):
        with pytest.raises(BackendError, match=named) as err:
            _check_same_request(child, vision, make)
        assert "--ort-process shared" in err.value.fix


def test_ort_process_writes_the_request_with_the_bench_tokenizer(artifact_factory) -> None:
    """The own-process child writes the prompt with the bench's tokenizer, not the artifact's: a random-weight
    ``*-shapes`` bench has none (random ids) while its exported artifact holds one, which made the child's token
    ids differ on the H200 (an artifact exported earlier and passed with --ort-artifact)."""
    from apet.bench.ort_process import OrtRunSpec, time_in_own_process
    from apet.bench.ort_profile import synthetic_request
    from apet.manifest import read_manifest

    artifact = artifact_factory()
    assert (artifact / "tokenizer.json").is_file()  # the artifact's own tokenizer differs from the bench's (none)
    manifest = read_manifest(artifact)
    _, inputs, make_layout = synthetic_request(manifest, None, 1, (640, 480), 12, 4)
    _, _, with_artifact_tokenizer = synthetic_request(manifest, artifact, 1, (640, 480), 12, 4)
    keep = np.zeros((1, manifest.compression.stage1_keep), dtype=np.int64)
    assert not np.array_equal(make_layout(keep).token_ids, with_artifact_tokenizer(keep).token_ids)
    spec = OrtRunSpec(str(artifact), "cpu", False, "auto", "default", 1, (640, 480), 12, 4, 1, 2, tokenizer=None)
    timings, torch_imported = time_in_own_process(spec, inputs.arrays, make_layout)  # the request check passes
    assert len(timings.tokens) == 2 and not torch_imported


def test_the_request_span_starts_from_the_host_arrays(tiny_adapter) -> None:
    """``ApetPath.request_logits`` (the torch path over ONNX Runtime's TTFT span) runs the request's own host
    pixels: on the setup's pixels it gives the timed first token's logits; on other pixels it gives what the timed
    path gives once those pixels are on the GPU."""
    from apet.bench.stages import ApetPath, Request
    from apet.contracts.plan import Budget, plan_for
    from apet.models.registry import get_family

    plan = plan_for(tiny_adapter.spec, get_family("llava"), Budget(ratio=0.11, stages=2))
    path = ApetPath(tiny_adapter, plan, Request(batch=2, prompt_tokens=20, new_tokens=2), graphs=False)

    def timed_path_logits() -> torch.Tensor:  # first_token's steps, its logits instead of its argmax
        tokens, index = path.apet1(x=path.vision(**path.vision_inputs))
        return path.prefill(**{**path.prefill_inputs, "visual": path.projector(t=tokens, i=index)[0]})

    with torch.no_grad():
        torch.testing.assert_close(path.request_logits(), timed_path_logits(), rtol=0, atol=1e-5)
        assert path.request_first_token().tolist() == path.first_token().tolist()
        (name,) = [n for n in path.host_inputs if n in path.vision_inputs and path.host_inputs[n].dtype.kind == "f"]
        other = np.random.default_rng(1).standard_normal(path.host_inputs[name].shape).astype(np.float32)
        path.host_inputs = {**path.host_inputs, name: other}
        got = path.request_logits()
        path.vision_inputs = {**path.vision_inputs, name: torch.from_numpy(other)}
        want = timed_path_logits()
        assert (want - path.prefill(**path.prefill_inputs)).abs().max() > 1e-3  # other pixels, other logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("flags, compiled, mode", [([], False, "default"), (["--compile"], True, "default"),
                                                    (["--compile-mode", "max-autotune"], True, "max-autotune")])
def test_compile_mode_implies_compile(monkeypatch, tmp_path, flags, compiled, mode):
    """``apet-bench --compile-mode max-autotune`` compiles (the mode needs a compile) in that mode."""
    from apet.bench import run
    from apet.cli import main

    seen = []

    def run_bench(cfg):  # what the command hands the bench, and the report it then prints
        seen.append(cfg)
        cfg.out.mkdir()
        (cfg.out / "results.md").write_text("report")

    monkeypatch.setattr(run, "run_bench", run_bench)
    assert main(["bench", "--model", "tiny", "--no-baselines", "--out", str(tmp_path / "b"), *flags]) == 0
    assert (seen[0].compile, seen[0].compile_mode) == (compiled, mode)
