"""How exactly ONNX Runtime computes the fused norms of apet's optional rewrites in float16, against a float64 oracle
and against the unfused nodes they replace, with and without the CUDA provider's strict SkipLayerNorm mode.

- ``rms``: residual sum + RMSNorm as ``SkipSimplifiedLayerNormalization`` (``fuse-norms``; LLaVA-1.5-7B's decoder:
  hidden 4,096, 136 prompt rows) against the exported form (float16 ``Add``, the norm in float32 between two
  ``Cast``s, as transformers writes LlamaRMSNorm);
- ``ln``: residual sum + bias + LayerNorm as ``SkipLayerNormalization`` (``vision-skip-norms``; CLIP-L: hidden 1,024,
  577 rows) against the exported form (two float16 ``Add``s, ``LayerNormalization``).

Inputs are float16 draws at several scales (and, for ``ln``, a mean offset: a large mean over a small spread is
where a one-pass variance E[x²] - E[x]² loses digits); the oracle takes the same float16 values in float64.
Per case: max |error| over max |oracle| for the unfused nodes as ONNX Runtime optimizes them (what the session of
the exported graph runs), the same nodes with basic optimizations only (each node as written), and the fused node.

    python scripts/ort_norm_precision.py --out ort_norm_precision.json [--device cpu]

Issue 28: which fused norms may be on by default (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from apet.atomic import write_atomic  # noqa: E402
from apet.runtime.backends.ort_options import STRICT_NORM_OPTION  # noqa: E402

log = logging.getLogger("ort_norm_precision")
EPS = 1e-5
HALF = TensorProto.FLOAT16
RMS_CASES = {"std 0.003": (0.0, 0.003), "std 0.03": (0.0, 0.03), "std 1": (0.0, 1.0), "std 30": (0.0, 30.0)}
LN_CASES = {"mean 0, std 1": (0.0, 1.0), "mean 10, std 0.1": (10.0, 0.1), "mean 100, std 1": (100.0, 1.0),
            "mean 30, std 0.03": (30.0, 0.03)}


def _model(nodes: list, inputs: dict[str, tuple[int, ...]], initializers: dict[str, np.ndarray]) -> bytes:
    graph = helper.make_graph(
        nodes, "norm", [helper.make_tensor_value_info(name, HALF, list(shape)) for name, shape in inputs.items()],
        [helper.make_tensor_value_info("y", HALF, None)],
        [numpy_helper.from_array(value, name) for name, value in initializers.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model.SerializeToString()


def rms_models(hidden: int, gamma: np.ndarray) -> dict[str, bytes]:
    """The exported RMSNorm after a residual sum, and the fused node."""
    inputs = {"x": ("rows", hidden), "skip": ("rows", hidden)}
    weights = {"gamma": gamma, "eps": np.array(EPS, np.float32), "two": np.array(2.0, np.float32)}
    exported = [
        helper.make_node("Add", ["x", "skip"], ["sum"]),
        helper.make_node("Cast", ["sum"], ["sum32"], to=TensorProto.FLOAT),
        helper.make_node("Pow", ["sum32", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq"], ["ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Reciprocal", ["rms"], ["inv"]),
        helper.make_node("Mul", ["sum32", "inv"], ["normed32"]),
        helper.make_node("Cast", ["normed32"], ["normed"], to=HALF),
        helper.make_node("Mul", ["gamma", "normed"], ["y"])]
    fused = [helper.make_node("SkipSimplifiedLayerNormalization", ["x", "skip", "gamma"], ["y"],
                              domain="com.microsoft", epsilon=EPS)]
    return {"unfused": _model(exported, inputs, weights), "fused": _model(fused, inputs, {"gamma": gamma})}


def ln_models(hidden: int, gamma: np.ndarray, beta: np.ndarray, bias: np.ndarray) -> dict[str, bytes]:
    """CLIP's residual sum of a biased projection and the LayerNorm after it, and the fused node."""
    inputs = {"x": ("rows", hidden), "skip": ("rows", hidden)}
    weights = {"gamma": gamma, "beta": beta, "bias": bias}
    exported = [helper.make_node("Add", ["x", "bias"], ["biased"]),
                helper.make_node("Add", ["skip", "biased"], ["sum"]),
                helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["y"], axis=-1, epsilon=EPS)]
    fused = [helper.make_node("SkipLayerNormalization", ["x", "skip", "gamma", "beta", "bias"], ["y"],
                              domain="com.microsoft", epsilon=EPS)]
    return {"unfused": _model(exported, inputs, weights), "fused": _model(fused, inputs, weights)}


def rms_oracle(x: np.ndarray, skip: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    total = x.astype(np.float64) + skip
    return total / np.sqrt(np.mean(total * total, axis=-1, keepdims=True) + EPS) * gamma


def ln_oracle(x: np.ndarray, skip: np.ndarray, gamma: np.ndarray, beta: np.ndarray, bias: np.ndarray) -> np.ndarray:
    total = x.astype(np.float64) + skip + bias
    centred = total - total.mean(axis=-1, keepdims=True)
    return centred / np.sqrt(np.mean(centred * centred, axis=-1, keepdims=True) + EPS) * gamma + beta


def _half(rng: np.random.Generator, shape: tuple[int, ...], mean: float, std: float) -> np.ndarray:
    return (mean + std * rng.standard_normal(shape)).astype(np.float16)


def measure(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    results: dict[str, Any] = {}
    for strict in (False, True):
        provider: Any = "CPUExecutionProvider"
        if device == "cuda":
            provider = ("CUDAExecutionProvider", {STRICT_NORM_OPTION: "1" if strict else "0"})
        mode = "strict" if strict else "default"
        for kind, cases, hidden, rows in (("rms", RMS_CASES, 4096, 136), ("ln", LN_CASES, 1024, 577)):
            gamma = (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float16)
            beta, bias = (0.1 * rng.standard_normal((2, hidden))).astype(np.float16)
            models = rms_models(hidden, gamma) if kind == "rms" else ln_models(hidden, gamma, beta, bias)
            basic = ort.SessionOptions()
            basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
            sessions = {form: ort.InferenceSession(data, providers=[provider]) for form, data in models.items()}
            sessions["unfused_basic"] = ort.InferenceSession(models["unfused"], basic, providers=[provider])
            for case, (mean, std) in cases.items():
                x, skip = _half(rng, (rows, hidden), mean / 2, std), _half(rng, (rows, hidden), mean / 2, std)
                if kind == "rms":  # a few outlier channels, as LLaMA's residual stream has
                    x[:, :4] = (x[:, :4].astype(np.float32) * 20).astype(np.float16)
                    oracle = rms_oracle(x, skip, gamma)
                else:
                    oracle = ln_oracle(x, skip, gamma, beta, bias)
                scale = float(np.abs(oracle).max())
                entry = {form: float(np.abs(session.run(None, {"x": x, "skip": skip})[0].astype(np.float64)
                                            - oracle).max() / scale)
                         for form, session in sessions.items()}
                results[f"{kind} {mode}: {case}"] = {"max_rel_error": entry, "oracle_max_abs": scale}
                log.info("%-36s unfused %.2e  basic %.2e  fused %.2e", f"{kind} {mode}: {case}", entry["unfused"],
                         entry["unfused_basic"], entry["fused"])
    return {"onnxruntime": ort.__version__, "device": device, "cases": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    write_atomic(args.out, json.dumps(measure(args.device), indent=1).encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
