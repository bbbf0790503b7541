"""What ApET costs an engine, per family: ONNX nodes and TensorRT layers after parsing (TensorRT-RTX's parser on
the CPU) of the apet_stage1 / apet_stage2 scopes of every family's tiny artifact. The bounds are the counts of
docs/benchmarks.md ("ApET's cost inside the engines"): a change that adds ApET layers fails here; one that
removes some lowers the bound. ApET's graph does not depend on the model's size, so these hold at 7B shapes.

The artifacts are the session fixtures other tests export anyway (fp16 where a test builds engines from it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from apet.contracts.onnx_graph import nodes_by_stage
from apet.engines.trt import parse_layer_counts

# family -> graph -> scope -> (ONNX nodes, parsed TensorRT layers) at most
BOUNDS = {
    "llava": {"vision": {"apet_stage1": (162, 250)}, "llm": {"apet_stage2": (192, 326)}},
    "llava-next": {"vision": {"apet_stage1": (160, 248)}, "llm": {"apet_stage2": (189, 321)}},
    "video-llava": {"vision": {"apet_stage1": (159, 244)}},
    "qwen2.5-vl": {"vision": {"apet_stage1": (180, 326)}},
    "qwen3-vl": {"vision": {"apet_stage1": (184, 333)}},  # with the DeepStack levels' rows: +4 nodes, +7 layers
    "internvl": {"vision": {"apet_stage1": (160, 247)}},
}
# before the rework (issue 28), same artifacts: what "at least 2x smaller" is measured against
BEFORE = {
    "llava": {"apet_stage1": (404, 2025), "apet_stage2": (456, 2196)},
    "llava-next": {"apet_stage1": (402, 2023), "apet_stage2": (453, 2193)},
    "video-llava": {"apet_stage1": (383, 2011)},
    "qwen2.5-vl": {"apet_stage1": (422, 2161)},
    "qwen3-vl": {"apet_stage1": (464, 2336)},  # main's graph before the merge with issue 28
    "internvl": {"apet_stage1": (402, 2022)},
}


@pytest.fixture(scope="module")
def artifacts(artifact_factory, next_artifact_factory, video_artifact_factory, qwen_artifact_factory,
              qwen3_artifact_factory, internvl_artifact_factory) -> dict:
    return {"llava": artifact_factory(ratio=0.11, stages=2, dtype="fp16"),
            "llava-next": next_artifact_factory(tokens="32,16", stages=2),
            "video-llava": video_artifact_factory(ratio=0.125),
            "qwen2.5-vl": qwen_artifact_factory(ratio=0.3),
            "qwen3-vl": qwen3_artifact_factory(ratio=0.3),  # DeepStack levels merged with stage 1's assignment
            "internvl": internvl_artifact_factory(tokens="64", family_options={"apet-at": "after-projector"})}


def _counts(rtx_api, artifact: Path, graph: str) -> tuple[dict[str, int], dict[str, int]]:
    path = artifact / f"{graph}.onnx"
    return nodes_by_stage(path), parse_layer_counts(rtx_api, path)


@pytest.mark.trt
@pytest.mark.parametrize("family", list(BOUNDS))
def test_apet_scopes_stay_within_their_node_and_layer_counts(artifacts: dict, rtx_api, family: str) -> None:
    for graph, bounds in BOUNDS[family].items():
        nodes, layers = _counts(rtx_api, artifacts[family], graph)
        for scope, (max_nodes, max_layers) in bounds.items():
            got = (nodes.get(scope, 0), layers.get(scope, 0))
            assert 0 < got[0] <= max_nodes and 0 < got[1] <= max_layers, (
                f"{family} {graph}.onnx {scope}: {got[0]} nodes, {got[1]} parsed layers (bound {max_nodes}, "
                f"{max_layers}); all scopes: nodes {nodes}, layers {layers}")
            before_nodes, before_layers = BEFORE[family][scope]
            assert 2 * got[0] <= before_nodes and 2 * got[1] <= before_layers


@pytest.mark.trt
def test_every_parsed_layer_is_attributed_and_keep_all_costs_nothing(qwen_artifact_factory, rtx_api) -> None:
    """Helper layers the parser adds (shape arithmetic, casts) count with their node; ratio 1.0 keeps every token,
    so its ApET scope is only the table lookup and the pass-through."""
    from apet.engines.trt import parse_onnx

    path = qwen_artifact_factory(ratio=1.0) / "vision.onnx"
    _builder, network, _parser, _logger = parse_onnx(rtx_api, path)
    layers = parse_layer_counts(rtx_api, path)
    assert sum(layers.values()) == network.num_layers
    assert set(layers) <= set(nodes_by_stage(path)) | {"other"}
    assert layers["apet_stage1"] <= 27 and nodes_by_stage(path)["apet_stage1"] <= 7
