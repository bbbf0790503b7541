"""Horizontal fusion of a Llama-style layer's projections for the GPU fast path, and its norms and rotary as
Triton kernels (:mod:`apet.kernels.decoder_fused`) where they run.

q/k/v become one matmul and gate/up another: at decode (batch 1) each projection is a
memory-bound GEMV, so fewer, larger ones run closer to peak bandwidth and launch fewer
kernels. The fused weight is built once and the original ``nn.Linear`` weights are
re-pointed at slices of it, so no weight memory is duplicated and the HF modules (used by
the reference path) keep working. At a decode step's few rows (up to :data:`apet.kernels.fused_gemv.MAX_ROWS`) the
norms, silu·mul and the residual adds fold into the projections' kernels too (:mod:`apet.kernels.fused_gemv`).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from apet.kernels import activations, decoder_fused, fused_gemv
from apet.kernels.gemv import linear
from apet.modeling.fast_path import concat_linears

# ``enabled = False`` keeps the HF norms and torch rotary on the GPU too (to compare, scripts/gpu_floor.py)
KERNELS: dict = {"enabled": True}


def _fused(linears: list[nn.Module]) -> tuple[Callable[[torch.Tensor], torch.Tensor], list[int],
                                               tuple[torch.Tensor, torch.Tensor | None] | None]:
    """One call computing the concatenated outputs, the sizes, and (float layers) the concatenated weight and bias:
    float weights concatenated, or (weight-only quantized layers, :mod:`apet.quant`) one QuantLinear over the
    concatenated integer weights."""
    if all(isinstance(lin, nn.Linear) for lin in linears):
        weight, bias, sizes = concat_linears(linears)
        return (lambda h: linear(h, weight, bias)), sizes, (weight, bias)
    from apet.quant.qlinear import concat_outputs

    return concat_outputs(list(linears)), [lin.out_features for lin in linears], None


def _float_weight(module: nn.Module) -> torch.Tensor | None:
    """The weight of a plain ``nn.Linear`` without bias (what the residual-fused kernel takes), else None."""
    return module.weight if type(module) is nn.Linear and module.bias is None else None


def skinny_projection(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """A float ``nn.Linear`` through :func:`apet.kernels.gemv.linear` (decode's skinny matmuls); anything else
    (a weight-only quantized layer) as it is."""
    if type(module) is nn.Linear:
        return lambda h: linear(h, module.weight, module.bias)
    return module


def _folds(h: torch.Tensor, norm: tuple[torch.Tensor, float] | None, weight: torch.Tensor | None,
           kind: str = "norm", bias: torch.Tensor | None = None) -> bool:
    """Whether a Llama-style norm folds into the float projection after it (:func:`apet.kernels.fused_gemv.folds`:
    decode's rows, where its timing did not refuse it)."""
    return (KERNELS["enabled"] and norm is not None and weight is not None and norm[0].dtype == h.dtype
            and fused_gemv.folds(kind, h, weight, bias))


def norm_then_head(norm: nn.Module, head: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The final norm and the LM head of the last hidden states: one kernel at decode's rows (a float head after a
    Llama-style norm, :mod:`apet.kernels.fused_gemv`), else the norm and :func:`skinny_projection`."""
    project, found = skinny_projection(head), decoder_fused.rms_norm_of(norm)
    weight = head.weight if type(head) is nn.Linear else None

    def logits(h: torch.Tensor) -> torch.Tensor:
        if _folds(h, found, weight, bias=head.bias):
            return fused_gemv.norm_linear(h, *found, weight, head.bias)
        return project(norm(h))

    return logits


class FusedLayer:
    """One decoder layer's fused projections (:class:`apet.modeling.decoder_block.FusedProjections`):
    ``project_qkv`` is the input norm and the q/k/v projections, ``finish`` the rest of the layer after attention;
    they equal the HF modules (Triton kernels on the GPU, the HF modules elsewhere)."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv_call, self.qkv_sizes, self.qkv_weights = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
        self.gate_up_call, self.gate_up_sizes, self.gate_up_weights = _fused([mlp.gate_proj, mlp.up_proj])
        self.down, self.act = skinny_projection(mlp.down_proj), mlp.act_fn
        # gate and up of equal width with SiLU: apet.kernels.activations.silu_mul applies
        self.silu = activations.is_silu(self.act) and self.gate_up_sizes[0] == self.gate_up_sizes[1]
        self.out = skinny_projection(attn.o_proj)
        self.norms = {"input": layer.input_layernorm, "post": layer.post_attention_layernorm}
        self.norm_weights = {name: decoder_fused.rms_norm_of(module) for name, module in self.norms.items()}
        # what finish folds at decode's rows, known once: float o/down without bias, silu·up of an unbiased gate/up
        self.o_weight, self.down_weight = _float_weight(attn.o_proj), _float_weight(mlp.down_proj)
        self.folds_finish = (self.silu and self.o_weight is not None and self.down_weight is not None
                             and self.gate_up_weights is not None and self.gate_up_weights[1] is None)

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

    def project_qkv(self, h: torch.Tensor) -> torch.Tensor:
        """The input norm and the packed q/k/v projection [..., (H + 2 Hkv)·d]: one kernel at decode's rows."""
        found = self.norm_weights["input"]
        weight, bias = self.qkv_weights if self.qkv_weights is not None else (None, None)
        if _folds(h, found, weight, bias=bias):
            return fused_gemv.norm_linear(h, *found, weight, bias)
        return self.qkv_call(self.norm("input", h)[1])

    def qkv_rotated(self, projected: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """q [B, H, T, d], k and v [B, Hkv, T, d] of the packed projection with q and k rotated (rotate-half) in one
        kernel; None where the rotary kernel does not run (the caller rotates)."""
        if not self._kernels(projected, "input") or cos.shape[-1] != head_dim or head_dim & (head_dim - 1):
            return None
        return decoder_fused.rotary(projected, cos, sin, heads, kv_heads, head_dim)

    def split_qkv(self, projected: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return projected.split(self.qkv_sizes, dim=-1)

    def finish(self, h: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """o projection + residual, post-attention norm, MLP + residual, for the merged attention output
        [..., H·d]: three kernels at decode's rows (o+residual, norm+gate/up+silu·mul, down+residual), each fold
        where its timing took it; else the residual add and norm in one kernel around the projections."""
        if not (self.folds_finish and KERNELS["enabled"]):
            h, normed = self.norm("post", h, self.out(attended))
            return h + self.mlp(normed)
        delta = None
        if fused_gemv.folds("residual", attended, self.o_weight):
            h = fused_gemv.linear_residual(attended, self.o_weight, h)
        else:
            delta = self.out(attended)
        found, gate_up = self.norm_weights["post"], self.gate_up_weights[0]
        if _folds(h, found, gate_up, "silu"):
            h = h if delta is None else h + delta
            activated = fused_gemv.norm_gate_up_silu(h, *found, gate_up)
        else:
            h, normed = self.norm("post", h, delta)
            activated = self.activated(normed)
        if fused_gemv.folds("residual", activated, self.down_weight):
            return fused_gemv.linear_residual(activated, self.down_weight, h)
        return h + self.down(activated)

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.down(self.activated(h))

    def activated(self, h: torch.Tensor) -> torch.Tensor:
        """act(gate)·up of the normed rows: the MLP before its down projection."""
        gate_up = self.gate_up_call(h)
        if self.silu and KERNELS["enabled"] and activations.available(gate_up):
            # silu(gate)·up in one pass (eager GPU): two un-fused launches were ~6.7 of NeXT's 79 ms prefill
            return activations.silu_mul(gate_up)
        gate, up = gate_up.split(self.gate_up_sizes, dim=-1)
        return self.act(gate) * up
