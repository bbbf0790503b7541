"""ApET's decision margins in float64 (docs/algorithm.md, "One stage"): how close each choice was to going the
other way, so a difference between backends can be read as a near-tie (tiny margin) or a bug (large margin)."""

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

    def to_json(self) -> dict:
        gaps = np.array(list(self.merge_gaps.values()) or [np.nan])
        return {"selection_margin": self.selection, "min_merge_margin": float(np.nanmin(gaps)),
                "median_merge_margin": float(np.nanmedian(gaps)), "dropped_tokens": len(self.merge_gaps)}


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


def stage_margins(features: np.ndarray, keep: int, basis: int, start: int = 0) -> StageMargins:
    """Margins of one image's tokens [N, D] at budget ``keep`` with ``basis`` FPS basis tokens."""
    x = np.asarray(features, dtype=np.float64)
    err = reconstruction_errors(x, _fps(x, basis, start))
    order = np.argsort(-err, kind="stable")
    selection = float(err[order[keep - 1]] - err[order[keep]]) if keep < len(err) else float("inf")
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
    return StageMargins(selection, [int(i) for i in order[:keep]], merge_targets, gaps)
