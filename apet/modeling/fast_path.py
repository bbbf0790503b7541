"""The vision towers' GPU fast path: when it runs, and the fused pieces it shares between families (torch).

Why a second path at all: the traced graph (``vision.onnx``) must keep the forms TensorRT and ONNX Runtime fuse
(gathered windows with a key mask, separate projections, Hugging Face's norms op by op), but eagerly on a GPU those
forms cost more than the matmuls: a masked attention cannot take FlashAttention, and every fp32 rotary or norm step
is its own pass over [P, C] activations. The fast path computes the same function with packed segments
(:func:`apet.kernels.varlen.varlen_attention`), mask-free SDPA, one-pass norms and concatenated projections.

It runs eagerly (never while tracing or exporting, so the exported graphs do not change) on CUDA tensors, unless
``FAST_TOWERS["enabled"]`` is False (``APET_FAST_TOWERS=0`` in the environment: the GPU scripts' "before");
``FAST_TOWERS["off_cuda"]`` lets CPU tests run it against the reference forms.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from apet import switches

FAST_TOWERS: dict = {"enabled": switches.enabled("APET_FAST_TOWERS"), "off_cuda": False}
_FUSED = "_apet_fused_linear"


def fast_tower(x: torch.Tensor) -> bool:
    """Whether a tower computing on ``x`` takes the fast path (eager, enabled, on CUDA or forced off it)."""
    if not FAST_TOWERS["enabled"] or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing():
        return False
    return x.is_cuda or bool(FAST_TOWERS["off_cuda"])


@contextlib.contextmanager
def fast_towers(enabled: bool) -> Iterator[None]:
    """Run the towers with the fast path on or off inside the block (the reference backend keeps the graph
    forms on a GPU, so GPU checks compare the fast path against them)."""
    saved = FAST_TOWERS["enabled"]
    FAST_TOWERS["enabled"] = enabled and saved
    try:
        yield
    finally:
        FAST_TOWERS["enabled"] = saved


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Hugging Face RMSNorm module (``weight``, ``variance_epsilon``) in one call: fp32 statistics like the
    module's, one pass instead of six on a GPU (the module casts to fp32, squares, averages, scales, casts back
    and multiplies by the weight as separate kernels)."""
    weight = norm.weight
    return F.rms_norm(x, (weight.shape[0],), weight, norm.variance_epsilon)


def concat_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """One weight (and bias) for several ``nn.Linear`` of one input: the concatenation, with the modules' own
    weights re-pointed at slices of it, so no weight memory is duplicated and the modules compute what they did."""
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


@torch.compiler.disable
def fuse_linears(owner: nn.Module, names: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """The concatenated weight of ``owner``'s linears ``names``, built once and kept on ``owner``. Build it before
    torch.compile traces a stage (:meth:`apet.modeling.vision.VisionStages.prepare_fast`): built inside, it would
    cost a graph break and a recompile."""
    cached = getattr(owner, _FUSED, None)
    if cached is not None and cached[0] == names:
        return cached[1]
    fused = concat_linears([getattr(owner, name) for name in names])
    setattr(owner, _FUSED, (names, fused))
    return fused


def concatenated_linear(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([owner.<name>(x) for name in names], -1)`` as one matmul over the concatenated weight
    (:func:`fuse_linears`)."""
    cached = getattr(owner, _FUSED, None)
    weight, bias, _ = cached[1] if cached is not None and cached[0] == names else fuse_linears(owner, names)
    return F.linear(x, weight, bias)


def fused_linear(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """``[owner.<name>(x) for name in names]`` as one matmul (:func:`concatenated_linear`, split)."""
    return list(concatenated_linear(owner, names, x).split([getattr(owner, n).out_features for n in names], -1))
