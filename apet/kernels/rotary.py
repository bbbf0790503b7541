"""Rotary position embedding of q and k in one pass (Triton), for the vision towers' uncompiled GPU fast path.

Why: in fp32 as Hugging Face computes it, rotating q and k costs four to six elementwise passes over [P, 2·C] with
fp32 intermediates (a rolled copy, two products, a sum, the cast back): ~0.6 GB of traffic per block at a 1344²
image, about as long as the block's attention projection. One program per token reads its q and k once from the
qkv projection's output (fp16), rotates them in fp32 registers and writes fp16. torch.compile fuses the same
torch ops by itself, so the compiled path keeps them (:func:`available` is False while compiling).

Same values as ``x · cos + rotate_half(x) · sin`` in fp32 with ``sin`` sign-folded (``rotate_half(x) = roll(x,
d/2) · (-1 | +1)``), up to the fused multiply-add's last bit (``tests/test_fast_towers.py`` runs it under
TRITON_INTERPRET on CPU; scripts/gpu_towers.py on the GPU).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None


def available(x: torch.Tensor) -> bool:
    """Whether :func:`rotate_qk` runs for ``x``: CUDA (or TRITON_INTERPRET on CPU), Triton importable, and not
    inside a torch.compile trace (inductor fuses the torch form there)."""
    if triton is None or torch.compiler.is_compiling():
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _rotary_qk(x_ptr, cos_ptr, sin_ptr, out_ptr, patches, x_row_stride,
                   HEAD: tl.constexpr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)  # image · patches + patch
        patch = row % patches
        offs = tl.arange(0, BLOCK)
        valid = offs < WIDTH
        i = offs % HEAD
        partner = offs - i + (i + HEAD // 2) % HEAD  # roll by half a head
        base = x_ptr + row.to(tl.int64) * x_row_stride
        x = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
        rolled = tl.load(base + partner, mask=valid, other=0.0).to(tl.float32)
        cos = tl.load(cos_ptr + patch * HEAD + i, mask=valid, other=0.0)
        sin = tl.load(sin_ptr + patch * HEAD + i, mask=valid, other=0.0)
        out = x * cos + rolled * sin
        tl.store(out_ptr + row.to(tl.int64) * WIDTH + offs, out.to(out_ptr.dtype.element_ty), mask=valid)


def rotate_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """qkv [B, P, 3, heads, d] (the projection's output; rows contiguous), cos and sign-folded sin [P, d] float32
    -> rotated q and k [B, P, 2, heads, d] in ``dtype``."""
    batch, patches, _, heads, head = qkv.shape
    rows = qkv.reshape(batch * patches, -1)  # a view: the projection's output is row-major
    width = 2 * heads * head
    out = torch.empty(batch, patches, 2, heads, head, dtype=dtype, device=qkv.device)
    _rotary_qk[(batch * patches,)](rows, cos.contiguous(), sin.contiguous(), out, patches, rows.stride(0),
                                   HEAD=head, WIDTH=width, BLOCK=triton.next_power_of_2(width))
    return out
