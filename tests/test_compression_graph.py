"""The form of ApET that graphs trace (the unrolled Gram-Schmidt solve, row gathers, the merge as one membership
matrix) against the NumPy float64 oracle, and the merge exposed on the result (``members``, ``assignment``)."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest
import torch
from test_compression import CASES, _assert_matches, _random

import apet.compression as compression
from apet.compression import basis_errors, compress
from apet.contracts.compression import PLACEMENTS
from apet.linalg import ridge_orthonormal


@pytest.fixture
def traced_form(monkeypatch: pytest.MonkeyPatch) -> None:
    """What tracing, torch.compile and CUDA-graph capture run: no LAPACK, no host checks."""
    monkeypatch.setattr(compression, "_host_checks_allowed", lambda: False)


TRACED_CASES = [1, 4, 6, 12, 14, 16, 18, 19, 21, 23]  # the eager form runs all of CASES (test_compression.py)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_traced_form_matches_numpy_reference(traced_form: None, placement: str) -> None:
    for case_id in TRACED_CASES:
        batch, n, d, keep, basis = CASES[case_id]
        x = _random(case_id, batch, n, d)
        got = compress(x, keep=keep, basis=basis, placement=placement)
        want_tokens, want_index = ref.compress(x.double().numpy(), keep, basis, placement=placement)
        _assert_matches(got, want_tokens, want_index, x)


def test_ridge_orthonormal_gives_the_ridged_least_squares_projection() -> None:
    """Qᵀ Q = Sᵀ (S Sᵀ + λI)⁻¹ S, the projection the reference's solve applies."""
    s = torch.randn(3, 10, 30, generator=torch.Generator().manual_seed(2))
    q = ridge_orthonormal(s, 1e-5)
    s64 = s.double().numpy()
    want = np.transpose(s64, (0, 2, 1)) @ np.linalg.solve(s64 @ np.transpose(s64, (0, 2, 1)) + 1e-5 * np.eye(10), s64)
    np.testing.assert_allclose((q.transpose(1, 2) @ q).numpy(), want, rtol=1e-4, atol=1e-5)
    duplicated = torch.ones(1, 4, 8)  # a rank-1 basis: the ridge alone keeps every pivot positive
    assert bool(torch.isfinite(ridge_orthonormal(duplicated, 1e-5)).all())


def test_traced_errors_on_ill_conditioned_basis_beat_float32_cholesky(traced_form: None) -> None:
    """Nearly collinear tokens (Gram condition number ~1e5): the traced form is at least as accurate as float32
    LAPACK's Cholesky (what eager calls use), both compared with float64."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 64, generator=generator) + 1e-2 * torch.randn(1, 300, 64, generator=generator)
    basis = torch.arange(0, 300, 30)[None]
    s = x[0, basis[0]].double().numpy()
    coeffs = np.linalg.solve(s @ s.T + 1e-5 * np.eye(10), s @ x[0].double().numpy().T)
    exact = np.linalg.norm(x[0].double().numpy() - coeffs.T @ s, axis=1)
    s32 = x[0, basis[0]]
    lower = torch.linalg.cholesky(s32 @ s32.T + 1e-5 * torch.eye(10))
    q = torch.linalg.solve_triangular(lower, s32, upper=False)
    cholesky = torch.linalg.norm(x[0] - (x[0] @ q.T) @ q, dim=1).double().numpy()
    traced = basis_errors(x, basis)[0].double().numpy()
    assert np.abs(traced - exact).max() <= np.abs(cholesky - exact).max()


def _reference_assignment(x: np.ndarray, keep: int, basis: int, appended: bool) -> np.ndarray:
    """Per token, the position of the error-selected token it joins (its own for a selected one), -1 if none,
    from the oracle's steps (docs/algorithm.md, step 5)."""
    err = ref.errors(x, ref.fps(x, basis))
    by_error = [int(i) for i in np.argsort(-err, kind="stable")]
    ranked = by_error[: keep - basis] if appended else by_error[:keep]
    selected = ranked[: keep - basis]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    out = np.full(x.shape[0], -1)
    for j in range(x.shape[0]):
        if j in selected:
            out[j] = j
        elif j not in ranked:
            out[j] = selected[int(np.argmax([unit[t] @ unit[j] for t in selected]))]
    return out


@pytest.mark.parametrize("placement", ["mask", "rank", "blend", "append"])
@pytest.mark.parametrize("traced", [False, True])
def test_members_and_assignment_are_the_merge(monkeypatch: pytest.MonkeyPatch, placement: str, traced: bool) -> None:
    if traced:
        monkeypatch.setattr(compression, "_host_checks_allowed", lambda: False)
    batch, n, d, keep, basis = CASES[9]
    x = _random(9, batch, n, d)
    got = compress(x, keep=keep, basis=basis, placement=placement)
    for b in range(batch):
        want = _reference_assignment(x[b].double().numpy(), keep, basis, placement == "append")
        assert got.assignment[b].tolist() == want.tolist()
    # the members reproduce the merged rows: the same merge applies to any features aligned with x
    merged = (got.members @ x) / got.members.sum(-1, keepdim=True)  # [B, T, D]
    row_of_target = (got.targets.unsqueeze(-1) == got.index.unsqueeze(1)).to(torch.float32)  # [B, T, K]
    torch.testing.assert_close(merged, row_of_target @ got.tokens, rtol=1e-5, atol=1e-5)
    assert compress(x, keep=keep, basis=basis, placement=placement, merge=False).assignment is None
