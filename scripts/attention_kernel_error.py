"""How far each attention form's kernels in ONNX Runtime are from exact arithmetic (run by hand; a CUDA machine
with onnxruntime-gpu for the CUDA execution provider, the CPU provider otherwise).

One-node graphs at LLaVA-1.5-7B shapes, fed the same random inputs: the opset-23 ``Attention`` op (boolean mask)
and the MatMul - additive mask - Softmax - MatMul pattern that ``--attention pattern`` exports, and the
``RotaryEmbedding`` op against the rotate-half Mul/Add pattern. Each output is compared with a float64 NumPy
computation of the same formula, so the two forms' rounding is measured on its own, without a model's
near-ties amplifying it (that is scripts/attention_forms_gpu.py).

  python scripts/attention_kernel_error.py --out kernel_error.json [--dtype fp16]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

OPSET = 23
# (name, batch, q heads, kv heads, query length, key length, head dim, causal)
CASES = [
    ("decoder prefill", 1, 32, 32, 640, 640, 128, True),
    ("decoder decode", 4, 32, 32, 1, 700, 128, True),
    ("vision", 2, 16, 16, 577, 577, 64, False),
    ("grouped prefill (Qwen-7B)", 1, 28, 4, 640, 640, 128, True),
]


def _model(nodes: list, inputs: list, elem: int) -> bytes:
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", elem, None)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=10).SerializeToString()


def _inputs(names: list[str], elem: int) -> list:
    return [helper.make_tensor_value_info(n, elem, None) for n in names]


def attention_op_model(scale: float, elem: int) -> bytes:
    node = helper.make_node("Attention", ["q", "k", "v", "mask"], ["y"], scale=scale)
    return _model([node], _inputs(["q", "k", "v"], elem) + _inputs(["mask"], TensorProto.BOOL), elem)


def attention_pattern_model(scale: float, groups: int, elem: int) -> bytes:
    """The exported pattern: (q * scale) @ k^T + bias, Softmax, @ v; kv heads repeated for grouped queries."""
    nodes = [helper.make_node("Constant", [], ["s"], value=helper.make_tensor("s", elem, [], [scale]))]
    k, v = "k", "v"
    if groups > 1:
        nodes.append(helper.make_node("Constant", [], ["ax"], value=helper.make_tensor("ax", TensorProto.INT64, [1],
                                                                                         [2])))
        for name in ("k", "v"):  # [B,Hkv,T,D] -> [B,Hkv,groups,T,D] -> [B,Hq,T,D]: head h reads kv head h // groups
            nodes += [helper.make_node("Unsqueeze", [name, "ax"], [f"{name}5"]),
                      helper.make_node("Tile", [f"{name}5", "rep5"], [f"{name}_tiled"]),
                      helper.make_node("Reshape", [f"{name}_tiled", "shape_" + name], [f"{name}r"])]
        k, v = "kr", "vr"
    nodes += [helper.make_node("Mul", ["q", "s"], ["qs"]),
              helper.make_node("Transpose", [k], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qs", "kt"], ["scores"]),
              helper.make_node("Add", ["scores", "bias"], ["biased"]),
              helper.make_node("Softmax", ["biased"], ["p"], axis=-1),
              helper.make_node("MatMul", ["p", v], ["y"])]
    inputs = _inputs(["q", "k", "v", "bias"], elem)
    if groups > 1:
        inputs += _inputs(["rep5", "shape_k", "shape_v"], TensorProto.INT64)
    return _model(nodes, inputs, elem)


def rotary_op_model(elem: int) -> bytes:
    node = helper.make_node("RotaryEmbedding", ["x", "cos", "sin"], ["y"], interleaved=0)
    return _model([node], _inputs(["x", "cos", "sin"], elem), elem)


def rotary_pattern_model(half: int, elem: int) -> bytes:
    """x * cos + rotate_half(x) * sin with full-width tables, as ``apply_rotary`` exports it."""
    const = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    nodes = [const("lo", [0]), const("mid", [half]), const("hi", [2 * half]), const("axis", [3]),
             helper.make_node("Slice", ["x", "lo", "mid", "axis"], ["x1"]),
             helper.make_node("Slice", ["x", "mid", "hi", "axis"], ["x2"]),
             helper.make_node("Neg", ["x2"], ["nx2"]),
             helper.make_node("Concat", ["nx2", "x1"], ["rot"], axis=-1),
             helper.make_node("Mul", ["x", "cos"], ["a"]),
             helper.make_node("Mul", ["rot", "sin"], ["b"]),
             helper.make_node("Add", ["a", "b"], ["y"])]
    return _model(nodes, _inputs(["x", "cos", "sin"], elem), elem)


def reference_attention(q, k, v, allowed, scale):
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.where(allowed, (q @ k.transpose(0, 1, 3, 2)) * scale, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ v


def _errors(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
    diff = got.astype(np.float64) - want
    return {"max_abs": float(np.abs(diff).max()), "rms": float(np.sqrt((diff**2).mean())),
            "rms_of_reference": float(np.sqrt((want**2).mean()))}


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--input-std", type=float, default=1.5, help="std of q and k (score std ~ std^2)")
    parser.add_argument("--small", action="store_true", help="shrink every case (a quick CPU check)")
    args = parser.parse_args()
    np_dtype, elem = (np.float16, TensorProto.FLOAT16) if args.dtype == "fp16" else (np.float32, TensorProto.FLOAT)
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    session = lambda model: ort.InferenceSession(model, providers=providers)  # noqa: E731
    rng = np.random.default_rng(0)
    report: dict = {"dtype": args.dtype, "providers": providers, "ort": ort.__version__, "attention": {}}
    for name, b, hq, hkv, s, t, d, causal in CASES:
        if args.small:
            b, hq, hkv, s, t = 1, hq // 4 or 1, max(hkv // 4, 1), min(s, 48), min(t, 48)
        scale = d**-0.5
        q = (rng.standard_normal((b, hq, s, d)) * args.input_std).astype(np_dtype)
        k = (rng.standard_normal((b, hkv, t, d)) * args.input_std).astype(np_dtype)
        v = rng.standard_normal((b, hkv, t, d)).astype(np_dtype)
        keys, queries = np.arange(t)[None], (np.arange(s) + t - s)[:, None]
        allowed = np.broadcast_to((keys <= queries) if causal else np.ones((s, t), bool), (b, 1, s, t)).copy()
        bias = np.where(allowed, 0, np.finfo(np_dtype).min).astype(np_dtype)
        want = reference_attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), allowed, scale)
        op = session(attention_op_model(scale, elem)).run(None, {"q": q, "k": k, "v": v, "mask": allowed})[0]
        feeds = {"q": q, "k": k, "v": v, "bias": bias}
        if hq != hkv:
            feeds |= {"rep5": np.array([1, 1, hq // hkv, 1, 1]), "shape_k": np.array([b, hq, t, d]),
                      "shape_v": np.array([b, hq, t, d])}
        pattern = session(attention_pattern_model(scale, hq // hkv, elem)).run(None, feeds)[0]
        row = report["attention"][name] = {"shape": [b, hq, hkv, s, t, d], "op": _errors(op, want),
                                           "pattern": _errors(pattern, want)}
        print(f"{name:28s} op max {row['op']['max_abs']:.2e} rms {row['op']['rms']:.2e} | pattern max "
              f"{row['pattern']['max_abs']:.2e} rms {row['pattern']['rms']:.2e}")
    b, h, s, d = (1, 32, 640, 128) if not args.small else (1, 4, 48, 128)
    positions = np.arange(s, dtype=np.float64)
    inv_freq = 1.0 / (10000 ** (np.arange(0, d, 2, dtype=np.float64) / d))
    angles = np.broadcast_to(positions[:, None] * inv_freq[None], (b, s, d // 2))
    x = rng.standard_normal((b, h, s, d)).astype(np_dtype)
    cos, sin = np.cos(angles).astype(np_dtype), np.sin(angles).astype(np_dtype)
    xd, c, sn = x.astype(np.float64), cos.astype(np.float64)[:, None], sin.astype(np.float64)[:, None]
    x1, x2 = xd[..., : d // 2], xd[..., d // 2:]
    want = np.concatenate([x1 * c - x2 * sn, x2 * c + x1 * sn], axis=-1)
    op = session(rotary_op_model(elem)).run(None, {"x": x, "cos": cos, "sin": sin})[0]
    full = lambda table: np.concatenate([table, table], axis=-1)[:, None]  # noqa: E731
    pattern = session(rotary_pattern_model(d // 2, elem)).run(None, {"x": x, "cos": full(cos), "sin": full(sin)})[0]
    report["rotary"] = {"shape": [b, h, s, d], "op": _errors(op, want), "pattern": _errors(pattern, want)}
    print(f"{'rotary':28s} op max {report['rotary']['op']['max_abs']:.2e} | pattern max "
          f"{report['rotary']['pattern']['max_abs']:.2e}")
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
