"""Attention of one new token per row over a static KV cache's span, in Triton (flash-decoding).

Why: a decode step attends 1 query row per head over a few hundred cached positions. PyTorch's SDPA runs that as a
prefill kernel (cuDNN's 64-row tiles for 1 row): ~7.9 µs a layer for LLaVA-1.5-7B on an H200 and ~23 µs for
Qwen2.5-VL-7B, whose 4 kv heads give the GPU 4 blocks of work (``docs/benchmarks.md``, decode profile). Here each
kv head's query heads form one tile (the cache is read once per kv head, as :func:`grouped_decode_attention` does),
and the span is split over enough programs to fill the GPU; a second small kernel combines the splits'
softmax partials. Same arithmetic as FlashAttention: scores in float32 with scale 1/sqrt(d), the additive bias
(0 or the dtype's minimum) added, an online softmax, probabilities rounded to the cache's dtype for the product
with the values, float32 accumulation, one rounding of the output.

Under ``torch.compile`` it is the custom op ``apet::decode_attention`` (opaque to Inductor, as SDPA's kernel is).
``APET_DECODE_ATTENTION=0`` in the environment keeps SDPA (to compare: ``scripts/gpu_profile.py``'s ``sdpa`` flag).
"""

from __future__ import annotations

import os

import torch

from apet import switches
from apet.kernels import dependent_launch

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None

BLOCK_T = 64  # cached positions per tile
ENABLED = {"value": switches.enabled("APET_DECODE_ATTENTION")}


def available(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """CUDA (or Triton's interpreter on CPU), Triton importable, a power-of-two head size of at least 16, the
    query and cache in one float dtype, and not being exported to ONNX (the graph keeps SDPA)."""
    if triton is None or not ENABLED["value"] or torch.onnx.is_in_onnx_export():
        return False
    dim = int(q.shape[-1])
    on_device = q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"
    return (on_device and q.dtype == keys.dtype and q.dtype in (torch.float16, torch.bfloat16, torch.float32)
            and dim >= 16 and dim & (dim - 1) == 0)


def splits_for(programs: int, span: int, units: int) -> int:
    """How many parts the span is cut into: enough programs to cover ``units`` (the GPU's multiprocessors), one
    tile of positions at least per part, and no split at all once the kv heads alone fill half the GPU."""
    if programs * 2 >= units:
        return 1
    return max(1, min(triton.cdiv(units, programs), triton.cdiv(span, BLOCK_T)))


if triton is not None:

    @triton.jit
    def _partial(q_ptr, k_ptr, v_ptr, bias_ptr, out_ptr, m_ptr, l_ptr, span, chunk, kv_heads, scale,
                 stride_qb, stride_qh, stride_ob, stride_oh, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh,
                 stride_vt, stride_bias, GROUPS: tl.constexpr, ROWS: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                 SPLITS: tl.constexpr, IEEE: tl.constexpr, PDL: tl.constexpr):
        pair = tl.program_id(0)  # b * kv_heads + kv head
        part = tl.program_id(1)
        if PDL:  # q and the cache are the previous kernels' writes (apet.kernels.dependent_launch)
            tl.extra.cuda.gdc_wait()
        b = pair // kv_heads
        head = pair % kv_heads
        rows = tl.arange(0, ROWS)
        dims = tl.arange(0, D)
        row_ok = rows < GROUPS
        heads = (head * GROUPS + rows)[:, None]
        q = tl.load(q_ptr + b * stride_qb + heads * stride_qh + dims[None, :], mask=row_ok[:, None], other=0.0)
        keys = k_ptr + b * stride_kb + head * stride_kh
        values = v_ptr + b * stride_vb + head * stride_vh
        m = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, D], tl.float32)
        start = part * chunk
        stop = tl.minimum(start + chunk, span)
        for t0 in tl.range(start, stop, BLOCK):
            t = t0 + tl.arange(0, BLOCK)
            t_ok = t < stop
            k = tl.load(keys + t[:, None] * stride_kt + dims[None, :], mask=t_ok[:, None], other=0.0)
            v = tl.load(values + t[:, None] * stride_vt + dims[None, :], mask=t_ok[:, None], other=0.0)
            if IEEE:
                scores = tl.dot(q, tl.trans(k), input_precision="ieee")
            else:
                scores = tl.dot(q, tl.trans(k))
            bias = tl.load(bias_ptr + b * stride_bias + t, mask=t_ok, other=0.0).to(tl.float32)
            scores = scores * scale + bias[None, :]
            scores = tl.where(t_ok[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            total = total * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        if PDL:  # the next kernel may start
            tl.extra.cuda.gdc_launch_dependents()
        if SPLITS == 1:  # the whole span in this program: the output, normalised
            out = acc / total[:, None]
            tl.store(out_ptr + b * stride_ob + heads * stride_oh + dims[None, :], out.to(out_ptr.dtype.element_ty),
                     mask=row_ok[:, None])
        else:  # this part's softmax partials, combined by _combine
            slot = (pair * SPLITS + part) * ROWS + rows
            tl.store(m_ptr + slot, m)
            tl.store(l_ptr + slot, total)
            tl.store(out_ptr + slot[:, None] * D + dims[None, :], acc)

    @triton.jit
    def _combine(part_ptr, m_ptr, l_ptr, out_ptr, kv_heads, stride_ob, stride_oh, GROUPS: tl.constexpr,
                 ROWS: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr,
                 PDL: tl.constexpr):
        pair = tl.program_id(0)
        row = tl.program_id(1)
        if PDL:
            tl.extra.cuda.gdc_wait()
        b = pair // kv_heads
        head = pair % kv_heads
        parts = tl.arange(0, SPLITS_PAD)
        dims = tl.arange(0, D)
        part_ok = parts < SPLITS
        slot = (pair * SPLITS + parts) * ROWS + row
        m = tl.load(m_ptr + slot, mask=part_ok, other=float("-inf"))
        total = tl.load(l_ptr + slot, mask=part_ok, other=0.0)
        acc = tl.load(part_ptr + slot[:, None] * D + dims[None, :], mask=part_ok[:, None], other=0.0)
        if PDL:  # the next kernel may load its weights
            tl.extra.cuda.gdc_launch_dependents()
        top = tl.max(m, axis=0)
        weight = tl.where(part_ok, tl.exp(m - top), 0.0)  # a part with no positions has m = -inf: weight 0
        out = tl.sum(acc * weight[:, None], axis=0) / tl.sum(total * weight, axis=0)
        tl.store(out_ptr + b * stride_ob + (head * GROUPS + row) * stride_oh + dims, out.to(out_ptr.dtype.element_ty))


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # Triton's interpreter: a few parts, so the split and combine run in the tests


def _run(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    kv_heads, span = int(keys.shape[1]), int(keys.shape[2])
    groups = heads // kv_heads
    rows = max(16, triton.next_power_of_2(groups))  # tl.dot's smallest tile
    q3 = q.reshape(batch, heads, dim)
    if q3.stride(-1) != 1:
        q3 = q3.contiguous()
    bias2 = bias.reshape(bias.shape[0], span)
    if bias2.stride(-1) != 1:
        bias2 = bias2.contiguous()
    bias_stride = bias2.stride(0) if bias2.shape[0] > 1 else 0  # a bias shared by every row
    out = torch.empty(batch, heads, dim, dtype=q.dtype, device=q.device)
    pairs = batch * kv_heads
    splits = splits_for(pairs, span, _multiprocessors(q.device))
    chunk = triton.cdiv(triton.cdiv(span, splits), BLOCK_T) * BLOCK_T
    ieee = q.dtype == torch.float32
    strides = (keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2))
    scale = dim ** -0.5
    pdl = dependent_launch.applies(q.device)
    launch = dependent_launch.launch
    if splits == 1:
        launch(_partial, (pairs, 1), q3, keys, values, bias2, out, out, out, span, chunk, kv_heads, scale,
               q3.stride(0), q3.stride(1), out.stride(0), out.stride(1), *strides, bias_stride, pdl=pdl,
               GROUPS=groups, ROWS=rows, D=dim, BLOCK=BLOCK_T, SPLITS=1, IEEE=ieee, num_warps=4)
        return out.view(batch, heads, 1, dim)
    partial = torch.empty(pairs * splits * rows, dim, dtype=torch.float32, device=q.device)
    m = torch.empty(pairs * splits * rows, dtype=torch.float32, device=q.device)
    total = torch.empty_like(m)
    launch(_partial, (pairs, splits), q3, keys, values, bias2, partial, m, total, span, chunk, kv_heads, scale,
           q3.stride(0), q3.stride(1), 0, 0, *strides, bias_stride, pdl=pdl, GROUPS=groups, ROWS=rows, D=dim,
           BLOCK=BLOCK_T, SPLITS=splits, IEEE=ieee, num_warps=4)  # out: the parts' own
    launch(_combine, (pairs, groups), partial, m, total, out, kv_heads, out.stride(0), out.stride(1), pdl=pdl,
           GROUPS=groups, ROWS=rows, D=dim, SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits), num_warps=4)
    return out.view(batch, heads, 1, dim)


@torch.library.custom_op("apet::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """q [B, H, 1, d] over keys/values [B, Hkv, T, d] (views of the static cache's span; H a multiple of Hkv) with
    the additive ``bias`` [B or 1, 1, 1, T] -> [B, H, 1, d]: what ``scaled_dot_product_attention`` gives with each kv
    head's query heads as its rows."""
    return _run(q, keys, values, bias)


@decode_attention.register_fake
def _(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return q.new_empty(q.shape)
