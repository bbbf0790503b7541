"""Horizontal fusion of a Llama-style layer's projections for the GPU fast path, and its norms and rotary as
Triton kernels (:mod:`apet.kernels.decoder_fused`) where they run.

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

from apet.kernels import activations, decoder_fused
from apet.kernels.gemv import linear
from apet.modeling.fast_path import concat_linears

# ``enabled = False`` keeps the HF norms and torch rotary on the GPU too (to compare, scripts/gpu_floor.py)
KERNELS: dict = {"enabled": True}


def _fused(linears: list[nn.Module]) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int]]:
    """One call computing the concatenated outputs: float weights concatenated, or (weight-only quantized
    layers, :mod:`apet.quant`) one QuantLinear over the concatenated integer weights."""
    if all(isinstance(lin, nn.Linear) for lin in linears):
        weight, bias, sizes = concat_linears(linears)
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
    """One decoder layer's fused projections; ``qkv(h)``, ``out(h)`` and ``mlp(h)`` equal the unfused modules,
    ``norm`` and ``qkv_rotated`` the HF norms and rotary (Triton kernels on the GPU, the HF modules elsewhere)."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_call, self.qkv_sizes = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_call, self.gate_up_sizes = _fused([mlp.gate_proj, mlp.up_proj])
        self.down, self.act = skinny_projection(mlp.down_proj), mlp.act_fn
        # gate and up of equal width with SiLU: apet.kernels.activations.silu_mul applies
        self.silu = activations.is_silu(self.act) and self.gate_up_sizes[0] == self.gate_up_sizes[1]
        self.out = skinny_projection(attn.o_proj)
        self.norms = {"input": layer.input_layernorm, "post": layer.post_attention_layernorm}
        self.norm_weights = {name: decoder_fused.rms_norm_of(module) for name, module in self.norms.items()}

    def _kernels(self, h: torch.Tensor, name: str) -> bool:
        found = self.norm_weights[name]
        # not under torch.compile: inductor fuses the norms and rotary with their neighbours itself, and the opaque
        # kernels made the compiled prefill and decode slower on the H200 (docs/benchmarks.md, issue 31)
        return (KERNELS["enabled"] and found is not None and found[0].dtype == h.dtype
                and decoder_fused.available(h) and not torch.onnx.is_in_onnx_export()
                and not torch.compiler.is_compiling())

    def norm(self, name: str, h: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, norm(h + delta)) for the layer's ``input`` or ``post`` (post-attention) norm: one kernel."""
        if self._kernels(h, name):
            weight, eps = self.norm_weights[name]
            return decoder_fused.add_rms_norm(h, weight, eps, delta)
        h = h if delta is None else h + delta
        return h, self.norms[name](h)

    def qkv_rotated(self, normed: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """q [B, H, T, d], k and v [B, Hkv, T, d] with q and k rotated (rotate-half), projection and rotary in two
        kernels; None where the rotary kernel does not run (the caller rotates)."""
        if not self._kernels(normed, "input") or cos.shape[-1] != head_dim or head_dim & (head_dim - 1):
            return None
        return decoder_fused.rotary(self.qkv_call(normed), cos, sin, heads, kv_heads, head_dim)

    def qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.qkv_call(h).split(self.qkv_sizes, dim=-1)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_call(h)
        if self.silu and KERNELS["enabled"] and activations.available(gate_up):
            # silu(gate)·up in one pass (eager GPU): two un-fused launches were ~6.7 of NeXT's 79 ms prefill
            return self.down(activations.silu_mul(gate_up))
        gate, up = gate_up.split(self.gate_up_sizes, dim=-1)
        return self.down(self.act(gate) * up)
