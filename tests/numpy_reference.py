"""Independent NumPy float64 implementation of docs/algorithm.md, written plainly (loops, no tricks).

It follows the steps of the authors' code as docs/algorithm.md and issue 12 spell them out and
shares no code with ``apet.compression``; the tests compare the two. Placements:

* ``mask``   (LLaVA stage 1)  the j-th smallest slot position receives basis vector j;
* ``rank``   (LLaVA stage 2)  slot ``top[K-k+j]`` receives basis vector j;
* ``blend``  (Qwen2.5-VL)     the j-th smallest slot receives 0.5·basis_j + 0.5·its value;
* ``append`` (Video-LLaVA)    rank K-k tokens only; output [selected in error order, basis in FPS order];
* ``own``    (ablation)       basis excluded from ranking, at its own positions, not merged.
"""

from __future__ import annotations

import numpy as np


def fps(x: np.ndarray, k: int, start: int = 0) -> list[int]:
    """Plain farthest-point sampling: running minimum of squared distances, next = first argmax."""
    chosen = [start]
    nearest = np.full(x.shape[0], 1e300)
    for _ in range(k - 1):
        diff = x - x[chosen[-1]]
        nearest = np.minimum(nearest, (diff * diff).sum(-1))
        chosen.append(int(np.argmax(nearest)))
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


def merge(x: np.ndarray, targets: list[int], dropped: list[int]) -> dict[int, np.ndarray]:
    """Each dropped token joins its most cosine-similar target (first in ``targets`` order on ties);
    every target becomes (itself + Σ joined) / (1 + count)."""
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sums = {t: x[t].copy() for t in targets}
    counts = {t: 1 for t in targets}
    for j in dropped:
        sims = [float(unit[t] @ unit[j]) for t in targets]
        best = targets[int(np.argmax(sims))]
        sums[best] += x[j]
        counts[best] += 1
    return {t: sums[t] / counts[t] for t in targets}


def compress_one(x: np.ndarray, keep: int, basis: int = 10, method: str = "fps", merge_tokens: bool = True,
                 basis_index: list[int] | None = None, placement: str = "mask",
                 start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One image [N, D] -> (tokens [K, D], index [K]) following docs/algorithm.md step by step."""
    x = x.astype(np.float64)
    n = x.shape[0]
    if keep == n:
        return x.copy(), np.arange(n)
    if basis_index is None:
        basis_index = fps(x, basis, start) if method == "fps" else dpc(x, basis)
    err = errors(x, basis_index)
    by_error = [int(i) for i in np.argsort(-err, kind="stable")]
    if placement == "own":
        return _own(x, err, basis_index, keep, merge_tokens)

    appended = placement in ("append", "append_spatial")
    ranked = by_error[: keep - basis] if appended else by_error[:keep]
    selected = ranked[: keep - basis]
    dropped = [j for j in range(n) if j not in ranked]
    values = merge(x, selected, dropped) if merge_tokens else {t: x[t].copy() for t in selected}
    if appended:
        rows = [(t, values[t]) for t in selected] + [(b, x[b].copy()) for b in basis_index]
        if placement == "append_spatial":
            rows = sorted(rows, key=lambda row: row[0])
        return np.stack([v for _, v in rows]), np.array([i for i, _ in rows])

    slots = ranked[keep - basis:]
    if placement in ("mask", "blend"):
        slots = sorted(slots)
    for j, position in enumerate(slots):
        vector = x[basis_index[j]]
        values[position] = 0.5 * vector + 0.5 * x[position] if placement == "blend" else vector.copy()
    index = sorted(values)
    return np.stack([values[i] for i in index]), np.array(index)


def _own(x: np.ndarray, err: np.ndarray, basis_index: list[int], keep: int,
         merge_tokens: bool) -> tuple[np.ndarray, np.ndarray]:
    basis_set = set(basis_index)
    ranked = [int(i) for i in np.argsort(-err, kind="stable") if int(i) not in basis_set]
    selected = ranked[: keep - len(basis_index)]
    dropped = [j for j in range(x.shape[0]) if j not in selected and j not in basis_set]
    values = merge(x, selected, dropped) if merge_tokens else {t: x[t].copy() for t in selected}
    for b in basis_set:
        values[b] = x[b].copy()
    index = sorted(values)
    return np.stack([values[i] for i in index]), np.array(index)


def compress(x: np.ndarray, keep: int, basis: int = 10, method: str = "fps", merge_tokens: bool = True,
             placement: str = "mask", start: int = 0):
    """Batch [B, N, D] version of :func:`compress_one`."""
    outs = [compress_one(xb, keep, basis, method, merge_tokens, placement=placement, start=start) for xb in x]
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])


def compress_weights(x: np.ndarray, keep: int, basis: int = 10, placement: str = "blend",
                     start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One image [N, D] -> (W [K, N], index [K]) for the paper placements ``mask``, ``rank`` and ``blend``: each
    kept row as a weighted sum of the N tokens (``W @ x`` equals :func:`compress_one`'s rows), so the same
    selection and merge can be applied to other features of the same tokens (Qwen3-VL's DeepStack levels,
    docs/algorithm.md): an error-selected token and the tokens merged into it weigh 1/(1 + count) each, a slot
    is basis token j (``blend``: half basis token j, half its own token)."""
    x = x.astype(np.float64)
    n = x.shape[0]
    if keep == n:
        return np.eye(n), np.arange(n)
    basis_index = fps(x, basis, start)
    err = errors(x, basis_index)
    ranked = [int(i) for i in np.argsort(-err, kind="stable")][:keep]
    selected = ranked[: keep - basis]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    members = {t: [t] for t in selected}
    for j in range(n):
        if j not in ranked:
            members[selected[int(np.argmax([float(unit[t] @ unit[j]) for t in selected]))]].append(j)
    rows: dict[int, np.ndarray] = {}
    for t, group in members.items():
        rows[t] = np.zeros(n)
        rows[t][group] = 1.0 / len(group)
    slots = ranked[keep - basis:]
    if placement in ("mask", "blend"):
        slots = sorted(slots)
    for j, position in enumerate(slots):
        rows[position] = np.zeros(n)
        if placement == "blend":
            rows[position][basis_index[j]] += 0.5
            rows[position][position] += 0.5
        else:
            rows[position][basis_index[j]] = 1.0
    index = sorted(rows)
    return np.stack([rows[i] for i in index]), np.array(index)
