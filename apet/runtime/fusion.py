"""Horizontal fusion of a Llama-style layer's projections for the GPU fast path.

q/k/v become one matmul and gate/up another: at decode (batch 1) each projection is a
memory-bound GEMV, so fewer, larger ones run closer to peak bandwidth and launch fewer
kernels. The fused weight is built once and the original ``nn.Linear`` weights are
re-pointed at slices of it, so no weight memory is duplicated and the HF modules (used by
the reference path) keep working.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from apet.kernels.gemv import linear


def _fuse(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    sizes = [lin.out_features for lin in linears]
    weight = torch.cat([lin.weight.data for lin in linears], dim=0)
    bias = None
    if any(lin.bias is not None for lin in linears):
        bias = torch.cat([lin.bias.data if lin.bias is not None else
                          torch.zeros(lin.out_features, dtype=weight.dtype, device=weight.device) for lin in linears])
    offset = 0
    for lin, size in zip(linears, sizes):
        lin.weight.data = weight[offset:offset + size]
        if lin.bias is not None:
            lin.bias.data = bias[offset:offset + size]
        offset += size
    return weight, bias, sizes


def _fused(linears: list[nn.Module]) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """One call computing the concatenated outputs: float weights concatenated, or (weight-only quantized
    layers, :mod:`apet.quant`) one QuantLinear over the concatenated integer weights."""
    if all(isinstance(lin, nn.Linear) for lin in linears):
        weight, bias, sizes = _fuse(linears)
        return (lambda h: linear(h, weight, bias)), sizes
    from apet.quant.qlinear import concat_outputs

    return concat_outputs(list(linears)), [lin.out_features for lin in linears]


def skinny_projection(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float ``nn.Linear`` through :func:`apet.kernels.gemv.linear` (decode's skinny matmuls); anything else
    (a weight-only quantized layer) as it is."""
    if type(module) is nn.Linear:
        return lambda h: linear(h, module.weight, module.bias)
    return module


class FusedLayer:
    """One decoder layer's fused projections; ``qkv(h)``, ``out(h)`` and ``mlp(h)`` equal the unfused modules."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_call, self.qkv_sizes = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_call, self.gate_up_sizes = _fused([mlp.gate_proj, mlp.up_proj])
        self.down, self.act = skinny_projection(mlp.down_proj), mlp.act_fn
        self.out = skinny_projection(attn.o_proj)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv_call(h).split(self.qkv_sizes, dim=-1)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_call(h).split(self.gate_up_sizes, dim=-1)
        return self.down(self.act(gate) * up)
