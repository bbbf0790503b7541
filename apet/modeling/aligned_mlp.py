"""A gated MLP (``down(act(gate(x)) * up(x))``) with gate and up fused into one GEMM and the hidden width padded
to a multiple of 64, for the torch GPU path.

Why: Qwen2.5-VL's vision MLP is 3,420 wide, a multiple of 4 but not of 8. cuBLAS then cannot use its aligned
Hopper kernels and falls back to an sm80 kernel with 2-element alignment: on an H200 the tower's 96 MLP GEMMs
took 30 of its 76 ms at 1344² (docs/benchmarks.md, vision towers). Zero rows in up (weight and bias) make the
padded products ``act(gate) · 0 = 0`` and zero columns in down add exact zeros, so the result is the same sum.

The padded weights replace the module's own: gate/up/down's ``weight.data`` become views of the padded storage
(down's a strided view), so no weight memory is duplicated and the Hugging Face module keeps computing what it
did (the reference path and export read the same numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ALIGN = 64


@dataclass
class AlignedGatedMlp:
    """The fused, padded form of one gated MLP; call it on [..., hidden]."""

    gate_up: torch.Tensor  # [2·P, hidden]: gate rows 0..I, up rows P..P+I, zero elsewhere
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor  # [hidden, P], zero columns from I
    down_bias: torch.Tensor | None
    act: nn.Module
    padded: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, self.gate_up, self.gate_up_bias).split(self.padded, dim=-1)
        return F.linear(self.act(gate) * up, self.down, self.down_bias)


def _padded_rows(linear: nn.Linear, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = linear.weight.data.new_zeros(rows, linear.in_features)
    weight[: linear.out_features] = linear.weight.data
    bias = None
    if linear.bias is not None:
        bias = linear.bias.data.new_zeros(rows)
        bias[: linear.out_features] = linear.bias.data
    return weight, bias


def is_gated_mlp(mlp: nn.Module) -> bool:
    return all(isinstance(getattr(mlp, name, None), nn.Linear) for name in ("gate_proj", "up_proj", "down_proj")) \
        and isinstance(getattr(mlp, "act_fn", None), nn.Module)


def aligned_gated_mlp(mlp: nn.Module, align: int = ALIGN) -> AlignedGatedMlp:
    """The module's fused, padded form, built once and cached on the module."""
    cached = getattr(mlp, "_apet_aligned", None)
    if cached is not None:
        return cached
    gate, up, down = mlp.gate_proj, mlp.up_proj, mlp.down_proj
    width = gate.out_features
    padded = -(-width // align) * align
    gate_w, gate_b = _padded_rows(gate, padded)
    up_w, up_b = _padded_rows(up, padded)
    gate_up = torch.cat([gate_w, up_w])
    gate_up_bias = None if gate_b is None and up_b is None else torch.cat([
        gate_b if gate_b is not None else gate_up.new_zeros(padded),
        up_b if up_b is not None else gate_up.new_zeros(padded)])
    down_w = down.weight.data.new_zeros(down.out_features, padded)
    down_w[:, :width] = down.weight.data
    # the module's parameters become views of the padded storage (no second copy of the weights)
    gate.weight.data, up.weight.data = gate_up[:width], gate_up[padded:padded + width]
    if gate.bias is not None:
        gate.bias.data = gate_up_bias[:width]
    if up.bias is not None:
        up.bias.data = gate_up_bias[padded:padded + width]
    down.weight.data = down_w[:, :width]
    fused = AlignedGatedMlp(gate_up, gate_up_bias, down_w, down.bias.data if down.bias is not None else None,
                            mlp.act_fn, padded)
    mlp._apet_aligned = fused
    return fused
