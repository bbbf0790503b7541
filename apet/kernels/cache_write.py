"""A prefill's keys or values written into the static cache (Triton), for the uncompiled GPU fast path.

Why: the prefill's k and v arrive token-major ([B, T, H, d] in memory: the rotary kernel's output, a view of the
q/k/v projection) and the cache is head-major ([B, H, C, d]). ``cache[:, :, :T] = k`` is then a copy whose source and
destination strides differ in every dimension but the last, and torch runs it in its generic element-wise kernel
(per-element offset arithmetic, no vector loads): at LLaVA-NeXT-7B's 2,968-token prompt each such copy took 39 µs
of a 24 MB tensor, 2.5 of the prefill's 70.6 ms on the H200 (docs/benchmarks.md, "Prefill attention"). Here one
program copies a block of whole head rows (d contiguous elements) with vector loads: 13.4 µs a copy (the bytes take
11.5), the prefill 0.8 ms faster (docs/benchmarks.md, "Prefill levers timed"; :data:`ENABLED`). Under
``torch.compile`` the assignment stays: Inductor writes the cache inside its rotary kernel.

Bit-exact: a copy (``tests/test_decoder_fused.py``, Triton's interpreter on CPU, the kernel on a GPU).
"""

from __future__ import annotations

import torch

from apet import switches
from apet.kernels import decoder_fused

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None

BLOCK_T = 16  # head rows per program
# on since timed on the H200 (docs/benchmarks.md, "Prefill levers timed"); ``APET_CACHE_WRITE=0``
# (scripts/gpu_profile.py ``:cacheassign``): torch's assignment, as before
ENABLED = {"value": switches.enabled("APET_CACHE_WRITE")}


def available(values: torch.Tensor) -> bool:
    """Whether :func:`write_rows` takes the kernel for ``values``: where the decoder's other kernels run
    (:func:`apet.kernels.decoder_fused.available`), not inside a ``torch.compile`` trace."""
    return ENABLED["value"] and decoder_fused.available(values) and not torch.compiler.is_compiling()


if triton is not None:

    @triton.jit
    def _copy_rows(src_ptr, dst_ptr, T, H, src_b, src_h, src_t, dst_b, dst_h, dst_t,
                   D: tl.constexpr, DPAD: tl.constexpr, BLOCK: tl.constexpr):
        block, head_row = tl.program_id(0), tl.program_id(1)  # head_row = b * H + h
        b, h = head_row // H, head_row % H
        t = block * BLOCK + tl.arange(0, BLOCK)
        d = tl.arange(0, DPAD)
        inside = (t < T)[:, None] & (d < D)[None, :]
        src = src_ptr + b.to(tl.int64) * src_b + h * src_h + t[:, None].to(tl.int64) * src_t + d[None, :]
        dst = dst_ptr + b.to(tl.int64) * dst_b + h * dst_h + t[:, None].to(tl.int64) * dst_t + d[None, :]
        tl.store(dst, tl.load(src, mask=inside), mask=inside)


def write_rows(cache: torch.Tensor, values: torch.Tensor, start: int) -> None:
    """``cache[:, :, start:start + T] = values`` for a cache [B, H, C, d] and values [B, H, T, d] of any strides
    whose last dimension is contiguous (the kernel where :func:`available`, else torch's assignment)."""
    batch, heads, length, dim = values.shape
    if not available(values) or values.stride(-1) != 1 or cache.stride(-1) != 1 or length == 0:
        cache[:, :, start:start + length] = values
        return
    target = cache[:, :, start:]
    grid = (triton.cdiv(length, BLOCK_T), batch * heads)
    _copy_rows[grid](values, target, length, heads, values.stride(0), values.stride(1), values.stride(2),
                     target.stride(0), target.stride(1), target.stride(2), D=dim,
                     DPAD=triton.next_power_of_2(dim), BLOCK=BLOCK_T, num_warps=4)
