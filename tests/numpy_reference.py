"""Independent NumPy float64 implementation of DESIGN §4, written plainly (loops, no tricks).

It shares no code with ``apet.compression``; the tests compare the two.
"""

from __future__ import annotations

import numpy as np


def fps(x: np.ndarray, k: int, start: int = 0) -> list[int]:
    chosen = [start]
    nearest = np.full(x.shape[0], np.inf)
    for _ in range(k - 1):
        diff = x - x[chosen[-1]]
        nearest = np.minimum(nearest, (diff * diff).sum(-1))
        candidates = nearest.copy()
        candidates[chosen] = -np.inf
        chosen.append(int(np.argmax(candidates)))
    return chosen


def dpc(x: np.ndarray, k: int, neighbours: int = 5) -> list[int]:
    n, d = x.shape
    dist = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1)) / np.sqrt(d)
    near = np.sort(dist, axis=1)[:, :neighbours]
    density = np.exp(-(near**2).mean(1))
    delta = np.empty(n)
    for i in range(n):
        denser = density > density[i]
        delta[i] = dist[i, denser].min() if denser.any() else dist.max()
    return list(np.argsort(-(density * delta), kind="stable")[:k])


def errors(x: np.ndarray, basis: list[int]) -> np.ndarray:
    s = x[basis]
    gram = s @ s.T + 1e-5 * np.eye(len(basis))
    coeffs = np.linalg.solve(gram, s @ x.T)
    return np.linalg.norm(x - coeffs.T @ s, axis=1)


def compress_one(x: np.ndarray, keep: int, basis: int = 10, method: str = "fps", merge: bool = True,
                 basis_index: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image [N, D] -> (tokens [K, D], index [K]) following DESIGN §4 step by step."""
    x = x.astype(np.float64)
    n = x.shape[0]
    if keep == n:
        return x.copy(), np.arange(n)
    if basis_index is None:
        basis_index = fps(x, basis) if method == "fps" else dpc(x, basis)
    basis_set = sorted(basis_index)
    err = errors(x, basis_set)
    ranked = [i for i in np.argsort(-err, kind="stable") if i not in basis_set]
    selected = sorted(int(i) for i in ranked[: keep - basis])
    kept_tokens = {i: x[i].copy() for i in selected}
    if merge:
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        sums = {i: x[i].copy() for i in selected}
        counts = {i: 1 for i in selected}
        for j in range(n):
            if j in sums or j in basis_set:
                continue
            sims = [unit[i] @ unit[j] for i in selected]
            target = selected[int(np.argmax(sims))]
            sums[target] += x[j]
            counts[target] += 1
        kept_tokens = {i: sums[i] / counts[i] for i in selected}
    for i in basis_set:
        kept_tokens[i] = x[i].copy()
    index = np.array(sorted(kept_tokens))
    return np.stack([kept_tokens[i] for i in index]), index


def compress(x: np.ndarray, keep: int, basis: int = 10, method: str = "fps", merge: bool = True):
    """Batch [B, N, D] version of :func:`compress_one`."""
    outs = [compress_one(xb, keep, basis, method, merge) for xb in x]
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])
