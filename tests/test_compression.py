"""apet.compression against the independent NumPy float64 reference (docs/algorithm.md, "How we check it", rung 1)."""

from __future__ import annotations

import numpy as np
import numpy_reference as ref
import pytest
import torch

from apet.compression import Compressed, basis_errors, compress, density_peak_basis, farthest_point_basis, random_basis
from apet.contracts.compression import PLACEMENTS
from apet.errors import ApetError, InputError, UsageError
from apet.linalg import cholesky_lower, whiten

# (batch, N, D, keep, basis): 24 cases covering small/large N, D, keep near basis+1 and up to N-k (beyond N-k
# the ranking boundary falls among the basis tokens, whose errors are ~0 and tie numerically), and keep = N
CASES = [
    (1, 64, 32, 16, 4), (2, 64, 32, 11, 10), (3, 64, 48, 54, 10), (1, 100, 16, 40, 10),
    (2, 144, 64, 32, 10), (1, 144, 64, 134, 10), (4, 49, 24, 8, 3), (2, 196, 96, 64, 10),
    (1, 196, 96, 50, 12), (1, 256, 128, 64, 10), (2, 256, 32, 24, 8), (1, 300, 40, 100, 10),
    (2, 81, 81, 20, 5), (1, 81, 200, 30, 10), (3, 36, 16, 12, 2), (1, 576, 64, 64, 10),
    (1, 576, 64, 96, 10), (2, 576, 32, 192, 10), (1, 64, 8, 40, 6), (2, 120, 60, 16, 1),
    (1, 400, 50, 200, 16), (2, 32, 128, 9, 8), (1, 225, 72, 72, 10), (1, 144, 32, 144, 10),
]


def _random(case_id: int, batch: int, n: int, d: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + case_id)
    scale = [0.1, 1.0, 7.0][case_id % 3]
    return torch.randn(batch, n, d, generator=generator) * scale + case_id % 2


def _assert_matches(got, want_tokens, want_index, x: torch.Tensor) -> None:
    np.testing.assert_array_equal(got.index.numpy(), want_index)
    np.testing.assert_allclose(got.tokens.double().numpy(), want_tokens, rtol=1e-5, atol=1e-6 * float(x.abs().max()))


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("case_id", range(len(CASES)))
def test_matches_numpy_reference(case_id: int, placement: str) -> None:
    batch, n, d, keep, basis = CASES[case_id]
    x = _random(case_id, batch, n, d)
    got = compress(x, keep=keep, basis=basis, placement=placement)
    want_tokens, want_index = ref.compress(x.double().numpy(), keep, basis, placement=placement)
    assert got.index.dtype == torch.int64
    assert got.index.shape == (batch, keep) and got.tokens.shape == (batch, keep, d)
    _assert_matches(got, want_tokens, want_index, x)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("case_id", [1, 5, 9, 16])
def test_without_merge_keeps_selected_tokens_unchanged(case_id: int, placement: str) -> None:
    batch, n, d, keep, basis = CASES[case_id]
    x = _random(case_id, batch, n, d)
    got = compress(x, keep=keep, basis=basis, merge=False, placement=placement)
    want_tokens, want_index = ref.compress(x.double().numpy(), keep, basis, merge_tokens=False, placement=placement)
    _assert_matches(got, want_tokens, want_index, x)
    # the error-selected rows are untouched originals; only the basis slots changed
    originals = torch.gather(x, 1, got.index[..., None].expand(-1, -1, d))
    unchanged = (got.tokens == originals).all(-1).sum(1)
    assert bool((unchanged >= keep - basis).all())


def test_outliers_on_repeated_background_are_kept() -> None:
    """3 background tokens repeated with a little noise, plus 12 distinct objects: the objects survive.

    The noise keeps background errors distinct (no numerical ties at the selection boundary); the
    budget leaves room for every object outside the basis among the error-selected tokens.
    """
    generator = torch.Generator().manual_seed(7)
    background = torch.randn(3, 64, generator=generator)
    x = background[torch.arange(196) % 3] + 0.01 * torch.randn(196, 64, generator=generator)
    objects = [5, 17, 40, 41, 77, 90, 120, 121, 150, 160, 181, 195]
    x[objects] = torch.randn(len(objects), 64, generator=generator) * 3
    basis = ref.fps(x.double().numpy(), 4)
    keep = 8 + len(set(objects) - set(basis))
    got = compress(x[None], keep=keep, basis=4)
    want_tokens, want_index = ref.compress(x[None].double().numpy(), keep, 4)
    _assert_matches(got, want_tokens, want_index, x)
    assert set(objects) - set(basis) <= set(got.index[0].tolist())
    # background copies were merged into the kept tokens, so kept rows moved
    assert not torch.equal(got.tokens[0], x[got.index[0]])


def test_outliers_in_low_rank_plus_noise_are_kept() -> None:
    """Tokens on a rank-30 subspace with small noise, plus 20 off-subspace outliers."""
    generator = torch.Generator().manual_seed(11)
    n, d, rank = 576, 128, 30
    x = torch.randn(n, rank, generator=generator) @ torch.randn(rank, d, generator=generator) / rank**0.5
    x += 0.01 * torch.randn(n, d, generator=generator)
    outliers = torch.randperm(n, generator=generator)[:20]
    x[outliers] += 4 * torch.randn(20, d, generator=generator)
    got = compress(x[None], keep=64, basis=10)
    want_tokens, want_index = ref.compress(x[None].double().numpy(), 64, 10)
    _assert_matches(got, want_tokens, want_index, x)
    # an outlier survives either at its own position (error-selected) or as a basis vector in a slot
    basis = set(ref.fps(x.double().numpy(), 10))
    assert set(outliers.tolist()) - basis <= set(got.index[0].tolist())
    for b in set(outliers.tolist()) & basis:
        assert bool((got.tokens[0] == x[b]).all(-1).any())


def test_keep_all_returns_every_token_in_order() -> None:
    x = torch.randn(2, 50, 8)
    got = compress(x, keep=50, basis=10)
    assert isinstance(got, Compressed)
    assert got.index.tolist() == [list(range(50))] * 2
    torch.testing.assert_close(got.tokens, x, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_output_in_input_dtype_computed_in_float32(dtype: torch.dtype) -> None:
    x32 = torch.randn(2, 144, 64, generator=torch.Generator().manual_seed(3))
    x = x32.to(dtype)
    got = compress(x, keep=32)
    assert got.tokens.dtype == dtype
    want = compress(x.to(torch.float32), keep=32)
    assert torch.equal(got.index, want.index)
    torch.testing.assert_close(got.tokens, want.tokens.to(dtype))


def test_fps_is_plain_farthest_point_sampling() -> None:
    x = torch.randn(3, 100, 16, generator=torch.Generator().manual_seed(5))
    got = farthest_point_basis(x, 12)
    for b in range(3):
        assert got[b].tolist() == ref.fps(x[b].double().numpy(), 12)
    duplicated = torch.ones(1, 20, 4)  # every distance zero: plain FPS (chosen tokens not masked) re-picks 0
    assert farthest_point_basis(duplicated, 5)[0].tolist() == [0, 0, 0, 0, 0]
    two = torch.zeros(1, 6, 2)
    two[0, 4] = 1.0  # after 0 and 4 every remaining distance is 0, and argmax takes the first
    assert farthest_point_basis(two, 4)[0].tolist() == [0, 4, 0, 0]


def test_fps_seed_changes_start_reproducibly() -> None:
    x = torch.randn(1, 144, 32, generator=torch.Generator().manual_seed(8))
    a = compress(x, keep=40, seed=3)
    b = compress(x, keep=40, seed=3)
    assert torch.equal(a.index, b.index)
    starts = {int(farthest_point_basis(x, 1, start)[0, 0]) for start in (0, 7)}
    assert starts == {0, 7}


def test_dpc_matches_reference() -> None:
    x = torch.randn(2, 81, 24, generator=torch.Generator().manual_seed(9))
    got = density_peak_basis(x, 6)
    for b in range(2):
        assert sorted(got[b].tolist()) == sorted(ref.dpc(x[b].double().numpy(), 6))
    result = compress(x, keep=20, basis=6, method="dpc")
    want_tokens, want_index = ref.compress(x.double().numpy(), 20, 6, method="dpc")
    np.testing.assert_array_equal(result.index.numpy(), want_index)
    np.testing.assert_allclose(result.tokens.double().numpy(), want_tokens, rtol=1e-4, atol=1e-5)


def test_random_basis_is_seeded_distinct_and_shared_across_batch() -> None:
    x = torch.randn(3, 64, 32, generator=torch.Generator().manual_seed(10))  # D > basis: errors are not all ~0
    a, b = random_basis(x, 10, seed=1), random_basis(x, 10, seed=1)
    assert torch.equal(a, b) and torch.equal(a[0], a[2])
    assert len(set(a[0].tolist())) == 10
    assert not torch.equal(a, random_basis(x, 10, seed=2))
    got = compress(x, keep=20, basis=10, method="random", seed=1)
    for i in range(3):
        want_tokens, want_index = ref.compress_one(x[i].double().numpy(), 20, 10, basis_index=a[0].tolist())
        assert got.index[i].tolist() == want_index.tolist()
        np.testing.assert_allclose(got.tokens[i].double().numpy(), want_tokens, rtol=1e-4, atol=1e-5)


def test_basis_errors_match_reference_and_vanish_on_basis() -> None:
    x = torch.randn(2, 90, 40, generator=torch.Generator().manual_seed(12))
    basis = torch.tensor([[0, 5, 9, 33], [1, 2, 50, 89]])
    got = basis_errors(x, basis)
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), ref.errors(x[b].double().numpy(), basis[b].tolist()),
                                   rtol=1e-4, atol=1e-4)
        assert float(got[b, basis[b]].max()) < 1e-3 * float(got[b].max())


def test_whitened_basis_gives_the_least_squares_projection() -> None:
    """Qᵀ Q with Q = L⁻¹ S equals Sᵀ (S Sᵀ + λI)⁻¹ S, the projection the reference's solve applies."""
    generator = torch.Generator().manual_seed(2)
    s = torch.randn(3, 10, 30, generator=generator)
    gram = s @ s.transpose(1, 2) + 1e-5 * torch.eye(10)
    lower = cholesky_lower(gram)
    assert torch.equal(lower, torch.tril(lower))
    torch.testing.assert_close(lower @ lower.transpose(1, 2), gram, rtol=1e-5, atol=1e-4)
    q = whiten(gram, s)
    s64, g64 = s.double().numpy(), gram.double().numpy()
    want = np.transpose(s64, (0, 2, 1)) @ np.linalg.solve(g64, s64)
    np.testing.assert_allclose((q.transpose(1, 2) @ q).numpy(), want, rtol=1e-4, atol=1e-5)


def test_errors_on_ill_conditioned_basis_are_as_good_as_float32_lapack() -> None:
    """Nearly collinear tokens (Gram condition number ~1e5): the exportable path is as accurate as
    float32 LAPACK; both are compared with float64."""
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(1, 1, 64, generator=generator) + 1e-2 * torch.randn(1, 300, 64, generator=generator)
    basis = torch.arange(0, 300, 30)[None]
    s = x[0, basis[0]].double()
    coeffs = np.linalg.solve((s @ s.T).numpy() + 1e-5 * np.eye(10), (s @ x[0].double().T).numpy())
    exact = np.linalg.norm(x[0].double().numpy() - coeffs.T @ s.numpy(), axis=1)
    eager = basis_errors(x, basis)[0].double().numpy()  # LAPACK Cholesky + triangular solve
    s32 = x[0, basis[0]]
    q = whiten(s32 @ s32.T + 1e-5 * torch.eye(10), s32)  # what an exported graph computes
    exported = torch.linalg.norm(x[0] - (x[0] @ q.T) @ q, dim=1).double().numpy()
    scale = exact.max()
    assert np.abs(exported - exact).max() / scale < 2 * np.abs(eager - exact).max() / scale + 1e-5


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        (dict(x=torch.randn(10, 8), keep=5), InputError, ["3-D", "(10, 8)"]),
        (dict(x=torch.randint(0, 3, (1, 10, 8)), keep=5), InputError, ["floating-point"]),
        (dict(x=torch.full((1, 20, 4), float("nan")), keep=12), InputError, ["NaN"]),
        (dict(x=torch.randn(1, 20, 4), keep=10, basis=10), UsageError, ["keep=10", "[11, 20]"]),
        (dict(x=torch.randn(1, 20, 4), keep=21), UsageError, ["keep=21", "[11, 20]"]),
        (dict(x=torch.randn(1, 20, 4), keep=8, basis=0), UsageError, ["basis=0"]),
        (dict(x=torch.randn(1, 20, 4), keep=12, method="kmeans"), UsageError, ["method='kmeans'", "fps"]),
    ],
)
def test_validation_errors_name_argument_value_and_range(kwargs, error, words) -> None:
    with pytest.raises(error) as info:
        compress(**kwargs)
    assert isinstance(info.value, ApetError)
    for word in words:
        assert word in str(info.value)
