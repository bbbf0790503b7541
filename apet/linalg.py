"""Small fixed-size linear solvers that export to plain ONNX ops.

``torch.linalg`` has no ONNX mapping (and TensorRT has no solver layer), so the
k x k Gram system of ApET is handled with an *unrolled* Cholesky factorisation:
k is a Python int at trace time, every loop below unrolls into MatMul / Sub /
Div / Sqrt / Slice / Concat nodes, and the graph has no Loop or If.

Each step is vectorised over a whole column (factorisation) or a whole row of
right-hand sides (substitution), so the graph has O(k) nodes, not O(k^2) scalar
ops, and the N right-hand sides are solved in parallel.
"""

from __future__ import annotations

import torch


def cholesky_lower(gram: torch.Tensor) -> torch.Tensor:
    """Lower-triangular L with ``L @ L.mT == gram`` for SPD ``gram`` of shape [..., k, k].

    Column j of L is ``(G[:, j] - L[:, :j] @ L[j, :j]) / sqrt(pivot)``, with rows
    above j zeroed by a constant mask. The pivot is clamped at a tiny positive
    value so an (almost) singular system degrades gracefully instead of
    producing NaN inside an engine.
    """
    k = int(gram.shape[-1])
    rows = torch.arange(k, device=gram.device)
    columns: list[torch.Tensor] = []
    for j in range(k):
        col = gram[..., :, j]  # [..., k]
        if j > 0:
            done = torch.stack(columns, dim=-1)  # [..., k, j]
            col = col - (done @ done[..., j : j + 1, :].transpose(-1, -2))[..., 0]
        pivot = col[..., j : j + 1].clamp_min(1e-30)
        col = col / torch.sqrt(pivot)
        col = col * (rows >= j).to(col.dtype)
        columns.append(col)
    return torch.stack(columns, dim=-1)


def _forward_substitute(lower: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``L y = rhs`` row by row; rhs is [..., k, N]."""
    k = int(lower.shape[-1])
    rows: list[torch.Tensor] = []
    for i in range(k):
        row = rhs[..., i : i + 1, :]
        if i > 0:
            solved = torch.cat(rows, dim=-2)  # [..., i, N]
            row = row - lower[..., i : i + 1, :i] @ solved
        rows.append(row / lower[..., i : i + 1, i : i + 1])
    return torch.cat(rows, dim=-2)


def whiten(gram: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``L⁻¹ rows`` for the Cholesky factor L of SPD ``gram`` [..., k, k]; ``rows`` is [..., k, D].

    With S the basis and G = S Sᵀ + λI = L Lᵀ, Q = L⁻¹ S turns a least-squares reconstruction
    into two products: Sᵀ G⁻¹ S x = Qᵀ (Q x). That needs one triangular substitution instead of
    the two of a full solve (about 70 fewer graph nodes at k = 10). Export-safe, no host syncs.
    """
    if gram.shape[-1] != gram.shape[-2] or gram.shape[-1] != rows.shape[-2]:
        raise ValueError(f"whiten: gram {tuple(gram.shape)} and rows {tuple(rows.shape)} do not match")
    return _forward_substitute(cholesky_lower(gram), rows)
