"""FLOP and byte counts per stage, floors against measured ceilings, and Jetson projections.

Counts are for one forward of each stage at batch B (multiply-adds count as 2 FLOPs). Bytes are
the fewest a stage must move through device memory: its weights read once, its input and output
activations once, and the KV cache it reads or writes. The floor of a stage is
max(FLOPs / matmul rate, bytes / bandwidth) on a device.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from apet.contracts.specs import VisionShape

# Published peaks (dense fp16 tensor-core rate, memory bandwidth). Jetson rates are derived from the
# tensor-core count and GPU clock in NVIDIA's Jetson Orin technical brief / data sheets:
#   AGX Orin 64GB: 64 tensor cores x 256 fp16 FMA/clk x 2 FLOP x 1.3 GHz = 42.6 TFLOP/s; LPDDR5 204.8 GB/s.
#   Orin Nano 8GB (JetPack 6.1+ "Super" mode, 1020 MHz GPU): 32 x 256 x 2 x 1.02 GHz = 16.7 TFLOP/s; 102 GB/s.
DEVICES = {
    "jetson-agx-orin-64gb": {"tflops_fp16": 42.6, "bandwidth_gbs": 204.8, "memory_gb": 64},
    "jetson-orin-nano-8gb": {"tflops_fp16": 16.7, "bandwidth_gbs": 102.0, "memory_gb": 8},
}
# ASSUMED, not measured by apet: what one unfused TensorRT layer costs at batch 1 on each device (a kernel launch
# plus a tiny kernel's shortest run). Anchor: tiny TensorRT kernels (softmax, reformat copies) ran 4.4-8.6 us each
# (averages 5.5-5.9 us) in nvprof on a Jetson AGX Xavier (NVIDIA developer forum, "Deep Learning Accelerator
# problems", forums.developer.nvidia.com/t/77379); TensorRT inference on Orin is bound by kernel launches on its
# CPU (forums.developer.nvidia.com/t/266121, no figure given). AGX Orin: 5 us; Orin Nano: 6.5 us, the same Cortex-
# A78AE cores at 1.7 GHz instead of 2.2 GHz. Replace them with a measured figure (trtexec --dumpProfile on the
# device, or --layer-us) where one exists.
LAYER_US = {"jetson-agx-orin-64gb": 5.0, "jetson-orin-nano-8gb": 6.5}


@dataclass(frozen=True)
class LlmShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)

    def floor_ms(self, tflops: float, bandwidth_gbs: float) -> float:
        return max(self.flops / (tflops * 1e12), self.bytes / (bandwidth_gbs * 1e9)) * 1e3

    def to_json(self) -> dict[str, float]:
        return asdict(self)


def vision_cost(v: VisionShape, batch: int = 1, dtype_bytes: int = 2) -> Cost:
    n, d = v.tokens, v.dim
    per_layer_macs = 4 * n * d * d + 2 * n * n * d + v.mlp_matrices * n * d * v.mlp_dim
    layer_macs = v.layers * per_layer_macs
    if v.window is not None:  # windowed layers attend over one window, not all n tokens
        layer_macs -= (v.layers - v.full_layers) * 2 * n * (n - v.window) * d
    pixels = v.channels * v.temporal * v.patch * v.patch
    embed_macs = (n - 1) * pixels * d
    weights = v.layers * (4 * d * d + v.mlp_matrices * d * v.mlp_dim) + pixels * d
    activations = batch * (n * pixels + 2 * n * d)  # pixels in, features out
    return Cost(2.0 * batch * (layer_macs + embed_macs), dtype_bytes * (weights + activations))


def apet_cost(tokens: int, dim: int, keep: int, basis: int = 10, batch: int = 1, dtype_bytes: int = 2) -> Cost:
    """FPS (k matvecs), Gram + right-hand side, k x k solve, reconstruction, error, merge similarity + sums."""
    n, d, k, sel = tokens, dim, basis, keep - basis
    macs = k * n * d + k * k * d + k * n * d + k * k * n + k * n * d + n * d + sel * n * d + sel * n * d
    return Cost(2.0 * batch * macs, dtype_bytes * batch * (n * d + keep * d))


def projector_cost(tokens: int, vision_dim: int, hidden: int, batch: int = 1, dtype_bytes: int = 2) -> Cost:
    weights = vision_dim * hidden + hidden * hidden
    return Cost(2.0 * batch * tokens * weights, dtype_bytes * (weights + batch * tokens * (vision_dim + hidden)))


def _layer_weights(m: LlmShape) -> int:
    attn = m.hidden * m.heads * m.head_dim * 2 + m.hidden * m.kv_heads * m.head_dim * 2
    return attn + 3 * m.hidden * m.intermediate


def _layer_macs(m: LlmShape, query: int, context: int) -> float:
    attn_proj = query * (m.hidden * m.heads * m.head_dim * 2 + m.hidden * m.kv_heads * m.head_dim * 2)
    attention = 2 * query * context * m.heads * m.head_dim  # QK^T and PV
    return attn_proj + attention + 3 * query * m.hidden * m.intermediate


def kv_bytes(m: LlmShape, tokens_per_layer: list[int], batch: int = 1, dtype_bytes: int = 2) -> int:
    return int(sum(2 * batch * t * m.kv_heads * m.head_dim * dtype_bytes for t in tokens_per_layer))


def prefill_cost(m: LlmShape, tokens_per_layer: list[int], batch: int = 1, dtype_bytes: int = 2,
                 causal: bool = True, weight_bytes: float | None = None) -> Cost:
    """One prefill where layer i sees tokens_per_layer[i] tokens (stage 2 shortens the later ones).
    ``weight_bytes``: bytes per LLM weight when quantized (INT8 1, INT4 0.5 + scales), else dtype_bytes."""
    macs = 0.0
    for t in tokens_per_layer:
        macs += _layer_macs(m, t, (t + 1) / 2 if causal else t)
    macs += m.hidden * m.vocab  # logits of the last position
    weights = m.layers * _layer_weights(m) + m.hidden * m.vocab
    activations = batch * (tokens_per_layer[0] + 1) * m.hidden
    per_weight = dtype_bytes if weight_bytes is None else weight_bytes
    return Cost(2.0 * batch * macs, per_weight * weights + dtype_bytes * activations
                + kv_bytes(m, tokens_per_layer, batch, dtype_bytes))


def decode_cost(m: LlmShape, context_per_layer: list[int], batch: int = 1, dtype_bytes: int = 2,
                weight_bytes: float | None = None) -> Cost:
    """One decode step attending over context_per_layer[i] cached tokens in layer i (weights as prefill_cost)."""
    macs = sum(_layer_macs(m, 1, c + 1) for c in context_per_layer) + m.hidden * m.vocab
    weights = m.layers * _layer_weights(m) + m.hidden * m.vocab
    per_weight = dtype_bytes if weight_bytes is None else weight_bytes
    return Cost(2.0 * batch * macs, per_weight * weights + kv_bytes(m, [c + 1 for c in context_per_layer], batch,
                                                                    dtype_bytes))


def llm_weight_bytes(m: LlmShape, per_weight: float) -> int:
    """The LLM graph's projection + LM-head weights at ``per_weight`` bytes each (the .data size, norms aside)."""
    return int((m.layers * _layer_weights(m) + m.hidden * m.vocab) * per_weight)


def project(costs: dict[str, Cost]) -> dict[str, dict[str, float]]:
    """Floors of each stage on the Jetson devices above."""
    return {name: {stage: round(c.floor_ms(spec["tflops_fp16"], spec["bandwidth_gbs"]), 3)
                   for stage, c in costs.items()} for name, spec in DEVICES.items()}


def project_apet(layers: dict[str, int], floors: dict[str, dict[str, float]],
                 layer_us: dict[str, float] | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """ApET's projected cost per Jetson and stage: ``layers`` (TensorRT layers per ApET stage: engine layers where
    a device built them, parsed layers as an upper bound otherwise) x the per-layer cost (:data:`LAYER_US`, an
    assumption), plus the stage's FLOP/byte floor from ``floors`` (:func:`project`)."""
    per_layer = {**LAYER_US, **(layer_us or {})}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for device in DEVICES:
        stages = {}
        for stage, count in layers.items():
            launch = count * per_layer[device] / 1e3
            floor = floors.get(device, {}).get(stage, 0.0)
            stages[stage] = {"layers": count, "layer_us": per_layer[device], "launch_ms": round(launch, 3),
                             "floor_ms": floor, "ms": round(launch + floor, 3)}
        out[device] = stages
    return out
