"""FPS and the basis Cholesky factor on one image's token Gram matrix, as Triton device functions: the one home of
this math for both GPU kernels of ApET (:mod:`apet.kernels.apet_fused`, one program per image, and
:mod:`apet.kernels.apet_stage`, the whole stage in six launches)."""

from __future__ import annotations

try:  # Triton ships with CUDA builds of torch; CPU-only installs never reach this path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None
    tl = None


if triton is not None:

    @triton.jit
    def fps_basis(gram, start, N: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr, NPAD: tl.constexpr):
        """[KPAD] int32 basis token indices in FPS order (slots past K hold 0): distances g_ii + g_cc - 2 g_ic,
        running minimum, next centre = first argmax; chosen tokens are not masked (their distance is 0)."""
        offs = tl.arange(0, NPAD)
        valid = offs < N
        diag = tl.load(gram + offs * (N + 1), mask=valid, other=0.0)
        slot = tl.arange(0, KPAD)
        basis = tl.zeros([KPAD], dtype=tl.int32)
        nearest = tl.full([NPAD], float("inf"), dtype=tl.float32)
        index = start
        for step in tl.static_range(K):
            basis = tl.where(slot == step, index, basis)
            if step < K - 1:  # the last centre needs no distance update
                row = tl.load(gram + index * N + offs, mask=valid, other=0.0)
                centre = tl.sum(tl.where(offs == index, diag, 0.0), axis=0)
                nearest = tl.minimum(nearest, diag + centre - 2.0 * row)
                nearest = tl.where(valid, nearest, -float("inf"))
                index = tl.argmax(nearest, axis=0).to(tl.int32)
        return basis

    @triton.jit
    def basis_cholesky(gram, basis, ridge, N: tl.constexpr, K: tl.constexpr, KPAD: tl.constexpr):
        """L [KPAD, KPAD] with L Lᵀ = Gram[basis, basis] + ridge·I, padded with the identity past K."""
        slot = tl.arange(0, KPAD)
        rows = slot[:, None]
        cols = slot[None, :]
        inside = (rows < K) & (cols < K)
        a = tl.load(gram + basis[:, None] * N + basis[None, :], mask=inside, other=0.0)
        a = a + tl.where((rows == cols) & inside, ridge, 0.0) + tl.where((rows == cols) & ~inside, 1.0, 0.0)
        lower = tl.zeros([KPAD, KPAD], dtype=tl.float32)
        for j in tl.static_range(K):
            pivot = tl.sqrt(tl.maximum(tl.sum(tl.sum(tl.where((rows == j) & (cols == j), a, 0.0), axis=1), axis=0),
                                       1e-30))
            column = tl.sum(tl.where(cols == j, a, 0.0), axis=1)  # [KPAD] over rows
            column = tl.where(slot > j, column / pivot, tl.where(slot == j, pivot, 0.0))
            lower = tl.where(cols == j, column[:, None], lower)
            below = tl.where(slot > j, column, 0.0)
            a = a - below[:, None] * below[None, :]
        return lower + tl.where((rows == cols) & ~inside, 1.0, 0.0)
