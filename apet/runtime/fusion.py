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
import torch.nn.functional as F
from torch import nn

from apet.modeling.fast_path import concat_linears


def _fused(linears: list[nn.Module]) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """One call computing the concatenated outputs: float weights concatenated, or (weight-only quantized
    layers, :mod:`apet.quant`) one QuantLinear over the concatenated integer weights."""
    if all(isinstance(lin, nn.Linear) for lin in linears):
        weight, bias, sizes = concat_linears(linears)
        return (lambda h: F.linear(h, weight, bias)), sizes
    from apet.quant.qlinear import concat_outputs

    return concat_outputs(list(linears)), [lin.out_features for lin in linears]


class FusedLayer:
    """One decoder layer's fused projections; ``qkv(h)`` and ``mlp(h)`` equal the unfused modules."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_call, self.qkv_sizes = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_call, self.gate_up_sizes = _fused([mlp.gate_proj, mlp.up_proj])
        self.down, self.act = mlp.down_proj, mlp.act_fn

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv_call(h).split(self.qkv_sizes, dim=-1)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_call(h).split(self.gate_up_sizes, dim=-1)
        return self.down(self.act(gate) * up)
