"""One ApET stage (docs/algorithm.md steps 1-6, placements ``mask``, ``rank`` and ``blend``) in six Triton launches
on the GPU torch path: no float32 copy of the tokens, no [B, T, N] membership matrix, no tiny torch ops.

Why: the stage is ~40 small torch ops (casts, aranges, top-k, one-hot, gathers, divides) around a few GEMMs; in a
CUDA graph each costs a launch and a tail, ~0.2-0.3 ms in all at LLaVA-1.5's N = 576, where the arithmetic needs a
few microseconds. One program per image (:mod:`apet.kernels.apet_fused`) is serial in N instead. Here only FPS and
the k×k Cholesky run as one program per image; everything that scales with N runs as blocks of tokens in parallel:

1. ``_gram``: X Xᵀ [B, N, N] in float32. fp16/bf16 tokens go through the tensor cores as they are: a product of
   two fp16 numbers is exact in float32, so with float32 accumulation this is the float32 Gram matrix of the same
   values (what ``x.float() @ x.float().T`` computes without TF32), at tensor-core speed.
2. ``_basis``: FPS on the Gram rows (distances g_ii + g_cc - 2 g_ic, running minimum, first argmax), then
   G = Gram[basis, basis] + λI = L Lᵀ and L⁻¹ (forward substitution on the identity), per image.
3. ``_errors``: per block of tokens, Q = L⁻¹ R and C = L⁻ᵀ Q for R = Gram[basis, block]; e² = g_ii - |q|² - λ|c|²
   (x̂ = Cᵀ S expanded with G C = R; see :mod:`apet.kernels.apet_fused`).
4. ``_rank``: each token's rank in descending error by counting (ties: smaller position first, the oracle's
   stable sort) — the same order as top-K without a sort.
5. ``_assign``: from the ranks, per token: its output row (kept tokens in position order), the row it is averaged
   into (error-selected: its own; dropped: its cosine-nearest error-selected token's, ties to the earlier in error
   order; a slot: none), the slot row it fills as basis vector j, and (``blend``) its own slot row; also the kept
   index.
6. ``_merge``: every output row as Σ_j w_oj x_j / Σ_j w_oj with w from step 5 (1 for members, 1 or 0.5 for the
   basis vector of a slot, 0.5 for a blended slot's own token), one one-hot GEMM tile per block of columns and
   of at most :data:`MERGE_ROWS` output rows. Steps 1-5 are :func:`assign`; its :class:`StageAssignment` runs step
   6 on the stage's tokens or on any other features of the same tokens (Qwen3-VL's DeepStack levels).

Exact in the sense of docs/algorithm.md, "How we check it": the same kept indices as the float64 oracle and values
within float32 tolerance (``tests/test_apet_stage.py``: on a GPU, and in Triton's interpreter on CPU).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None

PLACEMENT_CODES = {"mask": 0, "rank": 1, "blend": 2}
MAX_TOKENS = 2048  # the per-image programs keep [N] vectors in registers
# output rows per merge program: all K rows of one program held a [K, 64] float32 accumulator, which spilled at
# Qwen2.5-VL's K = 607 (2.96 of the stage's 3.12 ms on the H200, docs/benchmarks.md stop 48). K <= 128 (LLaVA-1.5
# up to ratio 0.22, stage 2) stays one block, as before; larger fixed budgets tile too (not yet timed)
MERGE_ROWS = 128


def available(x: torch.Tensor) -> bool:
    """CUDA tensors with Triton importable (or Triton's interpreter on CPU: ``TRITON_INTERPRET=1``)."""
    return triton is not None and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")


def supports(x: torch.Tensor, keep: int, basis: int, placement: str) -> bool:
    """Shapes and settings this module computes (others take :mod:`apet.compression`'s torch ops)."""
    n = int(x.shape[1])
    return (placement in PLACEMENT_CODES and basis <= 32 and basis < keep < n <= MAX_TOKENS
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


if triton is not None:
    from apet.kernels.basis_solve import basis_cholesky, fps_basis

    @triton.jit
    def _gram(x_ptr, gram_ptr, N: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
              IEEE: tl.constexpr):
        image, pid_m, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BM + tl.arange(0, BM)
        ks = tl.arange(0, BK)
        x = x_ptr + image * N * D
        acc = tl.zeros([BM, BM], dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + ks
            a = tl.load(x + rows[:, None] * D + kk[None, :], mask=(rows[:, None] < N) & (kk[None, :] < D), other=0.0)
            b = tl.load(x + cols[None, :] * D + kk[:, None], mask=(cols[None, :] < N) & (kk[:, None] < D), other=0.0)
            if IEEE:
                acc = tl.dot(a, b, acc, input_precision="ieee")
            else:  # fp16 / bf16 operands: exact products, float32 sums
                acc = tl.dot(a, b, acc)
        tl.store(gram_ptr + image * N * N + rows[:, None] * N + cols[None, :], acc,
                 mask=(rows[:, None] < N) & (cols[None, :] < N))

    @triton.jit
    def _basis(gram_ptr, basis_ptr, inverse_ptr, start, ridge, N: tl.constexpr, K: tl.constexpr,
               KPAD: tl.constexpr, NPAD: tl.constexpr):
        image = tl.program_id(0)
        gram = gram_ptr + image * N * N

        # FPS, then G = Gram[basis, basis] + ridge·I = L Lᵀ (apet.kernels.basis_solve)
        slot = tl.arange(0, KPAD)
        basis = fps_basis(gram, start, N, K, KPAD, NPAD)
        tl.store(basis_ptr + image * KPAD + slot, tl.where(slot < K, basis, -1))
        rows = slot[:, None]
        cols = slot[None, :]
        lower = basis_cholesky(gram, basis, ridge, N, K, KPAD)

        # L⁻¹ by forward substitution on the identity, row by row (rows past K stay the identity's)
        inverse = tl.where(rows == cols, 1.0, 0.0)
        for i in tl.static_range(K):
            l_row = tl.sum(tl.where(rows == i, lower, 0.0), axis=0)  # L[i, :]
            l_ii = tl.sum(tl.where(slot == i, l_row, 0.0), axis=0)
            done = tl.sum(tl.where(slot[:, None] < i, l_row[:, None] * inverse, 0.0), axis=0)
            unit = tl.where(slot == i, 1.0, 0.0)
            inverse = tl.where(rows == i, ((unit - done) / l_ii)[None, :], inverse)
        tl.store(inverse_ptr + image * KPAD * KPAD + rows * KPAD + cols, inverse)

    @triton.jit
    def _errors(gram_ptr, basis_ptr, inverse_ptr, errors_ptr, ridge, N: tl.constexpr, KPAD: tl.constexpr,
                BLOCK: tl.constexpr):
        image, block = tl.program_id(0), tl.program_id(1)
        gram = gram_ptr + image * N * N
        slot = tl.arange(0, KPAD)
        basis = tl.load(basis_ptr + image * KPAD + slot)
        inverse = tl.load(inverse_ptr + image * KPAD * KPAD + slot[:, None] * KPAD + slot[None, :])
        n = block * BLOCK + tl.arange(0, BLOCK)
        in_n = n < N
        r = tl.load(gram + basis[:, None] * N + n[None, :], mask=(basis[:, None] >= 0) & in_n[None, :], other=0.0)
        q = tl.dot(inverse, r, input_precision="ieee")  # [KPAD, BLOCK]
        c = tl.dot(tl.trans(inverse), q, input_precision="ieee")
        g_nn = tl.load(gram + n * (N + 1), mask=in_n, other=0.0)
        squared = g_nn - tl.sum(q * q, axis=0) - ridge * tl.sum(c * c, axis=0)
        tl.store(errors_ptr + image * N + n, tl.sqrt(tl.maximum(squared, 0.0)), mask=in_n)

    @triton.jit
    def _rank(errors_ptr, rank_ptr, N: tl.constexpr, NPAD: tl.constexpr, BLOCK: tl.constexpr):
        image, block = tl.program_id(0), tl.program_id(1)
        offs = tl.arange(0, NPAD)
        every = tl.load(errors_ptr + image * N + offs, mask=offs < N, other=-float("inf"))
        n = block * BLOCK + tl.arange(0, BLOCK)
        mine = tl.load(errors_ptr + image * N + n, mask=n < N, other=0.0)
        before = (every[None, :] > mine[:, None]) | ((every[None, :] == mine[:, None]) & (offs[None, :] < n[:, None]))
        before = before & (offs[None, :] < N)
        tl.store(rank_ptr + image * N + n, tl.sum(before.to(tl.int32), axis=1), mask=n < N)

    @triton.jit
    def _assign(gram_ptr, rank_ptr, basis_ptr, owner_ptr, source_ptr, own_slot_ptr, index_ptr,
                N: tl.constexpr, KEEP: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr, NPAD: tl.constexpr,
                BLOCK: tl.constexpr, PLACEMENT: tl.constexpr):
        image, block = tl.program_id(0), tl.program_id(1)
        gram = gram_ptr + image * N * N
        offs = tl.arange(0, NPAD)
        valid = offs < N
        rank = tl.load(rank_ptr + image * N + offs, mask=valid, other=NPAD)
        kept = rank < KEEP
        selected = rank < KEEP - K
        slot = kept & ~selected
        dest = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # output row of every kept token: position order
        slot_order = tl.cumsum(slot.to(tl.int32), axis=0) - 1  # j-th smallest slot position

        n = block * BLOCK + tl.arange(0, BLOCK)
        in_n = n < N
        my_rank = tl.load(rank_ptr + image * N + n, mask=in_n, other=NPAD)
        my_dest = tl.sum((kept[None, :] & (offs[None, :] < n[:, None])).to(tl.int32), axis=1)

        # cosine-nearest error-selected token: argmax_t g[j, t] / |x_t|, ties to the smaller error rank
        norms = tl.maximum(tl.sqrt(tl.load(gram + offs * (N + 1), mask=valid, other=1.0)), 1e-12)
        rows = tl.load(gram + n[:, None] * N + offs[None, :], mask=in_n[:, None] & valid[None, :], other=0.0)
        score = tl.where(selected[None, :], rows / norms[None, :], -float("inf"))
        best = tl.max(score, axis=1)
        target_rank = tl.min(tl.where(score == best[:, None], rank[None, :], NPAD), axis=1)
        target = tl.min(tl.where(rank[None, :] == target_rank[:, None], offs[None, :], NPAD), axis=1)
        target_dest = tl.sum((kept[None, :] & (offs[None, :] < target[:, None])).to(tl.int32), axis=1)
        owner = tl.where(my_rank < KEEP - K, my_dest, tl.where(my_rank >= KEEP, target_dest, -1))

        # the slot row each basis token fills: mask / blend the j-th smallest slot, rank the slot of rank KEEP-K+j
        source = tl.full([BLOCK], -1, dtype=tl.int32)
        for j in tl.static_range(K):
            picked = tl.load(basis_ptr + image * KPAD + j)
            if PLACEMENT == 1:
                receives = rank == KEEP - K + j
            else:
                receives = slot & (slot_order == j)
            slot_dest = tl.sum(tl.where(receives, dest, 0), axis=0)
            source = tl.where(n == picked, slot_dest, source)
        is_slot = (my_rank >= KEEP - K) & (my_rank < KEEP)
        own_slot = tl.where(is_slot & (PLACEMENT == 2), my_dest, -1)
        tl.store(owner_ptr + image * N + n, owner, mask=in_n)
        tl.store(source_ptr + image * N + n, source, mask=in_n)
        tl.store(own_slot_ptr + image * N + n, own_slot, mask=in_n)
        tl.store(index_ptr + image * KEEP + my_dest, n.to(tl.int64), mask=in_n & (my_rank < KEEP))

    @triton.jit
    def _merge(x_ptr, owner_ptr, source_ptr, own_slot_ptr, out_ptr, N: tl.constexpr, D: tl.constexpr,
               KEEP: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
               BASIS_WEIGHT: tl.constexpr, IEEE: tl.constexpr):
        image, block, out_block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        out_rows = out_block * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        d = block * BLOCK_D + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_OUT, BLOCK_D], dtype=tl.float32)
        total = tl.zeros([BLOCK_OUT], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            in_n = n < N
            owner = tl.load(owner_ptr + image * N + n, mask=in_n, other=-1)
            source = tl.load(source_ptr + image * N + n, mask=in_n, other=-1)
            own_slot = tl.load(own_slot_ptr + image * N + n, mask=in_n, other=-1)
            weight = (tl.where(owner[None, :] == out_rows[:, None], 1.0, 0.0)
                      + tl.where(source[None, :] == out_rows[:, None], BASIS_WEIGHT, 0.0)
                      + tl.where(own_slot[None, :] == out_rows[:, None], 0.5, 0.0))  # 0, 0.5, 1: exact in fp16
            x = tl.load(x_ptr + image * N * D + n[:, None] * D + d[None, :], mask=in_n[:, None] & (d[None, :] < D),
                        other=0.0)
            total += tl.sum(weight, axis=1)
            if IEEE:
                acc = tl.dot(weight, x, acc, input_precision="ieee")
            else:
                acc = tl.dot(weight.to(x.dtype), x, acc)
        out = acc / tl.maximum(total, 1.0)[:, None]
        tl.store(out_ptr + image * KEEP * D + out_rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(out_rows[:, None] < KEEP) & (d[None, :] < D))


def _pad(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n))


def token_gram(x: torch.Tensor) -> torch.Tensor:
    """X Xᵀ [B, N, N] float32 of tokens [B, N, D] (fp16/bf16 through the tensor cores, float32 in IEEE mode)."""
    batch, n, dim = (int(s) for s in x.shape)
    gram = torch.empty(batch, n, n, dtype=torch.float32, device=x.device)
    block = 64
    _gram[(batch, triton.cdiv(n, block), triton.cdiv(n, block))](
        x, gram, N=n, D=dim, BM=block, BK=32 if x.dtype == torch.float32 else 64, IEEE=x.dtype == torch.float32,
        num_warps=4)
    return gram


class StageAssignment(NamedTuple):
    """How :func:`assign` formed each image's K rows, per token [B, N] int32: ``owner`` (the output row it is
    averaged into, -1 for none), ``source`` (the slot row it fills as a basis vector, -1 for none) and ``own_slot``
    (``blend``: the slot row its own value is blended into, -1 for none). :meth:`apply` forms the same rows from
    any per-token features of the same images (Qwen3-VL's DeepStack levels), as
    :meth:`apet.compression.Assignment.apply` does with the membership matrix. (A NamedTuple, like that
    Assignment, which carries it: ``torch.compile`` passes it through without graph breaks.)"""

    owner: torch.Tensor
    source: torch.Tensor
    own_slot: torch.Tensor
    keep: int
    basis_weight: float  # a slot's basis vector: 1 (mask, rank) or 0.5 (blend)

    def apply(self, y: torch.Tensor) -> torch.Tensor:
        """The K rows [B, K, D'] of ``y`` [B, N, D'] (float32 accumulation, ``y``'s dtype out): ``_merge``."""
        y = y.contiguous()
        batch, n, dim = (int(s) for s in y.shape)
        out = torch.empty(batch, self.keep, dim, dtype=y.dtype, device=y.device)
        block_d = 64 if dim >= 64 else _pad(dim)
        block_out = min(_pad(self.keep), MERGE_ROWS)
        _merge[(batch, triton.cdiv(dim, block_d), triton.cdiv(self.keep, block_out))](
            y, self.owner, self.source, self.own_slot, out, N=n, D=dim, KEEP=self.keep, BLOCK_OUT=block_out,
            BLOCK_N=32, BLOCK_D=block_d, BASIS_WEIGHT=self.basis_weight, IEEE=y.dtype == torch.float32,
            num_warps=4)
        return out


def assign(x: torch.Tensor, keep: int, basis: int, start: int, ridge: float,
           placement: str) -> tuple[StageAssignment, torch.Tensor]:
    """Steps 1-5 of one ApET stage (``mask``, ``rank`` or ``blend``): (how the K rows are formed, the kept
    positions [B, keep] int64 ascending). The rows themselves are ``assignment.apply(x)`` (step 6)."""
    x = x.contiguous()
    batch, n, dim = (int(s) for s in x.shape)
    device = x.device
    kpad, npad = _pad(basis), _pad(n)
    gram = token_gram(x)
    basis_index = torch.empty(batch, kpad, dtype=torch.int32, device=device)
    inverse = torch.empty(batch, kpad, kpad, dtype=torch.float32, device=device)
    _basis[(batch,)](gram, basis_index, inverse, start, ridge, N=n, K=basis, KPAD=kpad, NPAD=npad, num_warps=4)
    errors = torch.empty(batch, n, dtype=torch.float32, device=device)
    block = 64
    _errors[(batch, triton.cdiv(n, block))](gram, basis_index, inverse, errors, ridge, N=n, KPAD=kpad, BLOCK=block,
                                            num_warps=4)
    rank = torch.empty(batch, n, dtype=torch.int32, device=device)
    small = 16
    _rank[(batch, triton.cdiv(n, small))](errors, rank, N=n, NPAD=npad, BLOCK=small, num_warps=8)
    owner, source, own_slot = (torch.empty(batch, n, dtype=torch.int32, device=device) for _ in range(3))
    index = torch.empty(batch, keep, dtype=torch.int64, device=device)
    _assign[(batch, triton.cdiv(n, small))](gram, rank, basis_index, owner, source, own_slot, index, N=n,
                                            KEEP=keep, K=basis, KPAD=kpad, NPAD=npad, BLOCK=small,
                                            PLACEMENT=PLACEMENT_CODES[placement], num_warps=8)
    weight = 0.5 if placement == "blend" else 1.0
    return StageAssignment(owner, source, own_slot, keep, weight), index


def compress(x: torch.Tensor, keep: int, basis: int, start: int, ridge: float,
             placement: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, keep, D] in x's dtype, kept positions [B, keep] int64 ascending): one ApET stage with the
    ``mask``, ``rank`` or ``blend`` placement (see the module docstring)."""
    assignment, index = assign(x, keep, basis, start, ridge, placement)
    return assignment.apply(x), index
