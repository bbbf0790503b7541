"""A weight-only quantized linear layer: integer weights + scales, activations in the model dtype.

Weights are stored transposed, ``[K, N]`` (inputs x outputs), because that is the layout of the ONNX
``MatMul(x, DequantizeLinear(W))`` pattern TensorRT turns into a weight-only GEMM; INT4 values are
packed two per byte, low nibble first, in row-major order — byte for byte the raw data of an ONNX
INT4 tensor of shape ``[K, N]``, so export writes them without repacking.

Eager execution dequantizes and multiplies (the reference the exported graph is compared with); a
GPU kernel can be attached per layer (:mod:`apet.quant.kernels`). Under ONNX export the dequantize is
one placeholder node (``apet::WeightDQ``) that :mod:`apet.export.qdq` lowers to standard
``DequantizeLinear``; the placeholder keeps the exporter from constant-folding the weights back to
float (which would materialise a float copy of every matrix).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from apet.contracts.weights import QMAX

PLACEHOLDER_DOMAIN = "apet"
PLACEHOLDER_OP = "WeightDQ"


def quantize_weight(weight: torch.Tensor, fmt: str, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric quantization of an ``[N, K]`` (nn.Linear) weight.

    Returns (values, scale): INT8 values ``[K, N]`` int8 with scale ``[N]``; INT4 values ``[K, N]`` int8
    in [-8, 7] with scale ``[K/G, N]``. Scales are amax / QMAX in float32 then stored in the weight's
    dtype; values are computed against the *stored* scale so dequantization reproduces them exactly.
    """
    w = weight.detach().float().t()  # [K, N]
    qmax = QMAX[fmt]
    if fmt == "int8":
        scale = (w.abs().amax(dim=0) / qmax).clamp(min=1e-8).to(weight.dtype)
        q = torch.round(w / scale.float()).clamp(-qmax - 1, qmax)
    else:
        k, n = w.shape
        blocks = w.reshape(k // group_size, group_size, n)
        scale = (blocks.abs().amax(dim=1) / qmax).clamp(min=1e-8).to(weight.dtype)
        q = torch.round(blocks / scale.float()[:, None]).clamp(-qmax - 1, qmax).reshape(k, n)
    return q.to(torch.int8), scale


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """int8 values ``[K, N]`` in [-8, 7] (N even) -> uint8 ``[K, N/2]``, two per byte, low nibble first.

    Row-major, so a slice of even columns of the packed matrix is the packing of those columns."""
    v = values.to(torch.int16) & 0xF
    return (v[:, 0::2] | (v[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[K, N/2]`` uint8 -> int8 values ``[K, N]`` in [-8, 7]."""
    p = packed.to(torch.int16)
    nibbles = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(p.shape[0], -1)
    return ((nibbles ^ 8) - 8).to(torch.int8)


class _WeightDQ(torch.autograd.Function):
    """Dequantization that exports as one opaque ``apet::WeightDQ`` node (lowered after export)."""

    @staticmethod
    def forward(ctx, qweight: torch.Tensor, scale: torch.Tensor, fmt: str, group: int, k: int, n: int, name: str):
        return _dequantize(qweight, scale, fmt, group, (k, n))

    @staticmethod
    def symbolic(g, qweight, scale, fmt: str, group: int, k: int, n: int, name: str):
        out = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER_OP}", qweight, scale, format_s=fmt, block_size_i=group,
                   k_i=k, n_i=n, module_s=name)
        out.setType(scale.type().with_sizes([k, n]))
        return out


def _dequantize(qweight: torch.Tensor, scale: torch.Tensor, fmt: str, group: int,
                shape: tuple[int, int]) -> torch.Tensor:
    if fmt == "int4":
        values = unpack_int4(qweight).to(scale.dtype)
        return (values.reshape(shape[0] // group, group, shape[1]) * scale[:, None]).reshape(shape)
    return qweight.to(scale.dtype) * scale


class QuantLinear(nn.Module):
    """``y = x @ dequant(W) + b`` with W stored as INT8 (per output channel) or packed INT4 (blocks of
    ``group_size`` inputs). ``name`` is the qualified name of the nn.Linear it replaces (graph node
    names, reports)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, fmt: str,
                 group_size: int | None, name: str = "") -> None:
        """``qweight``: int8 ``[K, N]`` (INT8) or packed uint8 ``[K, N/2]`` (INT4, see :func:`pack_int4`)."""
        super().__init__()
        self.in_features = int(qweight.shape[0])
        self.out_features = int(qweight.shape[1]) * (2 if fmt == "int4" else 1)
        self.format = fmt
        self.group_size = int(group_size or 0)
        self.name = name
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.kernel: Callable[[torch.Tensor], torch.Tensor] | None = None  # optional fused GPU kernel
        self.kernel_name = "dequantize-matmul"

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str, group_size: int | None, name: str = "",
                    input_scale: torch.Tensor | None = None) -> "QuantLinear":
        """Quantize ``linear`` (round to nearest). ``input_scale`` s (AWQ) multiplies the weight's input
        columns before rounding; the caller has divided the layer's input by s already."""
        weight = linear.weight.detach()
        if input_scale is not None:
            weight = weight * input_scale.to(weight.dtype)[None, :]
        values, scale = quantize_weight(weight, fmt, group_size)
        qweight = pack_int4(values) if fmt == "int4" else values.contiguous()
        return cls(qweight, scale.contiguous(), linear.bias, fmt, group_size, name)

    def weight_values(self) -> torch.Tensor:
        """The integer weights ``[K, N]`` as int8."""
        if self.format == "int4":
            return unpack_int4(self.qweight)
        return self.qweight

    def dequantized(self) -> torch.Tensor:
        """The effective float weight ``[K, N]`` (what every backend multiplies with)."""
        return _dequantize(self.qweight, self.scale, self.format, self.group_size,
                           (self.in_features, self.out_features))

    @property
    def weight_bytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            weight = _WeightDQ.apply(self.qweight, self.scale, self.format, self.group_size, self.in_features,
                                     self.out_features, self.name)
            out = torch.matmul(x, weight)
        elif self.kernel is not None:
            out = self.kernel(x)
        else:
            out = torch.matmul(x, self.dequantized().to(x.dtype))
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.format == "int4" else ""
        return f"{self.in_features}, {self.out_features}, format={self.format}{group}, kernel={self.kernel_name}"


def concat_outputs(layers: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear computing the concatenated outputs of ``layers`` (same input, format, group):
    the fused q/k/v and gate/up projections of the GPU path. The parts are re-pointed at column
    slices of the fused buffers (as :mod:`apet.runtime.fusion` does for nn.Linear), so no quantized
    weight is held twice and the parts keep working for the reference path."""
    first = layers[0]
    qweight = torch.cat([layer.qweight for layer in layers], dim=1)
    scale = torch.cat([layer.scale for layer in layers], dim=-1)
    bias = None
    if any(layer.bias is not None for layer in layers):
        bias = torch.cat([layer.bias if layer.bias is not None else
                          torch.zeros(layer.out_features, dtype=first.scale.dtype, device=first.scale.device)
                          for layer in layers])
    fused = QuantLinear(qweight, scale, bias, first.format, first.group_size, "+".join(x.name for x in layers))
    offset, per_byte = 0, 2 if first.format == "int4" else 1
    for layer in layers:
        size = layer.out_features
        layer.qweight = fused.qweight[:, offset // per_byte:(offset + size) // per_byte]
        layer.scale = fused.scale[..., offset:offset + size]
        if layer.bias is not None:
            layer.bias = fused.bias[offset:offset + size]
        offset += size
    return fused
