"""compress() as an ONNX graph: plain ops, ORT parity, TensorRT-RTX ahead-of-time build (docs/architecture.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy_reference as ref
import onnxruntime as ort
import pytest
import torch

from apet.compression import CompressionModule
from apet.contracts.compression import CompressionConfig
from apet.contracts.onnx_graph import check_onnx, op_histogram
from apet.export.onnx_utils import export_onnx

N, D, KEEP, BASIS = 144, 64, 32, 10
FORBIDDEN_OPS = {"Loop", "If", "Scan", "SequenceConstruct"}


def _export(tmp_path: Path, dtype: torch.dtype, config: CompressionConfig, opset: int = 17) -> Path:
    path = tmp_path / f"apet_{str(dtype).split('.')[-1]}_{config.method}_{opset}.onnx"
    export_onnx(
        CompressionModule(config), (torch.randn(2, N, D, dtype=dtype),), path,
        input_names=["x"], output_names=["tokens", "index"],
        dynamic_axes={"x": {0: "batch"}, "tokens": {0: "batch"}, "index": {0: "batch"}}, opset=opset,
    )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("apet_onnx")
    config = CompressionConfig(keep=KEEP, basis=BASIS)
    return {"fp32": _export(tmp, torch.float32, config), "fp16": _export(tmp, torch.float16, config)}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_graph_is_plain_and_checks(exported: dict[str, Path], precision: str) -> None:
    path = exported[precision]
    check_onnx(path)
    ops = op_histogram(path)
    assert not FORBIDDEN_OPS & set(ops), ops
    assert all("::" not in op for op in ops), f"custom-domain ops: {ops}"
    assert ops.get("TopK", 0) >= 2 and ops.get("ArgMax", 0) >= BASIS - 1
    if precision == "fp16":
        assert ops.get("Cast", 0) >= 2  # the ApET math is lifted to float32 and cast back


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_pytorch_and_numpy(exported: dict[str, Path], batch: int) -> None:
    x = torch.randn(batch, N, D, generator=torch.Generator().manual_seed(batch)) * 2
    session = ort.InferenceSession(str(exported["fp32"]), providers=["CPUExecutionProvider"])
    tokens, index = session.run(None, {"x": x.numpy()})
    want = CompressionModule(CompressionConfig(keep=KEEP, basis=BASIS))(x)
    np.testing.assert_array_equal(index, want[1].numpy())
    np.testing.assert_allclose(tokens, want[0].numpy(), rtol=1e-5, atol=1e-5)
    ref_tokens, ref_index = ref.compress(x.double().numpy(), KEEP, BASIS)
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_allclose(tokens, ref_tokens, rtol=1e-4, atol=1e-4)


def test_fp16_graph_output_dtype_and_agreement(exported: dict[str, Path]) -> None:
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(4)).half()
    session = ort.InferenceSession(str(exported["fp16"]), providers=["CPUExecutionProvider"])
    tokens, index = session.run(None, {"x": x.numpy()})
    assert tokens.dtype == np.float16 and index.dtype == np.int64
    want = CompressionModule(CompressionConfig(keep=KEEP, basis=BASIS))(x)
    np.testing.assert_array_equal(index, want[1].numpy())
    np.testing.assert_allclose(tokens.astype(np.float32), want[0].float().numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("method", ["dpc", "random"])
def test_other_basis_methods_export_and_match(tmp_path: Path, method: str) -> None:
    config = CompressionConfig(keep=KEEP, basis=6, method=method, seed=3)
    path = _export(tmp_path, torch.float32, config, opset=18)
    check_onnx(path)
    x = torch.randn(2, N, D, generator=torch.Generator().manual_seed(8))
    tokens, index = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})
    want = CompressionModule(config)(x)
    np.testing.assert_array_equal(index, want[1].numpy())
    np.testing.assert_allclose(tokens, want[0].numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.trt
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_tensorrt_rtx_builds_ahead_of_time(exported: dict[str, Path], precision: str, rtx_api) -> None:
    from apet.engines.trt import BuildOptions, Profile, build_engine

    profile = Profile("batch", {"x": ((1, N, D), (1, N, D), (4, N, D))})
    built = build_engine(rtx_api, exported[precision], [profile], BuildOptions(compute_capabilities=("sm86",)))
    assert len(built.plan) > 1000 and built.num_layers > 100
    dtype = "float" if precision == "fp32" else "half"
    assert built.inputs == [{"name": "x", "shape": [-1, N, D], "dtype": dtype}]
    assert [o["name"] for o in built.outputs] == ["tokens", "index"]
    assert built.outputs[1]["dtype"] == "int64"
