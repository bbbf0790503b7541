"""--attention op (ONNX Attention + RotaryEmbedding, opset 23) vs pattern (MatMul-Softmax-MatMul, opset 17), issue 20.

The pattern form's parity with Hugging Face and the two-stage reference is tested in test_llm_export.py,
test_vision_export.py and test_runtime.py on the default (pattern) artifacts; here the same references are
applied to op-form artifacts, TensorRT-RTX parses and builds them with one IAttention per attention, and the
pattern form is checked to stay within what TensorRT 10.3 parses.
"""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from conftest import make_image
from test_llm_export import LAYERS, _ort_greedy, _prompt
from test_runtime import PROMPTS, _generate

from apet.contracts.files import REPORT_NAME
from apet.contracts.onnx_graph import op_histogram
from apet.contracts.targets import builder_problem, resolve_form
from apet.engines.api import TrtApi
from apet.engines.build import BuildConfig, build_artifact
from apet.errors import UsageError
from apet.export.onnx_utils import PENDING_DOMAIN
from apet.manifest import read_manifest
from apet.modeling.reference import Reference
from apet.runtime.pipeline import Pipeline

# Ops the ONNX parser of TensorRT 10.0/10.1 supports (onnx-tensorrt docs/operators.md of the 10.1 GA release,
# "Supported: Y"); TensorRT 10.3 (JetPack 6) parses a superset of these.
TRT_10_3_OPS = set("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout
Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool
GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GridSample GroupNormalization GRU HardSigmoid HardSwish Hardmax
Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean MeanVarianceNormalization Min Mish Mod Mul Neg
NonMaxSuppression NonZero Not OneHot Or Pad ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike
RandomUniform RandomUniformLike Range Reciprocal ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN RoiAlign Round ScaledTanh Scan Scatter
ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth
Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())


def _vision_depth(adapter) -> int:
    """Encoder layers the LLaVA vision graph runs (up to the feature layer), from the checkpoint's config."""
    layer = adapter.spec.extra["vision_feature_layer"]
    total = adapter.model.config.vision_config.num_hidden_layers
    return layer if layer >= 0 else total + 1 + layer


def _opset(path: Path) -> dict[str, int]:
    return {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}


# -- the --target / --attention / --opset contract --------------------------------------------------------------
def test_targets_choose_form_and_refuse_conflicts() -> None:
    assert resolve_form() == resolve_form("jetpack6") == resolve_form(attention="pattern")
    assert (resolve_form().attention, resolve_form().opset) == ("pattern", 17)
    for target in ("jetpack7", "trt10.15+", "rtx"):
        form = resolve_form(target)
        assert (form.target, form.attention, form.opset) == (target, "op", 23)
    assert resolve_form(attention="op").target == "trt10.15+"
    assert resolve_form("rtx", attention="pattern").opset == 17  # pattern parses on every target
    for kwargs, words in [(dict(target="jetpack6", attention="op"), "--target jetpack6"),
                          (dict(target="rtx", opset=20), "--opset"), (dict(target="jetpack6", opset=22), "--opset"),
                          (dict(target="jetson"), "--target 'jetson'"), (dict(attention="flash"), "--attention")]:
        with pytest.raises(UsageError, match=words.replace("+", r"\+")):
            resolve_form(**kwargs)
    op = resolve_form("rtx")
    assert "--target" not in (builder_problem(op, "tensorrt", "10.3.0") or "") and builder_problem(
        op, "tensorrt", "10.3.0").startswith("tensorrt 10.3.0 cannot parse")
    assert builder_problem(op, "tensorrt", "10.14.1") and builder_problem(op, "tensorrt", "10.15.1.29") is None
    assert builder_problem(resolve_form(), "tensorrt", "10.3.0") is None
    assert builder_problem(op, "tensorrt-rtx", "1.7.1.116") is None


def test_cli_rejects_op_for_jetpack6(tmp_path: Path, capsys) -> None:
    from apet.cli import main

    code = main(["export", "--model", "tiny", "--ratio", "0.11", "--target", "jetpack6", "--attention", "op",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "--target jetpack6" in capsys.readouterr().err and not (tmp_path / "x").exists()


# -- op form: parity with the PyTorch model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def op_two_stage(artifact_factory) -> Path:
    return artifact_factory(ratio=0.11, stages=2, attention="op")


def test_op_graphs_hold_one_attention_per_layer(op_two_stage: Path, artifact_factory, tiny_adapter) -> None:
    manifest = read_manifest(op_two_stage)
    assert (manifest.target, manifest.attention, manifest.opset) == ("trt10.15+", "op", 23)
    for name in ("llm.onnx", "vision.onnx"):
        assert _opset(op_two_stage / name) == {"": 23}
        onnx.checker.check_model(str(op_two_stage / name), full_check=True)
    llm, vision = op_histogram(op_two_stage / "llm.onnx"), op_histogram(op_two_stage / "vision.onnx")
    assert llm["Attention"] == LAYERS and llm["RotaryEmbedding"] == 2 * LAYERS and "Softmax" not in llm
    assert vision["Attention"] == _vision_depth(tiny_adapter) and "Softmax" not in vision
    assert not any(PENDING_DOMAIN in key for key in {**llm, **vision})
    # the model the torch backends share is handed back with its own attention implementation
    assert tiny_adapter.model.config.vision_config._attn_implementation in ("sdpa", "eager")


def test_pattern_form_stays_within_tensorrt_10_3(artifact_factory) -> None:
    artifact = artifact_factory(ratio=0.11, stages=2)
    manifest = read_manifest(artifact)
    assert (manifest.target, manifest.attention, manifest.opset) == ("jetpack6", "pattern", 17)
    for name in ("llm.onnx", "vision.onnx"):
        assert _opset(artifact / name) == {"": 17}
        ops = set(op_histogram(artifact / name))
        assert ops <= TRT_10_3_OPS, sorted(ops - TRT_10_3_OPS)
        assert "Softmax" in ops and "Attention" not in ops


@pytest.mark.parametrize("lengths", [[70, 55]])
def test_op_two_stage_llm_matches_reference(op_two_stage: Path, tiny_adapter, lengths: list[int]) -> None:
    """Logits, stage-2 kept indices and 12 greedy tokens of llm.onnx (op) == the HF-module reference."""
    plan = read_manifest(op_two_stage).compression
    embeds, mask = _prompt(len(lengths), lengths, seed=11)
    image_start = torch.tensor([max(lengths) - n + 6 for n in lengths])
    reference = Reference(tiny_adapter, plan.stage1, plan.stage2)
    want_first, state = reference.prefill(embeds, mask, image_start)
    got_first, got_tokens, result, _ = _ort_greedy(op_two_stage / "llm.onnx", tiny_adapter, embeds, mask, 12,
                                                   image_start)
    np.testing.assert_array_equal(result["stage2_index"], state.stage2_index.numpy())
    np.testing.assert_allclose(got_first, want_first.numpy(), rtol=1e-4, atol=1e-4 * float(want_first.abs().max()))
    table = tiny_adapter.embed_tokens().weight.detach()
    logits, want_tokens = want_first, []
    for _ in range(12):
        token = logits[:, -1].argmax(-1)
        want_tokens.append(token.tolist())
        logits = reference.decode(table[token][:, None], state)
    assert got_tokens == want_tokens and len(set(sum(got_tokens, []))) > 1


def test_op_two_stage_pipeline_equals_torch(op_two_stage: Path, tiny_adapter) -> None:
    """apet-run on the op graphs (ONNX Runtime) == the torch backend: tokens and both stages' kept indices."""
    images = [make_image(1, (300, 200)), make_image(2, (180, 260))]
    prompts = [PROMPTS[2], PROMPTS[0]]  # different lengths: left padding
    ort_results = _generate(Pipeline.load(op_two_stage, backend="onnxruntime"), images, prompts, max_new_tokens=16)
    torch_results = _generate(Pipeline.load(op_two_stage, backend="torch", adapter=tiny_adapter), images, prompts,
                              max_new_tokens=16)
    assert [r.token_ids for r in ort_results] == [r.token_ids for r in torch_results]
    assert [r.keep_index for r in ort_results] == [r.keep_index for r in torch_results]
    assert ort_results[0].stats.cache_lengths[0] - ort_results[0].stats.cache_lengths[-1] == 40 - 16


def test_op_single_stage_bench_path_matches_reference(tiny_adapter, tmp_path: Path) -> None:
    """apet-bench --backends onnxruntime --attention op on the tiny model: the exported one-stage graphs'
    kept indices, logits and greedy tokens against the torch reference."""
    from apet.bench.ort_path import ort_run
    from apet.bench.stages import Request
    from apet.contracts.plan import plan_compression

    plan = plan_compression(tiny_adapter.spec.n_tokens, LAYERS, ratio=0.11, stages=1)
    result = ort_run(tiny_adapter, plan, Request(2, 12, 8, (320, 240)), max_context=400, repeats=1,
                     parity_steps=12, workdir=tmp_path, attention="op", process="shared")
    parity = result["parity"]
    assert result["attention"] == "op" and parity["stage1_index_equal"] and parity["stage2_index_equal"] is None
    assert parity["greedy_equal_steps"] == parity["greedy_steps"] == 12
    assert parity["max_abs_logit_diff"] < 1e-3 * max(1.0, parity["logit_scale"])
    visual = parity["visual_token_diff"]
    assert visual["tokens"] == 2 * plan.stage1_keep and visual["max"] < 1e-3 * max(1.0, visual["scale"])
    assert len(result["greedy_tokens"]) == 12
    assert result["process"] == "shared" and result["torch_in_process"] is True


# -- op form: TensorRT-RTX parses and builds, with one attention layer pair per attention ------------------------
@pytest.fixture(scope="module")
def op_engines(artifact_factory, rtx_api, tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("op_built") / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2, dtype="fp16", target="rtx"), target)
    build_artifact(BuildConfig(artifact=target, compute_capabilities=("sm86",), max_context=256, max_prompt=128),
                   api=rtx_api)
    return target


@pytest.mark.trt
def test_tensorrt_rtx_builds_op_graphs_with_fused_attention(op_engines: Path, tiny_adapter) -> None:
    report = json.loads((op_engines / REPORT_NAME).read_text())
    llm, vision = report["engines"]["llm"], report["engines"]["vision"]
    assert llm["bytes"] > 10_000 and vision["bytes"] > 10_000 and llm["attention_form"] == "op"
    assert llm["fused_layers"]["attention_input"] == llm["fused_layers"]["attention_output"] == LAYERS
    assert llm["fused_layers"]["rotary_embedding"] == 2 * LAYERS
    depth = _vision_depth(tiny_adapter)
    assert vision["fused_layers"]["attention_input"] == vision["fused_layers"]["attention_output"] == depth
    assert vision["fused_layers"]["rotary_embedding"] == 0
    from apet.inspect_artifact import describe

    text = describe(op_engines)
    assert "target     rtx: op attention" in text
    assert f"attention  {LAYERS} TensorRT attention layers, {2 * LAYERS} rotary-embedding" in text
    assert f"attention  {depth} TensorRT attention layers, 0 rotary-embedding" in text


@pytest.mark.trt
def test_pattern_graph_parses_without_attention_layers(artifact_factory, rtx_api) -> None:
    from apet.engines.trt import fused_layer_counts, parse_onnx

    _, network, _, _ = parse_onnx(rtx_api, artifact_factory(ratio=0.11, stages=2, dtype="fp16") / "llm.onnx")
    counts = fused_layer_counts(rtx_api, network)
    assert counts["attention"] == counts["rotary_embedding"] == 0


def test_build_refuses_tensorrt_that_cannot_parse_op_form(artifact_factory, tmp_path: Path) -> None:
    """TensorRT 10.3 (JetPack 6) gets a message naming --target before any parsing."""
    target = tmp_path / "artifact"
    shutil.copytree(artifact_factory(ratio=0.11, stages=2, dtype="fp16", target="rtx"), target)
    old_trt = TrtApi("tensorrt", types.SimpleNamespace(__version__="10.3.0"))  # never reached: refused first
    with pytest.raises(UsageError, match=r"tensorrt 10.3.0 cannot parse .* --target rtx .*--target jetpack6"):
        build_artifact(BuildConfig(artifact=target), api=old_trt)
    assert not (target / "llm.plan").exists()


# -- op form for every family ----------------------------------------------------------------------------------
def _family_media(model: str) -> list:
    if model == "tiny-video-llava":
        from videos import make_frames

        return [make_frames(1, 12), make_frames(2, 9)]
    return [make_image(1, (300, 200)), make_image(2, (180, 260))]


@pytest.mark.parametrize(("model", "options"), [
    ("tiny-llava-next", {"ratio": 0.3, "stages": 1}),
    ("tiny-video-llava", {"ratio": 0.5}),
    ("tiny-qwen2.5-vl", {"ratio": 0.3}),  # window attention: windows as heads, padding slots masked
    ("tiny-internvl", {"ratio": 0.25}),  # 448-px tiles, Qwen3 q/k norm
])
def test_op_form_of_every_family_equals_torch(model: str, options: dict, tmp_path: Path) -> None:
    """Each family's op-form graphs: one Attention and two RotaryEmbedding nodes per decoder layer, every vision
    attention an Attention node, and ONNX Runtime gives the torch backend's tokens and kept indices."""
    from apet.export.artifact import ExportConfig, export_artifact

    out = tmp_path / "op"
    manifest = export_artifact(ExportConfig(model=model, out=out, dtype="fp32", attention="op", **options))
    assert (manifest.attention, manifest.opset) == ("op", 23)
    llm = op_histogram(out / "llm.onnx")
    layers = manifest.model.decoder.num_layers
    assert llm.get("Attention") == layers and llm.get("RotaryEmbedding") == 2 * layers and "Softmax" not in llm
    vision = op_histogram(out / "vision.onnx")
    assert vision.get("Attention", 0) > 0 and "Softmax" not in vision
    media, prompts = _family_media(model), [PROMPTS[2], PROMPTS[0]]
    ort = _generate(Pipeline.load(out, backend="onnxruntime"), media, prompts, max_new_tokens=10)
    ref = _generate(Pipeline.load(out, backend="torch"), media, prompts, max_new_tokens=10)
    assert [r.token_ids for r in ort] == [r.token_ids for r in ref]
    assert [np.asarray(r.keep_index).tolist() for r in ort] == [np.asarray(r.keep_index).tolist() for r in ref]
