"""How two runs of one request are compared: the one home of the rule behind ``apet check``, the benchmark's
ONNX Runtime parity (``apet-bench --backends onnxruntime``) and the quantization agreement (``apet-eval
--weights``), so the three report the same numbers for the same arrays.

A run is a mapping of output names to arrays: the stage scopes of the graphs (``vision``, ``apet_stage1``,
``projector``, ``layers.N``, ``apet_stage2``, ``norm``), the kept indices of both ApET stages, the first logits,
the greedy tokens and the logits of every greedy step. Each kind gets the metrics that tell a rounding
difference from a near-tie from a bug: indices equal / shared, per-visual-token differences, greedy steps that
agree, next-token top-1 agreement and KL. NumPy only (float64), so every layer, torch-free or not, can use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from apet.contracts.io import KEEP_INDEX, LOGITS, STAGE2_INDEX

GREEDY = "greedy_tokens"
STEP_LOGITS = "step_logits"  # [steps, batch, vocab]: the logits each greedy token was taken from
INDEX_OUTPUTS = (KEEP_INDEX, STAGE2_INDEX)
TOKEN_SLOT_STAGES = ("apet_stage1", "projector")  # one row per kept visual token: report per-slot differences
__all__ = ["DEFAULT_TOLERANCE", "GREEDY", "INDEX_OUTPUTS", "KEEP_INDEX", "LOGITS", "STAGE2_INDEX", "STEP_LOGITS",
           "StageRow", "Tolerance", "compare_output", "compare_outputs", "next_token_agreement", "overlap",
           "token_diff"]


@dataclass
class Tolerance:
    atol: float
    rtol: float

    def close(self, a: np.ndarray, b: np.ndarray) -> bool:
        """Polygraphy's elementwise rule: |a - b| <= atol + rtol * |b| everywhere."""
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return bool(np.all(np.abs(a - b) <= self.atol + self.rtol * np.abs(b)))


# defaults per dtype: the looser of the two runs' dtypes applies
DEFAULT_TOLERANCE = {"fp32": Tolerance(1e-4, 1e-3), "fp16": Tolerance(2e-2, 2e-2)}


@dataclass
class StageRow:
    """One output of one comparison (reference run vs candidate run)."""

    stage: str
    passed: bool
    metrics: dict[str, Any] = field(default_factory=dict)


def compare_outputs(reference: Mapping[str, Any], candidate: Mapping[str, Any], tol: Tolerance,
                    keys: list[str] | None = None) -> dict[str, StageRow]:
    """A row for every output both runs have (``keys``: only those), in the reference's order."""
    wanted = [k for k in (keys if keys is not None else reference) if k in reference and k in candidate]
    return {k: compare_output(k, reference[k], candidate[k], tol) for k in wanted}


def compare_output(key: str, ref: Any, out: Any, tol: Tolerance) -> StageRow:
    """The metrics of one output: index outputs by equality and share, greedy tokens by the steps that agree,
    everything else by its largest absolute and relative difference (plus per-token and per-step views)."""
    ref, out = np.asarray(ref), np.asarray(out)
    if key in INDEX_OUTPUTS:
        equal = bool(np.array_equal(ref, out))
        return StageRow(key, equal, {"equal": equal, "shared": overlap(out, ref)})
    if key == GREEDY:
        agree = [bool(np.array_equal(a, b)) for a, b in zip(out, ref)]
        first = next((i for i, same in enumerate(agree) if not same), None)
        return StageRow(key, all(agree), {"steps": len(agree), "equal_steps": sum(agree),
                                          "first_different_step": first})
    if ref.size != out.size:
        return StageRow(key, False, {"shape": list(out.shape), "reference_shape": list(ref.shape)})
    out = out.reshape(ref.shape)
    delta = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    metrics: dict[str, Any] = {"max_abs": float(delta.max()) if delta.size else 0.0, "scale": scale,
                               "max_rel": float(delta.max() / scale) if scale else 0.0}
    if key in TOKEN_SLOT_STAGES:
        metrics["visual_token_diff"] = token_diff(out, ref)
    if key == STEP_LOGITS:
        metrics["max_abs_by_step"] = [float(d.max()) for d in delta]
    return StageRow(key, tol.close(out, ref), metrics)


def token_diff(out: np.ndarray, ref: np.ndarray) -> dict[str, float | int]:
    """Per visual token (slot), the largest |Δ| over its features. Rounding moves every token a little; a merge
    that picks another kept token (a near-tie) moves a few tokens a lot: ``outliers`` counts tokens over 10x the
    median."""
    out, ref = np.asarray(out), np.asarray(ref)
    per_token = np.abs(out.reshape(-1, out.shape[-1]).astype(np.float64)
                       - ref.reshape(-1, ref.shape[-1])).max(-1)
    median = float(np.median(per_token))
    return {"median": round(median, 5), "max": round(float(per_token.max()), 5),
            "outliers": int((per_token > 10 * median).sum()), "tokens": int(per_token.size),
            "scale": round(float(np.abs(ref).max()), 4)}


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Mean fraction of kept positions two selections share, per row (near-ties swap a few, bugs most)."""
    a, b = np.asarray(a), np.asarray(b)
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return round(float(np.mean([len(set(x.tolist()) & set(y.tolist())) / max(len(x), 1) for x, y in zip(a, b)])), 4)


def next_token_agreement(reference: np.ndarray, candidate: np.ndarray, rows: int = 256) -> tuple[int, float]:
    """Over positions [T, V] of logits read on the same tokens: how many positions' argmax tokens agree, and the
    summed KL(reference || candidate) of the next-token distributions in nats (float64, ``rows`` positions at a
    time: a 32k vocabulary over a long sequence in float64 would take gigabytes at once)."""
    agree, kl = 0, 0.0
    for start in range(0, len(reference), rows):
        ref = np.asarray(reference[start:start + rows], np.float64)
        got = np.asarray(candidate[start:start + rows], np.float64)
        log_p, log_q = _log_softmax(ref), _log_softmax(got)
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        kl += float((np.exp(log_p) * (log_p - log_q)).sum())
    return agree, kl


def _log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
