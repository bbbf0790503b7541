"""Activation-aware weight quantization (AWQ, Lin et al. 2024), the scale search only (what ModelOpt
calls ``awq_lite``).

Per group of projections that read the same input x (q/k/v after the input norm, o after v, gate/up
after the post-attention norm, down after up, the LM head after the final norm), AWQ scales input
channel j of the weights by s_j and divides the input by s_j — folded into the op that produces x
(a norm's weight, or the rows of the previous projection), so the float network is unchanged and no
extra op reaches the graph. Salient channels (large mean |x|) get large s and lose less to
rounding. s = mean|x|^a / sqrt(max * min), a on a grid over [0, 1), picked to minimise the squared
error of the group's quantized outputs on the calibration tokens; a = 0 is plain round-to-nearest,
so AWQ never does worse than RTN on the calibration data.

Why our own code: ModelOpt's AWQ needs its HF plugin (pins transformers < 5.15; we run 5.x) and its
ONNX path pins onnx 1.21 / onnxruntime-gpu 1.24 next to our onnxruntime 1.32; AutoAWQ is archived
and pins old torch/transformers; torchao's AWQ keeps the scale as a separate activation multiply and
stores tinygemm (asymmetric, float zero point) weights that TensorRT's symmetric DQ cannot express.
The search is ~40 lines on top of the same RTN the export uses, and it runs one decoder layer at a
time, so a 7B model never needs a second float copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from apet.quant.qlinear import _dequantize, quantize_weight

GRID = 20
MAX_TOKENS = 4096  # calibration tokens used per group search (subsampled evenly beyond that)


@dataclass
class Group:
    """Projections sharing one input, and the op whose output (that input) absorbs 1/s."""

    key: str  # "layers.3.qkv", "lm_head" (names the scale in the scales file)
    prev: nn.Module  # a norm with a per-channel weight, or an nn.Linear whose output rows are divided
    linears: list[nn.Linear]
    hook: nn.Module  # the module whose input is x


def layer_groups(index: int, layer: nn.Module) -> list[Group]:
    """The four AWQ groups of a Llama-style decoder layer (o after v only without GQA: with grouped
    KV heads v's outputs do not map one-to-one onto o's inputs)."""
    attn, mlp = layer.self_attn, layer.mlp
    groups = [Group(f"layers.{index}.qkv", layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj],
                    attn.q_proj)]
    if isinstance(attn.v_proj, nn.Linear) and attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append(Group(f"layers.{index}.o", attn.v_proj, [attn.o_proj], attn.o_proj))
    groups.append(Group(f"layers.{index}.gate_up", layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj],
                        mlp.gate_proj))
    groups.append(Group(f"layers.{index}.down", mlp.up_proj, [mlp.down_proj], mlp.down_proj))
    return groups


def foldable(group: Group) -> bool:
    """Whether 1/s can be folded into ``group.prev`` (a multiplicative per-channel norm weight or a
    linear's rows); other norms (e.g. Gemma's 1 + w) are left to round-to-nearest."""
    k = group.linears[0].in_features
    if isinstance(group.prev, nn.Linear):
        return group.prev.out_features == k
    weight = getattr(group.prev, "weight", None)
    return isinstance(weight, torch.Tensor) and tuple(weight.shape) == (k,) and not hasattr(group.prev, "offset")


@torch.no_grad()
def apply_scale(group: Group, scale: torch.Tensor) -> None:
    """W[:, j] *= s_j for the group's projections, prev's output channel j /= s_j (in place, float32
    arithmetic then the model dtype, identically at export and when a backend rebuilds the model)."""
    s = scale.float().to(group.linears[0].weight.device)
    prev = group.prev
    prev.weight.data = (prev.weight.data.float() / (s[:, None] if isinstance(prev, nn.Linear) else s)
                        ).to(prev.weight.dtype)
    if isinstance(prev, nn.Linear) and prev.bias is not None:
        prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    for linear in group.linears:
        linear.weight = nn.Parameter((linear.weight.data.float() * s[None, :]).to(linear.weight.dtype),
                                     requires_grad=False)  # a new tensor: a tied LM head keeps its embeddings


def _fake_quant(weight: torch.Tensor, fmt: str, group: int | None) -> torch.Tensor:
    values, scale = quantize_weight(weight, fmt, group)
    if fmt == "int4":
        from apet.quant.qlinear import pack_int4

        return _dequantize(pack_int4(values), scale.float(), fmt, group, tuple(values.shape)).t()
    return _dequantize(values, scale.float(), fmt, 0, tuple(values.shape)).t()


@torch.no_grad()
def search_scale(x: torch.Tensor, linears: list[nn.Linear], fmt: str, group_size: int | None,
                 grid: int = GRID) -> tuple[torch.Tensor, dict[str, float]]:
    """The AWQ scale for input features ``x`` [tokens, K] of ``linears``; also the losses at a = 0 (RTN)
    and at the chosen a."""
    x = x.float()
    if x.shape[0] > MAX_TOKENS:
        x = x[torch.linspace(0, x.shape[0] - 1, MAX_TOKENS, device=x.device).long()]
    weights = [linear.weight.detach() for linear in linears]
    targets = [x @ w.float().t() for w in weights]
    x_mean = x.abs().mean(dim=0)
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    rtn_loss = None
    for step in range(grid):
        ratio = step / grid
        s = x_mean.pow(ratio).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        loss = 0.0
        for w, target in zip(weights, targets):
            scaled = (w.float() * s[None, :]).to(w.dtype)
            approx = (x / s) @ _fake_quant(scaled, fmt, group_size).t()
            loss += float((approx - target).pow(2).mean())
        if step == 0:
            rtn_loss = loss
        if loss < best[0]:
            best = (loss, s, ratio)
    return best[1], {"rtn_loss": float(rtn_loss), "awq_loss": best[0], "ratio": best[2]}


def capture_inputs(modules: list[nn.Module], run: Callable[[], torch.Tensor]) -> tuple[list[torch.Tensor],
                                                                                          torch.Tensor]:
    """Run ``run()`` once with forward pre-hooks on ``modules``; returns each module's input as
    [tokens, features] and run()'s output."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]
    handles = [m.register_forward_pre_hook(lambda _m, args, i=i: seen[i].append(args[0].detach()))
               for i, m in enumerate(modules)]
    try:
        out = run()
    finally:
        for h in handles:
            h.remove()
    return [torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]) for inputs in seen], out
