"""Attention over packed variable-length segments (``cu_seqlens``) on the torch GPU path.

Why: SDPA takes FlashAttention only without a mask. A block-diagonal or left-padding mask sends it to the
memory-efficient or math kernel and materialises [.., T, T] biases (Qwen's window attention, a left-padded
prefill). Flash attention over ``cu_seqlens`` computes the same softmax per segment with no mask at all: each
segment attends only inside itself (causally or not). Off CUDA, or where this torch has no varlen flash, the same
result comes from SDPA with the equivalent block-diagonal mask (:func:`segment_mask`), so CPU tests exercise the
segment bookkeeping and the GPU checks compare the two kernels.

torch's public ``torch.nn.attention.varlen.varlen_attn`` changed between releases (``is_causal`` in 2.10,
``window_size``/``enable_gqa``/``scale`` later); :func:`varlen_attention` reads its signature once.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F


def _find_varlen() -> tuple[Callable[..., Any] | None, frozenset[str]]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, frozenset()
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# read once at import: a plain constant inside a torch.compile trace (a cached call there draws Dynamo's warning)
_VARLEN = _find_varlen()


def flash_varlen_available(q: torch.Tensor, head_dim: int | None = None) -> bool:
    """Whether :func:`varlen_attention` runs FlashAttention for ``q``: CUDA, fp16/bf16, head dim (``head_dim``, or
    q's last dimension) a multiple of 8 up to 256, and a torch that exposes ``varlen_attn``."""
    fn, _ = _VARLEN
    dim = q.shape[-1] if head_dim is None else head_dim
    return fn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dim % 8 == 0 and dim <= 256


def segment_mask(cu_seqlens: torch.Tensor, total: int, causal: bool) -> torch.Tensor:
    """[total, total] bool: True where query i may attend key j (same segment; j <= i when causal)."""
    positions = torch.arange(total, device=cu_seqlens.device)
    segment = torch.bucketize(positions, cu_seqlens[1:].to(positions.dtype), right=True)
    allowed = segment[:, None] == segment[None, :]
    if causal:
        allowed &= positions[None, :] <= positions[:, None]
    return allowed


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
               scale: float | None) -> torch.Tensor:
    """SDPA with the block-diagonal mask: the exact meaning of the flash call, on any device."""
    allowed = segment_mask(cu_seqlens, q.shape[0], causal)
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1) if groups > 1 else t for t in (k, v))
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=allowed, scale=scale)
    return out[0].transpose(0, 1)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                     *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Softmax attention of packed segments: q [T, Hq, d], k and v [T, Hkv, d] (Hq a multiple of Hkv),
    ``cu_seqlens`` [S+1] int32 segment starts (first 0, last T; empty segments allowed), ``max_seqlen`` a Python
    int bounding every segment (graph capture needs no host read) -> [T, Hq, d].

    Tokens of one segment attend only to that segment (and only backwards when ``causal``)."""
    if not flash_varlen_available(q):
        return _reference(q, k, v, cu_seqlens, causal, scale)
    fn, params = _VARLEN
    groups = q.shape[1] // k.shape[1]
    kwargs: dict[str, Any] = {}
    if groups > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if scale is not None:
        if "scale" in params:
            kwargs["scale"] = scale
        else:  # the kernel's default is 1/sqrt(d): fold the difference into q
            q = q * (scale * q.shape[-1] ** 0.5)
    if causal:
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
    cu = cu_seqlens.to(torch.int32)
    return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


PromptPadding = Literal["none", "left", "other"]


def prompt_padding(mask: torch.Tensor) -> PromptPadding:
    """How a [B, T] 1/0 prompt mask pads its rows: ``none`` (every position real), ``left`` (each row a run of
    zeros then a run of ones, some zeros) or ``other``. Which prefill attention applies follows from it
    (:meth:`apet.runtime.static_decoder.StaticDecoder.prefill_form`). Reads the values: call it on the host copy."""
    if bool((mask > 0).all()):
        return "none"
    return "left" if is_left_padded(mask) else "other"


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, d] over k and v [B, Hkv, T, d] (Hq a multiple of Hkv) with no padding in
    any row -> [B, Hq, T, d].

    Why not the packed segments (:func:`packed_causal_attention`) for an unpadded prompt: SDPA without a mask may
    take cuDNN's Hopper attention, where the varlen call is PyTorch's bundled FlashAttention-2 (on the H200 9.4
    against 13.8 µs a layer at LLaVA-1.5-7B's 136 tokens, 81 against 210 at Qwen2.5-VL-7B's 2,065; docs/
    benchmarks.md, "Prefill attention"). Same softmax over the same keys: row i attends to keys 0..i."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def is_left_padded(mask: torch.Tensor) -> bool:
    """Whether every row of a [B, T] 1/0 mask is a run of zeros then a run of ones (left padding): what
    :func:`left_pad_segments` maps onto segments. Reads the values (a host sync on a device tensor): call it on
    the host copy before the mask is uploaded."""
    real = (mask > 0).to(torch.int8)
    return bool((real[:, 1:] >= real[:, :-1]).all())


def left_pad_segments(mask: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [2B+1] int32 for a left-padded [B, T] mask packed as B·T tokens: row b with P_b pads is two
    segments, [pads | real tokens], so ``[0, P_0, T, T + P_1, 2T, ...]``. Causal attention over them is exactly the
    masked attention for the real tokens; the pads attend among themselves (rows nothing reads: the real tokens
    never see them, and their cache entries are masked invalid). Computed on the device, no host read (capturable).
    """
    batch, length = mask.shape
    pads = length - (mask > 0).sum(1)
    ends = torch.arange(1, batch + 1, device=mask.device) * length
    bounds = torch.stack([ends - length + pads, ends], 1).flatten()
    return torch.cat([bounds.new_zeros(1), bounds]).to(torch.int32)


def packed_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Causal attention of q [B, Hq, T, d], k and v [B, Hkv, T, d] (head-major views, as the decoder block makes
    them) over the segments of ``cu_seqlens`` (indices into the B·T packed tokens) -> [B, Hq, T, d].

    Packing is a view where the tensors are token-major in memory ([B, T, H, d] transposed), else one copy."""
    batch, heads, length, dim = q.shape

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(batch * length, t.shape[1], dim)

    out = varlen_attention(pack(q), pack(k), pack(v), cu_seqlens, length, causal=True)
    return out.view(batch, length, heads, dim).transpose(1, 2)
