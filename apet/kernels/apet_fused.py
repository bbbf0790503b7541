"""ApET on the GPU torch path with one Triton kernel for FPS + Gram + solve + reconstruction errors.

Everything ApET needs before the ranking is a function of the token Gram matrix ``X Xᵀ`` ([N, N]):
FPS distances are ``g_ii + g_cc - 2 g_ic``; the basis Gram is ``G = X Xᵀ[basis, basis] + λI``; the
right-hand sides are ``R = X Xᵀ[basis, :]``; and with ``G = L Lᵀ``, ``Q = L⁻¹ R``, ``C = L⁻ᵀ Q`` the
squared reconstruction error of token i is ``g_ii - |q_i|² - λ|c_i|²`` (``x̂ = Cᵀ S``, expanded with
``G C = R``). So one fp32 GEMM (cuBLAS, TF32 off) is followed by one Triton program per image that runs
FPS, the k×k Cholesky factorisation and both triangular solves in registers and writes the errors —
where the export path needs ~130 small ops. The cosine similarities of the merge come from the same
Gram matrix. Ranking and merging (top-K, a gather, one one-hot GEMM) stay in torch, so every
placement of :mod:`apet.compression` shares its code with the reference path.

Exact in the sense of docs/algorithm.md, "How we check it": same kept indices as the float64 oracle, values within fp32
tolerance (``tests/test_kernels.py``, run on the GPU device). The expanded error loses absolute
precision only where the error itself is ~0 (the basis tokens reconstruct themselves: ~1e-2 instead of
~1e-6 after the square root); those tokens sit at the bottom of the ranking, far from any budget K <= N-k.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None


def available(x: torch.Tensor) -> bool:
    """The fused path runs on CUDA tensors when Triton imports (or under TRITON_INTERPRET on CPU)."""
    import os

    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:
    from apet.kernels.basis_solve import basis_cholesky, fps_basis

    @triton.jit
    def _fps_errors(gram_ptr, errors_ptr, basis_ptr, start, ridge,
                    N: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr, NPAD: tl.constexpr,
                    BLOCK_N: tl.constexpr):
        image = tl.program_id(0)
        gram = gram_ptr + image * N * N

        # FPS, then G = Gram[basis, basis] + ridge·I = L Lᵀ (apet.kernels.basis_solve)
        slot = tl.arange(0, KPAD)
        basis = fps_basis(gram, start, N, K, KPAD, NPAD)
        tl.store(basis_ptr + image * K + slot, basis, mask=slot < K)
        rows = slot[:, None]
        cols = slot[None, :]
        lower = basis_cholesky(gram, basis, ridge, N, K, KPAD)

        # errors chunk by chunk: Q = L⁻¹ R, C = L⁻ᵀ Q, e² = g_ii - |q|² - ridge·|c|²
        for chunk in tl.static_range(0, NPAD, BLOCK_N):
            n = chunk + tl.arange(0, BLOCK_N)
            in_n = n < N
            r = tl.load(gram + basis[:, None] * N + n[None, :], mask=(slot[:, None] < K) & in_n[None, :], other=0.0)
            q = tl.zeros([KPAD, BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(K):
                l_row = tl.sum(tl.where(rows == i, lower, 0.0), axis=0)  # L[i, :]
                l_ii = tl.sum(tl.where(slot == i, l_row, 0.0), axis=0)
                done = tl.sum(l_row[:, None] * q, axis=0)
                r_i = tl.sum(tl.where(slot[:, None] == i, r, 0.0), axis=0)
                q = tl.where(slot[:, None] == i, ((r_i - done) / l_ii)[None, :], q)
            c = tl.zeros([KPAD, BLOCK_N], dtype=tl.float32)
            for t in tl.static_range(K):
                i = K - 1 - t
                l_col = tl.sum(tl.where(cols == i, lower, 0.0), axis=1)  # L[:, i]
                l_ii = tl.sum(tl.where(slot == i, l_col, 0.0), axis=0)
                done = tl.sum(l_col[:, None] * c, axis=0)
                q_i = tl.sum(tl.where(slot[:, None] == i, q, 0.0), axis=0)
                c = tl.where(slot[:, None] == i, ((q_i - done) / l_ii)[None, :], c)
            g_nn = tl.load(gram + n * (N + 1), mask=in_n, other=0.0)
            squared = g_nn - tl.sum(q * q, axis=0) - ridge * tl.sum(c * c, axis=0)
            tl.store(errors_ptr + image * N + n, tl.sqrt(tl.maximum(squared, 0.0)), mask=in_n)


def token_gram(x32: torch.Tensor) -> torch.Tensor:
    """X Xᵀ in true float32 (TF32 would round the operands to a 10-bit mantissa, as bad as fp16 here)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        return x32 @ x32.transpose(1, 2)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def fps_errors(gram: torch.Tensor, k: int, start: int, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(basis [B, k] int64 in FPS order, errors [B, N] float32) from the token Gram matrix [B, N, N]."""
    batch, n = int(gram.shape[0]), int(gram.shape[1])
    errors = torch.empty(batch, n, dtype=torch.float32, device=gram.device)
    basis = torch.empty(batch, k, dtype=torch.int32, device=gram.device)
    npad = max(16, triton.next_power_of_2(n))
    _fps_errors[(batch,)](gram.contiguous(), errors, basis, start, ridge, N=n, K=k,
                          KPAD=max(16, triton.next_power_of_2(k)), NPAD=npad, BLOCK_N=min(npad, 128),
                          num_warps=8)
    return basis.to(torch.int64), errors


def cosine_nearest(gram: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """For every token, the target (index into ``targets``) of largest cosine similarity, first on ties:
    argmax_t g[t, j] / (|x_t| |x_j|) = argmax_t g[t, j] / |x_t|."""
    norms = torch.sqrt(torch.diagonal(gram, dim1=1, dim2=2)).clamp_min(1e-12)  # [B, N]
    rows = torch.gather(gram, 1, targets.unsqueeze(-1).expand(-1, -1, gram.shape[2]))  # [B, T, N]
    return torch.argmax(rows / torch.gather(norms, 1, targets).unsqueeze(-1), dim=1)
