"""ApET's decision margins in float64 (docs/algorithm.md, "One stage"): how close each choice was to going the
other way, so a difference between backends can be read as a near-tie (tiny margin) or a bug (large margin).

Three choices can flip: which K tokens are kept (selection margin), which error-selected token a dropped token
joins (merge margins), and, with the ``rank`` placement of stage 2, which basis vector lands in which basis slot:
position ``top[K-k+j]`` receives basis vector j, so two basis-slot tokens whose errors are nearly equal can trade
places in the error order and swap their rows while the kept index (sorted) stays equal (basis-order margin)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class StageMargins:
    """One image's stage-1 margins: the selection margin (K-th minus (K+1)-th reconstruction error), and for
    every dropped token the cosine gap between its best and second-best merge target."""

    selection: float
    kept: list[int]  # positions of the K largest errors, by descending error
    merge_targets: dict[int, int]  # dropped position -> error-selected position it joins
    merge_gaps: dict[int, float]  # dropped position -> best minus second-best cosine similarity
    errors: dict[int, float]  # kept position -> its reconstruction error
    basis_slots: dict[int, int]  # basis-slot position -> index (FPS order) of the basis vector it receives
    basis_order: float | None = None  # rank placement: smallest error gap between consecutive basis-slot ranks

    def to_json(self) -> dict:
        gaps = np.array(list(self.merge_gaps.values()) or [np.nan])
        result = {"selection_margin": self.selection, "min_merge_margin": float(np.nanmin(gaps)),
                  "median_merge_margin": float(np.nanmedian(gaps)), "dropped_tokens": len(self.merge_gaps)}
        if self.basis_order is not None:
            result["basis_order_margin"] = self.basis_order
        return result


def _fps(x: np.ndarray, k: int, start: int) -> list[int]:
    chosen, nearest = [start], np.full(x.shape[0], np.inf)
    for _ in range(k - 1):
        diff = x - x[chosen[-1]]
        nearest = np.minimum(nearest, np.einsum("nd,nd->n", diff, diff))
        chosen.append(int(np.argmax(nearest)))
    return chosen


def reconstruction_errors(x: np.ndarray, basis: list[int]) -> np.ndarray:
    """‖xᵢ − projection of xᵢ on the basis rows‖ with the graphs' 1e-5 ridge, in float64."""
    s = x[basis]
    coeffs = np.linalg.solve(s @ s.T + 1e-5 * np.eye(len(basis)), s @ x.T)
    return np.linalg.norm(x - coeffs.T @ s, axis=1)


def stage_margins(features: np.ndarray, keep: int, basis: int, start: int = 0,
                  placement: str = "mask") -> StageMargins:
    """Margins of one image's tokens [N, D] at budget ``keep`` with ``basis`` FPS basis tokens placed by
    ``placement`` (docs/algorithm.md, step 4: ``mask`` by position, ``rank`` by error rank)."""
    x = np.asarray(features, dtype=np.float64)
    err = reconstruction_errors(x, _fps(x, basis, start))
    order = np.argsort(-err, kind="stable")
    selection = float(err[order[keep - 1]] - err[order[keep]]) if keep < len(err) else float("inf")
    slot_ranks = [int(i) for i in order[keep - basis: keep]]
    slots = slot_ranks if placement == "rank" else sorted(slot_ranks)
    basis_order = float(min(err[a] - err[b] for a, b in zip(slot_ranks, slot_ranks[1:]))) \
        if placement == "rank" and basis > 1 else None
    targets = [int(i) for i in order[: keep - basis]]
    top = set(int(i) for i in order[:keep])
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = unit @ unit[targets].T  # [N, targets]
    merge_targets, gaps = {}, {}
    for j in (j for j in range(len(x)) if j not in top):
        row = sims[j]
        best = int(np.argmax(row))
        merge_targets[j] = targets[best]
        gaps[j] = float(row[best] - np.max(np.delete(row, best))) if len(targets) > 1 else float("inf")
    return StageMargins(selection, [int(i) for i in order[:keep]], merge_targets, gaps,
                        {int(i): float(err[i]) for i in order[:keep]}, {p: j for j, p in enumerate(slots)},
                        basis_order)
