"""Weight-only GEMM kernels PyTorch itself offers, attached to :class:`QuantLinear` layers for the GPU
path (apet-bench, the static torch backend); everything else dequantizes then multiplies.

- INT8: ``torch._weight_int8pack_mm`` (int8 weights [N, K], per-channel scales; CPU and CUDA builds).
- INT4: ``torch._weight_int4pack_mm`` (tinygemm, CUDA sm80+, **bfloat16 activations only**: the fp16
  activations are cast to bf16 and back around it) with our symmetric values as tinygemm's unsigned
  ones, u = q + 8, zero point 0: w = (u - 8) * scale. On CPU ``_weight_int4pack_mm_for_cpu``.

Each kernel is probed on its layer against dequantize-then-matmul before it is kept; a kernel that
is missing on this build or disagrees falls back, and the name of what runs is reported (so a
benchmark says which path it measured).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from apet.quant.qlinear import QuantLinear

log = logging.getLogger(__name__)
FALLBACK = "dequantize-matmul"


def _int8_kernel(layer: QuantLinear) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    weight = layer.qweight.t().contiguous()  # [N, K]
    scale = layer.scale

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return torch._weight_int8pack_mm(flat, weight, scale.to(x.dtype)).reshape(*x.shape[:-1], -1)

    return "torch._weight_int8pack_mm", run


def _int4_kernel(layer: QuantLinear) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    unsigned = (layer.weight_values().t().to(torch.int32) + 8)  # [N, K] in [0, 15]
    cuda = unsigned.is_cuda
    compute = torch.bfloat16 if cuda else layer.scale.dtype
    zeros = torch.zeros_like(layer.scale)
    scales_and_zeros = torch.stack([layer.scale, zeros], dim=-1).to(compute).contiguous()  # [K/G, N, 2]
    if cuda:
        packed = torch._convert_weight_to_int4pack((unsigned[:, ::2] << 4 | unsigned[:, 1::2]).to(torch.uint8), 8)
        mm, name = torch._weight_int4pack_mm, "torch._weight_int4pack_mm (tinygemm, bf16 activations)"
    else:
        packed = torch._convert_weight_to_int4pack_for_cpu(unsigned, 8)
        mm, name = torch._weight_int4pack_mm_for_cpu, "torch._weight_int4pack_mm_for_cpu"
    group = layer.group_size

    def run(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(compute)
        return mm(flat, packed, group, scales_and_zeros).to(x.dtype).reshape(*x.shape[:-1], -1)

    return name, run


def attach_kernel(layer: QuantLinear, dtype: torch.dtype, tolerance: float = 2e-2, release: bool = False) -> str:
    """Try the format's kernel on ``layer``; keep it if it matches dequantize-matmul on a probe input.
    ``release`` frees the layer's own copy of the weights once the kernel holds its layout (GPU memory
    then counts each weight once; the layer can no longer be exported or dequantized)."""
    try:
        name, run = (_int4_kernel if layer.format == "int4" else _int8_kernel)(layer)
        probe = torch.randn(3, layer.in_features, device=layer.qweight.device, dtype=dtype)
        want = torch.matmul(probe, layer.dequantized().to(dtype)).float()
        got = run(probe).float()
        error = float((got - want).abs().max() / want.abs().max().clamp(min=1e-6))
        if not torch.isfinite(got).all() or error > tolerance:
            raise RuntimeError(f"probe error {error:.3g} above {tolerance}")
    except Exception as exc:  # a build without the op, an unsupported dtype or GPU: fall back
        log.info("%s: %s kernel unavailable (%s); dequantize-matmul", layer.name, layer.format,
                 str(exc).splitlines()[0][:120])
        layer.kernel, layer.kernel_name = None, FALLBACK
        return FALLBACK
    layer.kernel, layer.kernel_name = run, name
    if release:
        layer.qweight = layer.qweight.new_empty(0)
    return name


def attach_static(layers: list[nn.Module], fused: list, head: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Kernels for what the static-cache decoder calls (fused q/k/v and gate/up, o, down, LM head), the
    unfused parts released: on the GPU path each quantized weight is held once, in its kernel's layout."""
    used: dict[str, int] = {}
    for layer, fuse in zip(layers, fused):
        for module in (fuse.qkv_call, fuse.gate_up_call, layer.self_attn.o_proj, layer.mlp.down_proj):
            if isinstance(module, QuantLinear):
                name = attach_kernel(module, dtype, release=True)
                used[name] = used.get(name, 0) + 1
        groups = ((fuse.qkv_call, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                  (fuse.gate_up_call, (layer.mlp.gate_proj, layer.mlp.up_proj)))
        for fused_call, parts in groups:
            if isinstance(fused_call, QuantLinear) and fused_call.kernel is not None:
                for part in parts:  # views of the fused weights, unused on this path
                    part.qweight = part.qweight.new_empty(0)
    if isinstance(head, QuantLinear):
        name = attach_kernel(head, dtype, release=True)
        used[name] = used.get(name, 0) + 1
    return used


def attach_kernels(model: nn.Module, dtype: torch.dtype) -> dict[str, int]:
    """Attach kernels to every QuantLinear of ``model``; returns {kernel name: layers using it}."""
    used: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear):
            name = attach_kernel(module, dtype)
            used[name] = used.get(name, 0) + 1
    return used
