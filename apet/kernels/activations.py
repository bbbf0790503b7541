"""MLP activations in one pass (Triton) for the vision towers' uncompiled GPU fast path.

Why: eagerly, ``silu(gate) * up`` (a gated MLP) is two passes over the [P, F] intermediate and
``x * sigmoid(1.702 x)`` (quick_gelu) three; each is a full read and write of the widest activation of the
block. One program per row computes them in fp32 registers and writes the result once. torch.compile fuses the same
torch ops by itself, so the compiled path keeps them (:func:`available` is False while compiling). The values are
the torch ops' up to rounding: fp32 inside, one rounding to the output dtype at the end.
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

BLOCK = 1024


def is_silu(act: object) -> bool:
    """Whether a Hugging Face activation module is SiLU (``nn.SiLU`` or transformers' ``SiLUActivation``): what
    :func:`silu_mul` computes."""
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def available(x: torch.Tensor) -> bool:
    """CUDA (or TRITON_INTERPRET on CPU), Triton importable, not inside a torch.compile trace, rows contiguous."""
    if triton is None or torch.compiler.is_compiling() or x.stride(-1) != 1:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _silu_mul(gate_up_ptr, out_ptr, row_stride, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < WIDTH
        gate = tl.load(gate_up_ptr + row * row_stride + offs, mask=valid, other=0.0).to(tl.float32)
        up = tl.load(gate_up_ptr + row * row_stride + WIDTH + offs, mask=valid, other=0.0).to(tl.float32)
        out = gate / (1.0 + tl.exp(-gate)) * up
        tl.store(out_ptr + row * WIDTH + offs, out.to(out_ptr.dtype.element_ty), mask=valid)

    @triton.jit
    def _quick_gelu(x_ptr, out_ptr, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        valid = offs < WIDTH
        x = tl.load(x_ptr + row * WIDTH + offs, mask=valid, other=0.0).to(tl.float32)
        out = x / (1.0 + tl.exp(-1.702 * x))
        tl.store(out_ptr + row * WIDTH + offs, out.to(out_ptr.dtype.element_ty), mask=valid)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2F] (gate, then up; rows contiguous) -> silu(gate) · up, [..., F]."""
    width = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * width)
    out = torch.empty(*gate_up.shape[:-1], width, dtype=gate_up.dtype, device=gate_up.device)
    _silu_mul[(rows.shape[0], triton.cdiv(width, BLOCK))](rows, out, rows.stride(0), WIDTH=width, BLOCK=BLOCK)
    return out


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x · sigmoid(1.702 x) (quick_gelu) of a contiguous tensor."""
    width = x.shape[-1]
    rows = x.reshape(-1, width)
    out = torch.empty_like(x)
    _quick_gelu[(rows.shape[0], triton.cdiv(width, BLOCK))](rows, out, WIDTH=width, BLOCK=BLOCK)
    return out
