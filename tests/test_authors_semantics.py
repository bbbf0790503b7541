"""apet's default placements reproduce the authors' code paths (tests/authors_reference.py), and the
``own`` ablation provably differs from them (issue 12)."""

from __future__ import annotations

import authors_reference as authors
import numpy as np
import pytest
import torch

from apet.compression import compress, compress_with, farthest_point_basis
from apet.contracts.compression import stage_configs


def _features(seed: int, batch: int = 2, n: int = 576, d: int = 256) -> torch.Tensor:
    """Correlated, CLIP-like features: a low-rank part plus noise, a few strong outliers."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, 24, generator=generator) @ torch.randn(24, d, generator=generator) / 5
    x += 0.3 * torch.randn(batch, n, d, generator=generator)
    x[:, ::37] *= 4
    return x


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=1e-5, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stage1_default_is_the_authors_encode_images(seed: int) -> None:
    x = _features(seed)
    stage1, _ = stage_configs(64, None)
    got = compress_with(stage1, x)
    want_tokens, want_index = authors.llava_stage1(x, keep=64, k=10)
    assert got.index.tolist() == want_index.tolist()
    _close(got.tokens, want_tokens)


@pytest.mark.parametrize("seed", [3, 4])
def test_stage2_default_is_the_authors_layer_prune(seed: int) -> None:
    x = _features(seed, n=96, d=128)
    _, stage2 = stage_configs(96, (16, 32))
    got = compress_with(stage2.compression, x)
    for b in range(x.shape[0]):
        want_tokens, want_index = authors.llava_stage2(x[b], keep=32, k=10)
        assert got.index[b].tolist() == want_index.tolist()
        _close(got.tokens[b], want_tokens)


def test_qwen_blend_is_the_authors_pruning_block() -> None:
    x = _features(5, batch=1, n=300, d=128)
    got = compress(x, keep=int(0.3 * 300), placement="blend")
    want_tokens, want_index = authors.qwen_stage1(x[0], keep=90, k=10)
    assert got.index[0].tolist() == want_index.tolist()
    _close(got.tokens[0], want_tokens)


def test_video_append_is_the_authors_encode_videos() -> None:
    x = _features(6, batch=8, n=256, d=96)  # 8 frames of 16x16 projected patch tokens
    got = compress(x, keep=32, placement="append")
    want_tokens, want_index = authors.video_frame(x, selected=22, k=10)
    assert got.index.tolist() == want_index.tolist()
    _close(got.tokens, want_tokens)


def test_fps_with_a_seeded_start_is_the_authors_fps() -> None:
    x = _features(7)
    for start in (0, 5, 400):
        assert farthest_point_basis(x, 10, start).tolist() == authors.fps(x.double(), 10, start).tolist()


def test_own_placement_differs_from_the_paper_where_it_provably_must() -> None:
    """On real-looking features the basis tokens reconstruct themselves (error ~0), so the paper's top-K
    never contains them while ``own`` always keeps them: the index sets overlap in exactly the K-k
    error-selected tokens, and the paper's slots hold basis *vectors* at other tokens' positions."""
    x = _features(8, batch=1)
    keep, k = 64, 10
    basis = set(farthest_point_basis(x, k)[0].tolist())
    paper = compress(x, keep=keep)
    own = compress(x, keep=keep, placement="own")
    want_tokens, want_index = authors.llava_stage1(x, keep=keep, k=k)
    assert paper.index.tolist() == want_index.tolist()  # the default is the paper's
    assert own.index.tolist() != want_index.tolist()
    paper_set, own_set = set(paper.index[0].tolist()), set(own.index[0].tolist())
    assert basis <= own_set and not basis & paper_set
    assert len(paper_set & own_set) == keep - k
    # the basis vectors themselves do appear in the paper's output, at slot positions
    for b in basis:
        assert bool((paper.tokens[0] == x[0, b]).all(-1).any())
