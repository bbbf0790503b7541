"""Skinny matmuls (decode: 1–8 rows against a weight matrix) with a Triton kernel where it beats cuBLAS.

Why: a decode step reads every weight once, so its time is the weight bytes over the bandwidth the GEMV kernels
reach. On an H200 cuBLAS reached 4.0 TB/s on LLaVA-7B's gate/up projection but ~3.2 TB/s on down (K = 11,008) and
the o projection, which it splits into split-K kernels plus a reduce (docs/benchmarks.md, decode profile). Two kernel
forms stream ``BLOCK_N`` weight rows per program over all of K with a pipelined loop, accumulating in fp32: ``dot``
(one tensor-core dot per tile, rows padded to 16) and ``rows`` (one row of x: products summed in registers, no
padding, no shared memory).

Which kernel runs is measured, not assumed: the first call with a given shape times cuBLAS and the kernel's
configurations on the device, in a captured CUDA graph with the L2 cache flushed before each call, as a decode step
runs them (:mod:`apet.kernels.device_timing`), and keeps the fastest (:func:`choice`), before any CUDA graph is
captured. So the kernel never makes a projection slower than ``F.linear``. Off CUDA, in fp32, or above ``MAX_ROWS``
rows, calls are plain ``F.linear``. Under ``torch.compile`` the choice runs as the custom op
``apet::skinny_linear`` (opaque to Inductor, as cuBLAS is).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apet import switches
from apet.kernels.device_timing import ColdTimer

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

log = logging.getLogger(__name__)

MAX_ROWS = 16  # rows of x (batch x tokens) up to which the kernel is considered: one 16-row dot tile


@dataclass(frozen=True)
class Config:
    block_n: int
    block_k: int
    warps: int
    stages: int
    form: str = "dot"  # "dot" (any rows up to MAX_ROWS) or "rows" (one row of x)

    def fits(self, rows: int) -> bool:
        """Whether the dispatcher times this configuration for ``rows`` rows of x: the rows form for one row, the
        dot form for more. In the H200 sweep the rows form won every one-row projection and the dot form every
        four-row one; timing only those halves the first run's Triton compilations (each shape compiles every
        candidate once)."""
        return (self.form == "rows") == (rows == 1)


# Chosen from scripts/gpu_gemv.py --sweep on an H200 (docs/benchmarks/h200-decode/gemv_sweep.json): for every
# LLaVA-1.5-7B and Qwen2.5-VL-7B decode projection, rows 1 and 4, the sweep's best is here, within 2% of one here,
# or slower than cuBLAS.
CONFIGS = (Config(32, 128, 4, 4), Config(32, 256, 4, 4), Config(32, 512, 4, 4), Config(32, 128, 4, 6),
           Config(64, 128, 4, 5), Config(64, 128, 8, 3),
           Config(4, 512, 4, 3, "rows"), Config(8, 512, 4, 3, "rows"), Config(16, 512, 4, 4, "rows"),
           Config(4, 1024, 4, 3, "rows"), Config(8, 1024, 4, 2, "rows"))
CUBLAS = None  # the choice that means F.linear

_choices: dict[tuple, Config | None] = {}
_kernel_choices: dict[tuple, Config | None] = {}  # the fastest configuration of the kernel, cuBLAS aside
ENABLED = {"value": switches.enabled("APET_GEMV")}


if triton is not None:

    @triton.jit
    def dot_tile(x_ptr, w_ptr, M, N, stride_xm, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The dot form's indices: this program's BLOCK_N weight rows and x's rows as one 16-row tile (the rows
        past M masked), and the pointers to both (also :mod:`apet.kernels.fused_gemv`'s folded dot form)."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, 16)
        rk = tl.arange(0, BLOCK_K)
        return rn, rm, rk, rn < N, rm < M, w_ptr + rn[:, None] * stride_wn, x_ptr + rm[:, None] * stride_xm

    @triton.jit
    def _skinny_matmul(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
                       HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        rn, rm, rk, n_ok, m_ok, w_rows, x_rows = dot_tile(x_ptr, w_ptr, M, N, stride_xm, stride_wn, BLOCK_N, BLOCK_K)
        acc = tl.zeros([16, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            k = k0 + rk
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
            else:
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc)
        if HAS_BIAS:
            acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _row_gemv(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_wn, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        w_rows = w_ptr + rn[:, None] * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            k = k0 + rk
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
                x = tl.load(x_ptr + k)
            else:
                k_ok = k < K
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_ptr + k, mask=k_ok, other=0.0)
            acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


def kernel_matmul(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, config: Config) -> torch.Tensor:
    """x2 [M <= 16, K] @ weight [N, K]ᵀ (+ bias) with the Triton kernel."""
    rows, depth = x2.shape
    out_features = weight.shape[0]
    y = torch.empty(rows, out_features, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(out_features, config.block_n),)
    if config.form == "rows":
        if rows != 1:
            raise ValueError(f"the rows form takes one row of x, not {rows}")
        _row_gemv[grid](x2, weight, bias if bias is not None else weight, y, out_features, depth, weight.stride(0),
                        HAS_BIAS=bias is not None, EVEN_K=depth % config.block_k == 0, BLOCK_N=config.block_n,
                        BLOCK_K=config.block_k, STAGES=config.stages, num_warps=config.warps)
        return y
    _skinny_matmul[grid](x2, weight, bias if bias is not None else weight, y, rows, out_features, depth,
                         x2.stride(0), weight.stride(0), y.stride(0), HAS_BIAS=bias is not None,
                         EVEN_K=depth % config.block_k == 0, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                         STAGES=config.stages, num_warps=config.warps)
    return y


def _eligible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (ENABLED["value"] and triton is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and weight.stride(-1) == 1 and x.numel() // x.shape[-1] <= MAX_ROWS)


def shape_key(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
    """What a timed choice is valid for: the shapes, the weight's row stride, a bias or not, dtype and device."""
    return key_of(tuple(x2.shape), tuple(weight.shape), weight.stride(0), bias is not None, x2.dtype, x2.device)


def key_of(rows_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: int, has_bias: bool,
           dtype: torch.dtype, device: torch.device) -> tuple:
    """:func:`shape_key` from its parts (what Dynamo passes as constants, :func:`apet.kernels.fused_gemv.folds`)."""
    return (tuple(rows_shape), tuple(weight_shape), int(stride), bool(has_bias), dtype, device)


def choice(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Config | None:
    """The fastest of cuBLAS and the kernel's configurations for this shape, measured once per shape on the device
    (cold L2, inside a CUDA graph)."""
    key = shape_key(x2, weight, bias)
    if key in _choices:
        return _choices[key]
    if torch.cuda.is_current_stream_capturing():  # no timing inside a capture: cuBLAS until measured
        return CUBLAS
    timer = ColdTimer(x2.device)  # its flush buffer (twice the L2) lives only while this shape is timed
    timings = {CUBLAS: timer.ms(lambda: F.linear(x2, weight, bias))}
    for config in CONFIGS:
        if not config.fits(x2.shape[0]):
            continue
        try:
            timings[config] = timer.ms(lambda c=config: kernel_matmul(x2, weight, bias, c))
        except Exception as exc:  # a configuration that does not compile on this GPU is not a candidate
            log.debug("skinny matmul %s failed: %s", config, exc)
    best = min(timings, key=timings.get)
    kernels = [config for config in timings if config is not CUBLAS]
    _kernel_choices[key] = min(kernels, key=timings.get) if kernels else None
    log.debug("skinny matmul %s x %s: %s (%.1f us; cuBLAS %.1f us)", tuple(x2.shape), tuple(weight.shape), best,
              timings[best] * 1e3, timings[CUBLAS] * 1e3)
    _choices[key] = best
    return best


def kernel_choice(x2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Config | None:
    """The fastest configuration of the kernel for this shape even where cuBLAS won (the fused kernels of
    :mod:`apet.kernels.fused_gemv` stream the same weight rows, and save launches cuBLAS cannot); None inside a
    capture before the shape was timed, or where no configuration compiled."""
    key = shape_key(x2, weight, bias)
    if key not in _kernel_choices:
        choice(x2, weight, bias)
    return _kernel_choices.get(key)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` that takes the Triton kernel for skinny CUDA inputs where it measured faster (under
    ``torch.compile`` through the custom op ``apet::skinny_linear``, decided when it first runs)."""
    if not _eligible(x, weight):
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        return skinny_linear(x, weight, bias)
    return _skinny_linear(x, weight, bias)


def _skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    picked = choice(x2, weight, bias)
    if picked is CUBLAS:
        return F.linear(x, weight, bias)
    return kernel_matmul(x2, weight, bias, picked).reshape(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("apet::skinny_linear", mutates_args=())
def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`linear` for a skinny CUDA input as one opaque op (what ``torch.compile`` calls)."""
    return _skinny_linear(x, weight, bias)


@skinny_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])
