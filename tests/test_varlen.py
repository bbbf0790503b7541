"""apet.kernels.varlen: the segment bookkeeping equals attention run segment by segment (float64 loop)."""

import numpy as np
import pytest
import torch

from apet.kernels.varlen import segment_mask, varlen_attention


def _loop(q, k, v, bounds, causal, scale):
    """Each segment on its own, in float64 NumPy: the meaning of the packed call."""
    q, k, v = (t.double().numpy() for t in (q, k, v))
    groups = q.shape[1] // k.shape[1]
    out = np.zeros_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if start == end:
            continue
        for head in range(q.shape[1]):
            qs, ks, vs = q[start:end, head], k[start:end, head // groups], v[start:end, head // groups]
            scores = qs @ ks.T * scale
            if causal:
                scores = np.where(np.tril(np.ones_like(scores, dtype=bool)), scores, -np.inf)
            weights = np.exp(scores - scores.max(-1, keepdims=True))
            out[start:end, head] = (weights / weights.sum(-1, keepdims=True)) @ vs
    return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("groups", [1, 4])
def test_packed_segments_equal_a_loop_over_segments(causal, groups):
    torch.manual_seed(0)
    bounds = [0, 3, 3, 10, 16, 30]  # an empty segment too (a row without left padding)
    total, heads, dim = bounds[-1], 8, 16
    q = torch.randn(total, heads, dim)
    k, v = torch.randn(total, heads // groups, dim), torch.randn(total, heads // groups, dim)
    cu = torch.tensor(bounds, dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max_seqlen=14, causal=causal, scale=0.3)
    np.testing.assert_allclose(out.double().numpy(), _loop(q, k, v, bounds, causal, 0.3), atol=1e-5)


def test_segment_mask_marks_segments_and_causality():
    mask = segment_mask(torch.tensor([0, 2, 2, 5]), 5, causal=True)
    expected = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]], bool)
    assert (mask.numpy() == expected).all()
