"""A decode layer's skinny matmuls (1 to :data:`MAX_ROWS` rows) with their neighbours folded in: RMSNorm before a
projection, silu(gate)·up after the gate/up projection, the residual add after the o and down projections.

Why: at batch 1 a decode layer was ~12 kernels around 4 weight reads (norm, q/k/v, rotary, two cache writes, two
attention kernels, o, norm, gate/up, silu·mul, down, residual add), and on the H200 every kernel boundary costs
0.2–1.2 µs of idle GPU besides the small kernels' own time (docs/benchmarks.md, "Decode's matmuls timed as decode runs
them"). Each fold here removes a kernel and a round trip of the activation through memory: a layer becomes norm+q/k/v,
rotary, cache writes, attention, o+residual, norm+gate/up+silu·mul, down+residual.

Each program of both forms of :mod:`apet.kernels.gemv` (``rows`` for one row, ``dot`` for a batch's rows as one
tensor-core tile) already reads all of x, so it can normalise x itself: it sums x² over each whole row first (x is a
few KB, in L2), then streams its weight rows. Same roundings as the
unfused fast path: the norm is :func:`apet.kernels.decoder_fused.add_rms_norm`'s (float32 statistics, the normalised
row rounded to the input dtype, then the weight product rounded), silu·mul is
:func:`apet.kernels.activations.silu_mul`'s (gate and up rounded as the projection stores them, then one float32
pass), and the residual add is torch's (the projection rounded, then the sum rounded). Results equal the unfused
kernels' up to the order of the norm's float32 sum (``tests/test_fused_gemv.py``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import torch

from apet import switches
from apet.kernels import activations, decoder_fused, dependent_launch, gemv
from apet.kernels.device_timing import ColdTimer

try:  # Triton ships with CUDA builds of torch
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None
    tl = None

log = logging.getLogger(__name__)
ENABLED = {"value": switches.enabled("APET_FUSED_GEMV")}  # 0: the norms and adds stay their own kernels


if triton is not None:

    @triton.jit
    def _weights(w_rows, up_offset, k, K, n_ok, SILU: tl.constexpr, EVEN_K: tl.constexpr):
        """A tile of the program's weight rows (and of the paired up rows)."""
        mask = n_ok[:, None] if EVEN_K else n_ok[:, None] & (k < K)[None, :]
        w = tl.load(w_rows + k[None, :], mask=mask, other=0.0)
        up = w
        if SILU:
            up = tl.load(w_rows + up_offset + k[None, :], mask=mask, other=0.0)
        return w, up

    @triton.jit
    def _activation(x_ptr, norm_ptr, k, K, inv, NORM: tl.constexpr, EVEN_K: tl.constexpr):
        """A chunk of x; with NORM normalised and rounded, then times the norm's weight and rounded, as the norm
        kernel stores it."""
        if EVEN_K:
            x = tl.load(x_ptr + k)
        else:
            x = tl.load(x_ptr + k, mask=k < K, other=0.0)
        if NORM:
            x = (x.to(tl.float32) * inv).to(x.dtype)
            scale = tl.load(norm_ptr + k, mask=k < K, other=0.0)
            x = (scale.to(tl.float32) * x.to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _fused_row_gemv(x_ptr, norm_ptr, w_ptr, b_ptr, res_ptr, y_ptr, N, K, up_rows, stride_wn, eps,
                        NORM: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr, RESIDUAL: tl.constexpr,
                        EVEN_K: tl.constexpr, KPAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        STAGES: tl.constexpr, PDL: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_ok = rn < N
        w_rows = w_ptr + rn[:, None] * stride_wn
        up_offset = up_rows * stride_wn
        # the first weight tile depends on no earlier kernel: its loads are in flight during the norm (and, launched
        # dependent, while the previous kernel finishes)
        w, up = _weights(w_rows, up_offset, rk, K, n_ok, SILU, EVEN_K)
        if PDL:  # x, the residual and the output buffer belong to earlier kernels: wait for them to finish
            tl.extra.cuda.gdc_wait()
        inv = 1.0
        if NORM:  # the row's RMS first: every program reads all of x anyway
            cols = tl.arange(0, KPAD)
            whole = tl.load(x_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt(tl.sum(whole * whole, axis=0) / K + eps)
        x = _activation(x_ptr, norm_ptr, rk, K, inv, NORM, EVEN_K).to(tl.float32)[None, :]
        acc = w.to(tl.float32) * x
        acc_up = up.to(tl.float32) * x
        for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
            k = k0 + rk
            w, up = _weights(w_rows, up_offset, k, K, n_ok, SILU, EVEN_K)
            x = _activation(x_ptr, norm_ptr, k, K, inv, NORM, EVEN_K).to(tl.float32)[None, :]
            acc += w.to(tl.float32) * x
            if SILU:
                acc_up += up.to(tl.float32) * x
        if PDL:  # the next kernel may start loading its weights
            tl.extra.cuda.gdc_launch_dependents()
        y = tl.sum(acc, axis=1)
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if SILU:  # gate and up rounded as the projection would store them, then silu(gate)·up in float32
            up_y = tl.sum(acc_up, axis=1)
            if HAS_BIAS:
                up_y += tl.load(b_ptr + up_rows + rn, mask=n_ok, other=0.0).to(tl.float32)
            gate = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = gate / (1.0 + tl.exp(-gate)) * up_y.to(y_ptr.dtype.element_ty).to(tl.float32)
        if RESIDUAL:  # the projection rounded, then the sum rounded: torch's ``residual + proj(x)``
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + tl.load(res_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _activation_rows(x_rows, norm_ptr, k, K, m_ok, inv, NORM: tl.constexpr, EVEN_K: tl.constexpr):
        """A [16, BLOCK_K] tile of x's rows (padding rows zero); with NORM each row normalised and rounded, then
        times the norm's weight and rounded, as the norm kernel stores it."""
        if EVEN_K:
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
        else:
            x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
        if NORM:
            x = (x.to(tl.float32) * inv[:, None]).to(x.dtype)
            scale = tl.load(norm_ptr + k, mask=k < K, other=0.0)
            x = (scale.to(tl.float32)[None, :] * x.to(tl.float32)).to(x.dtype)
        return x

    @triton.jit
    def _fused_dot_gemv(x_ptr, norm_ptr, w_ptr, b_ptr, res_ptr, y_ptr, M, N, K, up_rows, stride_xm, stride_wn,
                        stride_rm, stride_ym, eps, NORM: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                        RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, STAGES: tl.constexpr, PDL: tl.constexpr):
        """The dot form (:func:`apet.kernels.gemv._skinny_matmul`: 2–16 rows of x as one tensor-core tile) with the
        same folds as :func:`_fused_row_gemv`: each program sums x² of every row over K before its weight rows."""
        rn, rm, rk, n_ok, m_ok, w_rows, x_rows = gemv.dot_tile(x_ptr, w_ptr, M, N, stride_xm, stride_wn, BLOCK_N,
                                                               BLOCK_K)
        up_offset = up_rows * stride_wn
        w, up = _weights(w_rows, up_offset, rk, K, n_ok, SILU, EVEN_K)  # in flight during the wait and the norm
        if PDL:
            tl.extra.cuda.gdc_wait()
        inv = tl.full([16], 1.0, tl.float32)
        if NORM:  # each row's RMS first, over K in tiles
            squares = tl.zeros([16], dtype=tl.float32)
            for k0 in tl.range(0, K, BLOCK_K):
                k = k0 + rk
                part = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
                part = part.to(tl.float32)
                squares += tl.sum(part * part, axis=1)
            inv = 1.0 / tl.sqrt(squares / K + eps)
        x = _activation_rows(x_rows, norm_ptr, rk, K, m_ok, inv, NORM, EVEN_K)
        acc = tl.dot(x, tl.trans(w))
        acc_up = acc
        if SILU:
            acc_up = tl.dot(x, tl.trans(up))
        for k0 in tl.range(BLOCK_K, K, BLOCK_K, num_stages=STAGES):
            k = k0 + rk
            w, up = _weights(w_rows, up_offset, k, K, n_ok, SILU, EVEN_K)
            x = _activation_rows(x_rows, norm_ptr, k, K, m_ok, inv, NORM, EVEN_K)
            acc = tl.dot(x, tl.trans(w), acc)
            if SILU:
                acc_up = tl.dot(x, tl.trans(up), acc_up)
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
        y = acc
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        if SILU:
            up_y = acc_up
            if HAS_BIAS:
                up_y += tl.load(b_ptr + up_rows + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            gate = y.to(y_ptr.dtype.element_ty).to(tl.float32)
            y = gate / (1.0 + tl.exp(-gate)) * up_y.to(y_ptr.dtype.element_ty).to(tl.float32)
        out_ok = m_ok[:, None] & n_ok[None, :]
        if RESIDUAL:
            residual = tl.load(res_ptr + rm[:, None] * stride_rm + rn[None, :], mask=out_ok, other=0.0)
            y = y.to(y_ptr.dtype.element_ty).to(tl.float32) + residual.to(tl.float32)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], y.to(y_ptr.dtype.element_ty), mask=out_ok)


def _launch(x: torch.Tensor, weight: torch.Tensor, config: gemv.Config, out_features: int, *,
            norm: tuple[torch.Tensor, float] | None = None, bias: torch.Tensor | None = None,
            up_rows: int = 0, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of x [..., K] through the fused kernel (one row: the rows form; up to :data:`MAX_ROWS`: the dot
    form), ``config.block_n`` outputs per program; ``up_rows`` > 0: silu(rows n)·(rows n + up_rows)."""
    depth = int(x.shape[-1])
    rows = x.numel() // depth
    x2 = x.reshape(rows, depth)  # the dot form reads rows at any stride (the prefill's last rows, h[:, -1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(*x.shape[:-1], out_features, dtype=x.dtype, device=x.device)
    res2 = residual.reshape(rows, out_features).contiguous() if residual is not None else weight
    norm_weight, eps = norm if norm is not None else (weight, 0.0)
    grid = (triton.cdiv(out_features, config.block_n),)
    flags = dict(pdl=dependent_launch.applies(x.device), NORM=norm is not None, HAS_BIAS=bias is not None,
                 SILU=up_rows > 0, RESIDUAL=residual is not None, EVEN_K=depth % config.block_k == 0,
                 BLOCK_N=config.block_n, BLOCK_K=config.block_k, STAGES=config.stages, num_warps=config.warps)
    buffers = (x2, norm_weight, weight, bias if bias is not None else weight, res2, y)
    if rows == 1:
        dependent_launch.launch(_fused_row_gemv, grid, *buffers, out_features, depth, up_rows, weight.stride(0), eps,
                                KPAD=triton.next_power_of_2(depth), **flags)
    else:
        dependent_launch.launch(_fused_dot_gemv, grid, *buffers, rows, out_features, depth, up_rows, x2.stride(0),
                                weight.stride(0), out_features, out_features, eps, **flags)
    return y


def norm_linear_kernel(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                       bias: torch.Tensor | None, config: gemv.Config) -> torch.Tensor:
    """RMSNorm(x) @ weightᵀ (+ bias) for the rows of x: the input norm and the packed q/k/v projection."""
    return _launch(x, weight, config, int(weight.shape[0]), norm=(norm_weight, eps), bias=bias)


def norm_gate_up_silu_kernel(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                             config: gemv.Config) -> torch.Tensor:
    """silu(gate)·up of RMSNorm(x) for the rows of x, ``weight`` the packed [gate; up] rows (equal halves)."""
    half = int(weight.shape[0]) // 2
    return _launch(x, weight, config, half, norm=(norm_weight, eps), up_rows=half)


def linear_residual_kernel(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                           config: gemv.Config) -> torch.Tensor:
    """residual + x @ weightᵀ for the rows of x (the o and down projections)."""
    return _launch(x, weight, config, int(weight.shape[0]), residual=residual)


MAX_ROWS = 8  # rows of x folded at most: a decode step's batch (one 16-row dot tile holds them; more is a prefill)


def applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Up to :data:`MAX_ROWS` rows of a CUDA fp16/bf16 activation against a float weight of its dtype, the kernels
    enabled, not while exporting (Triton's interpreter on CPU, :func:`apet.kernels.decoder_fused.available`: float32
    too, for the tests)."""
    return (ENABLED["value"] and gemv.ENABLED["value"] and decoder_fused.available(x)
            and not (x.is_cuda and x.dtype == torch.float32) and x.numel() // x.shape[-1] <= MAX_ROWS
            and weight.dtype == x.dtype and weight.stride(-1) == 1 and not torch.onnx.is_in_onnx_export())


def folds(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the fold ``kind`` (``norm``, ``silu``, ``residual``) is taken for x's rows: :func:`applies`, and its
    timed choice for this shape (:func:`folded_choice`) not refused. A refused fold must leave its norm and adds to
    the caller's unfolded path (eager: the add+norm kernel; compiled: Inductor's fusions), not run them as separate
    kernels inside the fold's opaque op: on the H200 that cost Qwen2.5-VL's batch-4 step 50 kernels
    (docs/benchmarks.md, stop 38). Under ``torch.compile`` it is decided when Dynamo traces, from the choices timed
    so far (:func:`apet.runtime.compiled.compile_measured` runs a call eagerly before its trace); a shape not yet
    timed folds."""
    if not applies(x, weight):
        return False
    depth = int(x.shape[-1])
    return not _refused(kind, (x.numel() // depth, depth), tuple(weight.shape), int(weight.stride(0)),
                        bias is not None, x.dtype, x.device)


@torch.compiler.assume_constant_result
def _refused(kind: str, rows_shape: tuple[int, int], weight_shape: tuple[int, ...], stride: int, has_bias: bool,
             dtype: torch.dtype, device: torch.device) -> bool:
    """The timed choice of this shape is the unfused kernels (a constant for Dynamo: looked up when it traces)."""
    key = (kind, gemv.key_of(rows_shape, weight_shape, stride, has_bias, dtype, device))
    return key in _choices and _choices[key] is None


# outputs per program tried at most: the rows form holds BLOCK_N x BLOCK_K float32 partial sums, the dot form
# stages BLOCK_N x BLOCK_K weight tiles in shared memory (two with silu·up); a tensor-core dot needs at least 16
MAX_BLOCK_N = {"rows": 32, "dot": 64}
MIN_BLOCK_N = {"rows": 1, "dot": 16}
_choices: dict[tuple, gemv.Config | None] = {}


def _candidates(base: gemv.Config, silu: bool) -> list[gemv.Config]:
    """The skinny-matmul kernel's pick for the plain projection, with 1, 2 and 4 times its outputs per program (a
    gate/up program computes a gate and an up row per output: half the plain pick's outputs to start)."""
    start = max(MIN_BLOCK_N[base.form], base.block_n // 2) if silu else base.block_n
    return [dataclasses.replace(base, block_n=n) for n in (start, 2 * start, 4 * start)
            if n <= MAX_BLOCK_N[base.form]]


UNFUSED_MARGIN = 0.05  # the unfused kernels win a shape only when this much faster than its best fold: a fold also
# saves a kernel boundary and overlaps the next kernel (dependent launch), which one projection's timing cannot see


def pick(folded_ms: dict[gemv.Config, float], unfused_ms: float | None) -> gemv.Config | None:
    """The fastest folded configuration, or None (the unfused kernels) where none was timed or the unfused kernels
    measured more than :data:`UNFUSED_MARGIN` faster than it (so a fold never makes a projection clearly slower,
    as the skinny-matmul choice never makes one slower than cuBLAS)."""
    if not folded_ms:
        return None
    best = min(folded_ms, key=folded_ms.get)
    if unfused_ms is not None and unfused_ms * (1 + UNFUSED_MARGIN) < folded_ms[best]:
        return None
    return best


def folded_choice(kind: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  run: Callable[[gemv.Config], torch.Tensor],
                  unfused: Callable[[], torch.Tensor] | None = None) -> gemv.Config | None:
    """The fastest configuration of one folded projection, timed once per shape on the device as the skinny-matmul
    choice is (cold L2, in a CUDA graph: :mod:`apet.kernels.device_timing`), against ``unfused`` (the kernels it
    replaces, timed alike: :func:`pick`).

    Why not the plain projection's pick as it is: every program re-reads x (and the norm's weight), so fewer,
    larger programs may win; on the H200 Qwen2.5-VL's gate/up did (docs/benchmarks.md, stop 36). None inside a
    capture before the shape was timed. Off the GPU (the interpreter) nothing is timed: the first configuration of
    the form."""
    rows = x.numel() // x.shape[-1]
    if not x.is_cuda:
        return next(config for config in gemv.CONFIGS if config.fits(rows))
    row = x.reshape(rows, x.shape[-1])
    key = (kind, gemv.shape_key(row, weight, bias))
    if key in _choices:
        return _choices[key]
    base = gemv.kernel_choice(row, weight, bias)
    if base is None or torch.cuda.is_current_stream_capturing():
        return None
    timer = ColdTimer(x.device)
    timings = {}
    for config in _candidates(base, kind == "silu"):
        try:
            timings[config] = timer.ms(lambda c=config: run(c))
        except Exception as exc:  # a configuration that does not compile on this GPU is not a candidate
            log.debug("folded %s %s failed: %s", kind, config, exc)
    unfused_ms = timer.ms(unfused) if unfused is not None and timings else None
    _choices[key] = pick(timings, unfused_ms)
    log.debug("folded %s %s x %s: %s (unfused %s ms)", kind, tuple(row.shape), tuple(weight.shape), _choices[key],
              unfused_ms)
    return _choices[key]


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """RMSNorm(x) @ weightᵀ (+ bias) where :func:`applies` holds: one kernel once the shape is timed, the norm
    kernel and the projection before. Under ``torch.compile`` the custom op ``apet::norm_linear``."""
    if torch.compiler.is_compiling():
        return _norm_linear_op(x, norm_weight, eps, weight, bias)
    return _norm_linear(x, norm_weight, eps, weight, bias)


def norm_gate_up_silu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    """silu(gate)·up of RMSNorm(x) @ [gate; up]ᵀ where :func:`applies` holds (``apet::norm_gate_up_silu``
    compiled)."""
    if torch.compiler.is_compiling():
        return _norm_gate_up_silu_op(x, norm_weight, eps, weight)
    return _norm_gate_up_silu(x, norm_weight, eps, weight)


def linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """residual + x @ weightᵀ where :func:`applies` holds (``apet::linear_residual`` compiled)."""
    if torch.compiler.is_compiling():
        return _linear_residual_op(x, weight, residual)
    return _linear_residual(x, weight, residual)


def _normed(x: torch.Tensor, norm_weight: torch.Tensor, eps: float) -> torch.Tensor:
    return decoder_fused.add_rms_norm(x, norm_weight, eps)[1]


def _norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    def unfused() -> torch.Tensor:  # the norm kernel, then the projection's own choice (cuBLAS or the kernel)
        return gemv.linear(_normed(x, norm_weight, eps), weight, bias)

    config = folded_choice("norm", x, weight, bias, lambda c: norm_linear_kernel(x, norm_weight, eps, weight, bias, c),
                           unfused)
    return unfused() if config is None else norm_linear_kernel(x, norm_weight, eps, weight, bias, config)


def _norm_gate_up_silu(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor) -> torch.Tensor:
    def unfused() -> torch.Tensor:
        return activations.silu_mul(gemv.linear(_normed(x, norm_weight, eps), weight))

    config = folded_choice("silu", x, weight, None, lambda c: norm_gate_up_silu_kernel(x, norm_weight, eps, weight, c),
                           unfused)
    return unfused() if config is None else norm_gate_up_silu_kernel(x, norm_weight, eps, weight, config)


def _linear_residual(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    def unfused() -> torch.Tensor:
        return residual + gemv.linear(x, weight)

    config = folded_choice("residual", x, weight, None, lambda c: linear_residual_kernel(x, weight, residual, c),
                           unfused)
    return unfused() if config is None else linear_residual_kernel(x, weight, residual, config)


@torch.library.custom_op("apet::norm_linear", mutates_args=())
def _norm_linear_op(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None) -> torch.Tensor:
    return _norm_linear(x, norm_weight, eps, weight, bias)


@_norm_linear_op.register_fake
def _(x, norm_weight, eps, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@torch.library.custom_op("apet::norm_gate_up_silu", mutates_args=())
def _norm_gate_up_silu_op(x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                          weight: torch.Tensor) -> torch.Tensor:
    return _norm_gate_up_silu(x, norm_weight, eps, weight)


@_norm_gate_up_silu_op.register_fake
def _(x, norm_weight, eps, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0] // 2)


@torch.library.custom_op("apet::linear_residual", mutates_args=())
def _linear_residual_op(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return _linear_residual(x, weight, residual)


@_linear_residual_op.register_fake
def _(x, weight, residual):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
