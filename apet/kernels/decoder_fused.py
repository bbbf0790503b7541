"""Fused RMSNorm (+ residual add) and fused rotary for the decoder layer on the GPU torch path.

Why: outside its GEMMs a decode step is launches. Hugging Face's RMSNorm is five kernels eagerly (cast, pow-mean,
rsqrt, mul, cast-mul), the residual add one more, and rotary on q and k about ten (rotate-half: slices, neg, cat;
two muls and an add, per tensor); a Llama layer has two norms, two residual adds and one rotary, so ~27 small
kernels per layer (~860 per 7B step) around 4 GEMMs and the attention. Here each norm with the residual add before
it is one kernel and the rotary of q and k is one kernel that also lays them out token-major (the packed prefill
attention reads them as a view): 3 kernels per layer. Under ``torch.compile`` these are user Triton kernels that
Inductor schedules as they are.

Same arithmetic as the Hugging Face modules (``LlamaRMSNorm`` / ``Qwen2RMSNorm``: float32 normalisation, cast to the
input dtype, then the weight product in the input dtype; rotate-half rotary), so results agree with them up to the
order of the mean's float32 sum: ``tests/test_decoder_fused.py`` (Triton's interpreter on CPU, the kernels on a GPU).
"""

from __future__ import annotations

import os

import torch
from torch import nn

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None


def available(x: torch.Tensor) -> bool:
    """CUDA fp16/bf16 tensors with Triton importable (or Triton's interpreter on CPU: ``TRITON_INTERPRET=1``)."""
    on_device = x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and on_device and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def rms_norm_of(module: nn.Module) -> tuple[torch.Tensor, float] | None:
    """(weight, eps) of a Hugging Face RMSNorm whose forward is Llama's (weight · normalised), else None (a norm
    this module does not reproduce keeps its own forward)."""
    name = type(module).__name__
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    known = name in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Qwen2_5_VLRMSNorm",
                     "Qwen3VLTextRMSNorm", "InternLM2RMSNorm")
    if not known or eps is None or not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return None
    return weight, float(eps)


if triton is not None:

    @triton.jit
    def _add_rms_norm(x_ptr, delta_ptr, weight_ptr, sum_ptr, out_ptr, eps, H: tl.constexpr, HPAD: tl.constexpr,
                      ADD: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, HPAD)
        inside = cols < H
        x = tl.load(x_ptr + row * H + cols, mask=inside, other=0.0)
        if ADD:  # the residual add, rounded to the input dtype as torch's add is, then normalised
            x = (x.to(tl.float32) + tl.load(delta_ptr + row * H + cols, mask=inside, other=0.0).to(tl.float32))
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row * H + cols, x, mask=inside)
        x32 = x.to(tl.float32)
        variance = tl.sum(x32 * x32, axis=0) / H
        normed = (x32 * (1.0 / tl.sqrt(variance + eps))).to(out_ptr.dtype.element_ty)
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
        out = weight.to(tl.float32) * normed.to(tl.float32)
        tl.store(out_ptr + row * H + cols, out.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _rotary(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, T, HQ: tl.constexpr, HKV: tl.constexpr,
                D: tl.constexpr, HEADS_PAD: tl.constexpr):
        token = tl.program_id(0)  # b * T + t
        half = D // 2
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, D)
        partner = tl.where(dims < half, dims + half, dims - half)
        sign = tl.where(dims < half, -1.0, 1.0)
        cos = tl.load(cos_ptr + token * D + dims).to(tl.float32)
        sin = tl.load(sin_ptr + token * D + dims).to(tl.float32)
        width = (HQ + 2 * HKV) * D
        base = qkv_ptr + token * width
        rotated_heads = heads < HQ + HKV  # q heads then k heads; v is read by the caller as a view
        x = tl.load(base + heads[:, None] * D + dims[None, :], mask=rotated_heads[:, None], other=0.0)
        other = tl.load(base + heads[:, None] * D + partner[None, :], mask=rotated_heads[:, None], other=0.0)
        # x·cos + rotate_half(x)·sin with torch's roundings: each product, then the sum, in the input dtype
        first = (x.to(tl.float32) * cos[None, :]).to(x.dtype)
        second = ((sign[None, :] * other.to(tl.float32)).to(x.dtype).to(tl.float32) * sin[None, :]).to(x.dtype)
        out = (first.to(tl.float32) + second.to(tl.float32)).to(q_ptr.dtype.element_ty)
        is_q = heads < HQ
        tl.store(q_ptr + token * HQ * D + heads[:, None] * D + dims[None, :], out, mask=is_q[:, None])
        tl.store(k_ptr + token * HKV * D + (heads[:, None] - HQ) * D + dims[None, :], out,
                 mask=(~is_q & rotated_heads)[:, None])


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
                 delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + delta, RMSNorm(x + delta)) of [..., H] tensors in one kernel (``delta`` None: (x, RMSNorm(x)))."""
    hidden = int(x.shape[-1])
    rows = x.numel() // hidden
    x = x.contiguous()
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else x
    _add_rms_norm[(rows,)](x, delta.contiguous() if delta is not None else x, weight, total, out, eps, H=hidden,
                           HPAD=triton.next_power_of_2(hidden), ADD=delta is not None,
                           num_warps=4 if hidden <= 2048 else 8)
    return total, out


def rotary(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
           head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused q/k/v projection output [B, T, (H + 2 Hkv)·d] and cos/sin [B, T, d] -> q [B, H, T, d], k and v
    [B, Hkv, T, d] with q and k rotated (Hugging Face's rotate-half form); q and k are token-major in memory
    (views of [B, T, heads, d]), v a view of ``qkv``."""
    batch, length = int(qkv.shape[0]), int(qkv.shape[1])
    qkv = qkv.contiguous()
    q = torch.empty(batch, length, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(batch, length, kv_heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    cos, sin = cos.to(qkv.dtype).contiguous(), sin.to(qkv.dtype).contiguous()
    _rotary[(batch * length,)](qkv, cos, sin, q, k, length, HQ=heads, HKV=kv_heads, D=head_dim,
                               HEADS_PAD=triton.next_power_of_2(heads + kv_heads), num_warps=4)
    v = qkv[..., (heads + kv_heads) * head_dim:].view(batch, length, kv_heads, head_dim)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
