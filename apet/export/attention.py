"""Attention and rotary embedding in the two exported forms (``--attention pattern|op``, see
:mod:`apet.contracts.targets`).

``op`` writes the opset-23 ``Attention`` and ``RotaryEmbedding`` nodes *at the source*: each call goes through a
``torch.autograd.Function`` whose ``symbolic`` the TorchScript exporter calls, so a node carries exactly the
semantics we traced (scale, mask, GQA from the shapes) instead of being recovered from a traced subgraph by
pattern matching — which would have to know our decoder's graph, every Hugging Face attention variant a vision
tower may use, and each transformers version's spelling of them. The TorchScript exporter stops at opset 20, so
the nodes are written in a private domain (:data:`~apet.export.onnx_utils.PENDING_DOMAIN`) and moved to the
standard one after onnxscript's version converter has raised the graph to opset 23
(:func:`apet.export.onnx_utils.export_onnx`).

The decoder's mask in ``op`` form is boolean (True = attend) and lets a query row see its own key besides the
causal and padding rules: a left-padding row would otherwise mask every key, and a fused kernel may return NaN
for such a row (ONNX Runtime returns zeros), which the next layer's keys and values would carry into real rows.
Real tokens always see themselves, so their outputs are unchanged.

Vision towers run Hugging Face's attention modules; :func:`hf_attention` routes them through the same op by
registering an implementation with transformers' ``AttentionInterface`` for the duration of the export.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from apet.errors import UsageError
from apet.export.onnx_utils import PENDING_DOMAIN
from apet.modeling.blocks import HeadLayout, additive_mask, allowed_keys, apply_rotary, repeat_kv

HF_IMPLEMENTATION = "apet_onnx_attention"


class _AttentionOp(torch.autograd.Function):
    """ONNX ``Attention`` (opset 23): q [B,Hq,S,D], k/v [B,Hkv,T,D] (Hq a multiple of Hkv), optional mask."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                scale: float) -> torch.Tensor:
        grouped = bool(q.shape[1] != k.shape[1])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=grouped)

    @staticmethod
    def symbolic(g: Any, q: Any, k: Any, v: Any, mask: Any, scale: float) -> Any:
        inputs = [q, k, v] if _is_none(mask) else [q, k, v, mask]
        out = g.op(f"{PENDING_DOMAIN}::Attention", *inputs, scale_f=float(scale))
        out.setType(q.type())
        return out


class _RotaryOp(torch.autograd.Function):
    """ONNX ``RotaryEmbedding`` (opset 23, non-interleaved): x [B,H,S,D], cos/sin [B,S,D/2]."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2, cos, sin = x[..., :half], x[..., half:], cos.unsqueeze(1), sin.unsqueeze(1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    @staticmethod
    def symbolic(g: Any, x: Any, cos: Any, sin: Any) -> Any:
        out = g.op(f"{PENDING_DOMAIN}::RotaryEmbedding", x, cos, sin, interleaved_i=0)
        out.setType(x.type())
        return out


def _is_none(value: Any) -> bool:
    return value is None or (hasattr(value, "node") and value.node().mustBeNone())


def onnx_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:
    return _AttentionOp.apply(q, k, v, mask, scale)


def onnx_rotary(x: torch.Tensor, cos_half: torch.Tensor, sin_half: torch.Tensor) -> torch.Tensor:
    return _RotaryOp.apply(x, cos_half, sin_half)


class PatternAttention:
    """MatMul - additive mask - Softmax - MatMul in the graph dtype; RoPE as rotate-half (TensorRT 10.3)."""

    def __init__(self, layout: HeadLayout) -> None:
        self.layout = layout

    def tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return cos, sin

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin)

    def mask(self, attention_mask: torch.Tensor, query_len: Any, dtype: torch.dtype) -> torch.Tensor:
        return additive_mask(attention_mask, query_len, dtype)

    def cache_mask(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, C] validity of a static cache's positions -> [B, 1, 1, C] bias for one query (static decode)."""
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        return torch.where(valid[:, None, None, :] > 0, zero, torch.finfo(dtype).min)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        groups = self.layout.groups
        scores = (q * self.layout.head_dim**-0.5) @ repeat_kv(keys, groups).transpose(2, 3) + bias
        return F.softmax(scores, dim=-1) @ repeat_kv(values, groups)


class OpAttention(PatternAttention):
    """The opset-23 ``Attention`` and ``RotaryEmbedding`` ops (TensorRT >= 10.15, TensorRT-RTX)."""

    def tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = cos.shape[-1] // 2
        if not torch.jit.is_tracing() and not (torch.equal(cos[..., :half], cos[..., half:])
                                               and torch.equal(sin[..., :half], sin[..., half:])):
            raise UsageError("this model's rotary tables are not two equal halves, so RotaryEmbedding cannot "
                             "express them exactly", "export with --attention pattern")
        return cos[..., :half], sin[..., :half]

    def rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return onnx_rotary(x, cos, sin)

    def mask(self, attention_mask: torch.Tensor, query_len: Any, dtype: torch.dtype) -> torch.Tensor:
        return allowed_keys(attention_mask, query_len, include_self=True)

    def cache_mask(self, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Boolean, True = attend; no self rule: the token's own position is valid, stale ones must stay masked."""
        return valid[:, None, None, :] > 0

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return onnx_attention(q, keys, values, mask, self.layout.head_dim**-0.5)


def attention_kernel(form: str, layout: HeadLayout) -> PatternAttention:
    return OpAttention(layout) if form == "op" else PatternAttention(layout)


# -- Hugging Face modules (vision towers) ------------------------------------------------------------------------
def _hf_onnx_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature; returns [B, S, H, D] like its sdpa implementation."""
    if dropout or kwargs.get("sliding_window") or kwargs.get("softcap"):
        raise UsageError(f"{type(module).__name__} uses dropout, a sliding window or softcapping, which the ONNX "
                         "Attention export does not cover", "export with --attention pattern")
    mask = attention_mask
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
        mask = mask if mask.dtype == torch.bool else mask.to(query.dtype)
    elif getattr(module, "is_causal", False) and query.shape[2] > 1:
        ones = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device)
        mask = ones.tril()[None, None]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    return onnx_attention(query, key, value, mask, scale).transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def hf_attention(model: nn.Module, form: str) -> Iterator[None]:
    """While exporting ``form == "op"``, every Hugging Face attention module in ``model`` writes ``Attention``
    nodes; the model's own implementation is restored afterwards (the torch backends share the model)."""
    if form != "op":
        yield
        return
    from transformers import AttentionInterface, PretrainedConfig

    AttentionInterface.register(HF_IMPLEMENTATION, _hf_onnx_attention)
    configs = {id(m.config): m.config for m in model.modules() if isinstance(getattr(m, "config", None),
                                                                              PretrainedConfig)}
    saved = {key: config._attn_implementation_internal for key, config in configs.items()}
    try:
        for config in configs.values():
            config._attn_implementation_internal = HF_IMPLEMENTATION
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation_internal = saved[key]
