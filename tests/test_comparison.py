"""One way to compare two runs (issue 29): apet check, the benchmark's ONNX Runtime parity and the quantization
agreement share ``apet.contracts.comparison``. The rule is checked against independent formulas (the ones the
bench and the agreement computed before they moved onto it), and the bench's ``parity`` JSON on the tiny model in
fp16 (where ONNX Runtime and torch really differ) equals what those formulas give for the same arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apet.contracts.comparison import (
    DEFAULT_TOLERANCE,
    GREEDY,
    KEEP_INDEX,
    LOGITS,
    STAGE2_INDEX,
    STEP_LOGITS,
    compare_outputs,
    next_token_agreement,
    overlap,
    token_diff,
)


def _old_token_diff(ort: np.ndarray, torch_: np.ndarray) -> dict:
    per_token = np.abs(ort.reshape(-1, ort.shape[-1]).astype(np.float64)
                       - torch_.reshape(-1, torch_.shape[-1])).max(-1)
    median = float(np.median(per_token))
    return {"median": round(median, 5), "max": round(float(per_token.max()), 5),
            "outliers": int((per_token > 10 * median).sum()), "tokens": int(per_token.size),
            "scale": round(float(np.abs(torch_).max()), 4)}


def _old_parity(ort: dict, ref: dict) -> dict:
    """bench/ort_path.py's ``_parity`` before the move, on the arrays it compared (ONNX Runtime vs torch)."""
    def share(a, b):
        a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
        return round(float(np.mean([len(set(x.tolist()) & set(y.tolist())) / max(len(x), 1)
                                    for x, y in zip(a, b)])), 4)

    agree = [a == b for a, b in zip(ort[GREEDY], ref[GREEDY])]
    deltas = [float(np.abs(a - b).max()) for a, b in zip(ort[STEP_LOGITS], ref[STEP_LOGITS])]
    stage2 = ort.get(STAGE2_INDEX)
    return {"stage1_index_equal": bool(np.array_equal(ort[KEEP_INDEX], ref[KEEP_INDEX])),
            "visual_token_diff": _old_token_diff(np.asarray(ort["projector"]), ref["projector"]),
            "stage2_index_equal": None if stage2 is None else bool(np.array_equal(stage2, ref[STAGE2_INDEX])),
            "stage2_index_overlap": None if stage2 is None else share(stage2, ref[STAGE2_INDEX]),
            "greedy_steps": len(ort[GREEDY]), "greedy_equal_steps": sum(agree),
            "first_different_step": next((i for i, same in enumerate(agree) if not same), None),
            "max_abs_logit_diff": round(max(deltas), 4), "abs_logit_diff_by_step": [round(d, 4) for d in deltas],
            "logit_scale": round(float(np.abs(ref[STEP_LOGITS][0]).max()), 4)}


def test_rows_follow_the_rule_on_hand_made_runs() -> None:
    rng = np.random.default_rng(0)
    ref_tokens = rng.normal(size=(2, 8, 4)).astype(np.float32)
    moved = ref_tokens.copy()
    moved[1, 3] += 5.0  # one slot moved a lot (a changed merge), the rest by rounding
    moved += 1e-3
    ref = {KEEP_INDEX: np.array([[1, 2, 3], [4, 5, 6]]), "projector": ref_tokens, GREEDY: [[1, 2], [3, 4], [5, 6]],
           STAGE2_INDEX: np.array([[0, 1], [2, 3]]), LOGITS: np.array([[1.0, -4.0]])}
    out = {KEEP_INDEX: np.array([[1, 2, 3], [4, 5, 7]]), "projector": moved, GREEDY: [[1, 2], [3, 5], [5, 6]],
           STAGE2_INDEX: np.array([[0, 1], [2, 3]]), LOGITS: np.array([[1.5, -4.0]])}
    rows = compare_outputs(ref, out, DEFAULT_TOLERANCE["fp32"])
    assert list(rows) == [KEEP_INDEX, "projector", GREEDY, STAGE2_INDEX, LOGITS]
    assert rows[KEEP_INDEX].metrics == {"equal": False, "shared": round((1 + 2 / 3) / 2, 4)}
    assert rows[STAGE2_INDEX].passed and rows[STAGE2_INDEX].metrics == {"equal": True, "shared": 1.0}
    assert rows[GREEDY].metrics == {"steps": 3, "equal_steps": 2, "first_different_step": 1}
    assert rows["projector"].metrics["visual_token_diff"] == _old_token_diff(moved, ref_tokens)
    assert rows["projector"].metrics["visual_token_diff"]["outliers"] == 1
    assert rows[LOGITS].metrics == {"max_abs": 0.5, "scale": 4.0, "max_rel": 0.125} and not rows[LOGITS].passed
    assert overlap(out[KEEP_INDEX], ref[KEEP_INDEX]) == rows[KEEP_INDEX].metrics["shared"]
    assert token_diff(moved, ref_tokens)["tokens"] == 16


def test_next_token_agreement_equals_torch_log_softmax_kl() -> None:
    """The quantization agreement's former torch formula, on logits with a 32k vocabulary, chunked or not."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(300, 32000, generator=gen) * 3
    got = ref + 0.5 * torch.randn(300, 32000, generator=gen)
    log_p, log_q = F.log_softmax(ref.double(), -1), F.log_softmax(got.double(), -1)
    want_kl = float((log_p.exp() * (log_p - log_q)).sum())
    want_agree = int((ref.argmax(-1) == got.argmax(-1)).sum())
    for rows in (256, 7, 1000):
        agree, kl = next_token_agreement(ref.numpy(), got.numpy(), rows=rows)
        assert agree == want_agree and 0 < agree < 300
        assert kl == pytest.approx(want_kl, rel=1e-12)


def test_bench_parity_fields_unchanged_on_the_tiny_fp16_model(tiny_checkpoint, tmp_path, monkeypatch) -> None:
    """apet-bench's ``onnxruntime.parity`` on the tiny LLaVA in fp16, two stages, op attention: ONNX Runtime and
    torch differ there (merges in fp16 rounding, a stage-2 swap), so every field carries a real value. Each equals
    the pre-move formula on the same arrays."""
    import apet.bench.ort_path as ort_path
    from apet.adapters.llava.adapter import LlavaAdapter
    from apet.bench.stages import Request
    from apet.contracts.plan import plan_compression

    seen = {}
    real = ort_path.compare_outputs

    def spy(reference, candidate, tol, keys=None):
        seen.update(reference=reference, candidate=candidate)
        return real(reference, candidate, tol, keys)

    monkeypatch.setattr(ort_path, "compare_outputs", spy)
    adapter = LlavaAdapter.load(tiny_checkpoint, dtype=torch.float16)
    plan = plan_compression(adapter.spec.n_tokens, 4, ratio=0.11, stages=2)
    result = ort_path.ort_run(adapter, plan, Request(2, 12, 8, (320, 240)), max_context=400, repeats=1,
                              parity_steps=12, workdir=tmp_path, attention="op")
    parity = result["parity"]
    assert parity == _old_parity(seen["candidate"], seen["reference"])
    assert parity["stage1_index_equal"] and parity["stage2_index_overlap"] is not None
    assert parity["max_abs_logit_diff"] > 0 and parity["visual_token_diff"]["median"] > 0
    assert set(parity) == {"stage1_index_equal", "visual_token_diff", "stage2_index_equal", "stage2_index_overlap",
                           "greedy_steps", "greedy_equal_steps", "first_different_step", "max_abs_logit_diff",
                           "abs_logit_diff_by_step", "logit_scale"}
