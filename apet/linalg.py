"""Small fixed-size linear solvers that export to plain ONNX ops.

``torch.linalg`` has no ONNX mapping (and TensorRT has no solver layer), so the
k x k Gram system of ApET is handled *unrolled*: k is a Python int at trace time,
every loop below unrolls into a few element-wise, reduce and gather nodes per step,
and the graph has no Loop or If.

:func:`ridge_orthonormal` is what exported graphs use: modified Gram-Schmidt on the
rows of the ridge-augmented basis [S, sqrt(ridge)·I] yields L⁻¹S for the Cholesky
factor L of S Sᵀ + ridge·I without forming the Gram matrix, in k steps of seven
nodes, none of them a Slice (a Slice costs TensorRT ~26 layers on a dynamic batch).
:func:`cholesky_lower` and :func:`whiten` are the same factor written as a
factorisation and a substitution (2k steps); the tests keep them as the reference
form the exported one is compared with.
"""

from __future__ import annotations

import math

import torch

from apet.graph_ops import sum_of_squares


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


def ridge_orthonormal(rows: torch.Tensor, ridge: float) -> torch.Tensor:
    """Q = L⁻¹ S for S = ``rows`` [B, k, D] and S Sᵀ + ridge·I = L Lᵀ, so that Sᵀ (S Sᵀ + ridge·I)⁻¹ S = Qᵀ Q.

    Modified Gram-Schmidt on the rows of A = [S, √ridge·I] [B, k, D + k]: A Aᵀ is the ridged Gram matrix, so the
    orthonormalised rows are L⁻¹ A, whose first D columns are Q. It never squares the basis (the Gram matrix's
    condition number is the square of A's), and the ridge is exact where the Gram matrix would round it away
    against ‖s‖² in float32; the √ridge columns also keep every pivot positive. Rows are normalised once at the
    end (u_j / ‖u_j‖, with ‖u_j‖² read off the step's own dot products), and rows already processed are left as
    numerical zeros rather than masked: each step reads only its own row.
    """
    k, dim = int(rows.shape[-2]), int(rows.shape[-1])
    identity = math.sqrt(ridge) * torch.eye(k, dtype=rows.dtype, device=rows.device)
    # the identity block takes the batch shape from a [B, k, 1] zero: no shape arithmetic in the graph
    a = torch.cat([rows, rows.sum(-1, keepdim=True) * 0.0 + identity], -1)
    picked: list[torch.Tensor] = []
    squares: list[torch.Tensor] = []
    for j in range(k):
        at = torch.full((1,), j, dtype=torch.long, device=rows.device)
        row = a.index_select(-2, at)  # u_j [B, 1, D + k], orthogonal to u_0 .. u_{j-1}
        if j + 1 < k:
            dots = (a * row).sum(-1, keepdim=True)  # [B, k, 1]
            square = dots.index_select(-2, at)  # ‖u_j‖²
            a = a - (dots / square) * row
        else:
            square = sum_of_squares(row)
        picked.append(row)
        squares.append(square)
    unit = torch.cat(picked, -2) / torch.sqrt(torch.cat(squares, -2))
    return unit.index_select(-1, torch.arange(dim, device=rows.device))
