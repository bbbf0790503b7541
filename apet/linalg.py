"""Small fixed-size linear solvers that export to plain ONNX ops.

``torch.linalg`` has no ONNX mapping (and TensorRT has no solver layer), so the
k x k Gram system of ApET is solved with an *unrolled* Cholesky factorisation:
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


def _backward_substitute(lower: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``L^T x = rhs`` row by row from the bottom; rhs is [..., k, N]."""
    k = int(lower.shape[-1])
    upper = lower.transpose(-1, -2)
    rows: list[torch.Tensor] = []  # rows[m] holds solution row k-1-m
    for i in range(k - 1, -1, -1):
        row = rhs[..., i : i + 1, :]
        if i < k - 1:
            solved = torch.cat(rows[::-1], dim=-2)  # rows i+1..k-1, [..., k-1-i, N]
            row = row - upper[..., i : i + 1, i + 1 :] @ solved
        rows.append(row / upper[..., i : i + 1, i : i + 1])
    return torch.cat(rows[::-1], dim=-2)


def cholesky_solve(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``gram @ X = rhs`` for SPD ``gram`` [..., k, k] and ``rhs`` [..., k, N].

    Export-safe (static k, no ``torch.linalg``) and free of host syncs, so the
    same code runs in eager mode, under CUDA-graph capture, ``torch.compile``
    and ``torch.onnx.export``.
    """
    if gram.shape[-1] != gram.shape[-2] or gram.shape[-1] != rhs.shape[-2]:
        raise ValueError(f"cholesky_solve: gram {tuple(gram.shape)} and rhs {tuple(rhs.shape)} do not match")
    lower = cholesky_lower(gram)
    return _backward_substitute(lower, _forward_substitute(lower, rhs))

