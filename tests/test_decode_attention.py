"""apet.kernels.decode_attention (one query row per head over a static cache's span) against a float64 softmax
attention written from its definition, and against SDPA's grouped form it replaces: split and unsplit spans, grouped
query heads, per-row and shared masks, cache views with the buffer's strides. Triton's interpreter runs it on CPU
(a subprocess: the interpreter is chosen when the kernels are defined); a GPU runs it compiled."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from triton_interpreter import run_interpreted

triton_missing = importlib.util.find_spec("triton") is None

# (batch, heads, kv heads, head size, span, buffer): one kv head (split over the span), LLaVA's 1:1 heads,
# Qwen's 7:1 groups, a span not a multiple of the tile, a batch where the pairs fill the interpreter's 4 units
CASES = [(1, 2, 1, 16, 200, 256), (1, 4, 4, 32, 70, 128), (2, 14, 2, 16, 129, 160), (3, 2, 2, 16, 33, 64)]


def reference(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ/√d + bias)·v in float64, each query head on its kv head (head h -> h // groups)."""
    batch, heads, _, dim = q.shape
    groups = heads // keys.shape[1]
    k = keys.double().repeat_interleave(groups, dim=1)
    v = values.double().repeat_interleave(groups, dim=1)
    scores = q.double() @ k.transpose(-1, -2) / dim ** 0.5 + bias.double()
    return torch.softmax(scores, dim=-1) @ v


def check(device: str) -> None:
    from apet.kernels import decode_attention
    from apet.runtime.static_decoder import grouped_decode_attention

    for case, (batch, heads, kv_heads, dim, span, buffer) in enumerate(CASES):
        for dtype in (torch.float32, torch.float16):
            generator = torch.Generator().manual_seed(case)
            # q as decode's projections leave it: a view of a wider row ([B, 1, (H + 2 Hkv) d] split per head)
            row = torch.randn(batch, 1, (heads + 2 * kv_heads) * dim, generator=generator).to(device, dtype)
            q = row[..., : heads * dim].view(batch, 1, heads, dim).transpose(1, 2)
            cache_k = torch.randn(batch, kv_heads, buffer, dim, generator=generator).to(device, dtype)
            cache_v = torch.randn(batch, kv_heads, buffer, dim, generator=generator).to(device, dtype)
            valid = torch.rand(batch, buffer, generator=generator) > 0.3
            valid[:, span - 1] = True  # the position written now
            minimum = torch.finfo(dtype).min
            bias = torch.where(valid[:, :span], 0.0, minimum).to(device, dtype)[:, None, None, :]
            keys, values = cache_k[:, :, :span], cache_v[:, :, :span]  # views with the buffer's strides
            assert decode_attention.available(q, keys)
            got = decode_attention.decode_attention(q, keys, values, bias)
            want = reference(q, keys, values, bias)
            tol = 1e-5 if dtype == torch.float32 else 4e-3  # fp16: probabilities rounded for the value product
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
            decode_attention.ENABLED["value"] = False
            try:
                sdpa = grouped_decode_attention(q, keys, values, bias, heads // kv_heads)
            finally:
                decode_attention.ENABLED["value"] = True
            torch.testing.assert_close(got, sdpa, rtol=tol, atol=tol)
            shared = decode_attention.decode_attention(q, keys, values, bias[:1])  # one mask row for every row
            torch.testing.assert_close(shared.double(), reference(q, keys, values, bias[:1]), rtol=tol, atol=tol)
    units = 132
    assert decode_attention.splits_for(32, 256, units) == 4  # LLaVA-7B, batch 1: 32 kv heads, span 256
    assert decode_attention.splits_for(4, 1024, units) == 16  # Qwen2.5-VL-7B: 4 kv heads over 1,024 positions
    assert decode_attention.splits_for(128, 256, units) == 1  # batch 4 of LLaVA fills the GPU unsplit


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="the compiled kernel needs a CUDA GPU (the interpreter test below covers it on CPU)")
def test_kernel_on_the_gpu() -> None:
    check("cuda")


@pytest.mark.skipif(triton_missing, reason="Triton is not installed here (CUDA builds of torch ship it)")
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the compiled kernel instead")
def test_kernel_in_the_triton_interpreter(tmp_path: Path) -> None:
    run_interpreted(tmp_path, "import test_decode_attention as t\nt.check('cpu')\n")


def test_sdpa_off_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CUDA or the interpreter the static decoder keeps SDPA (the exported graph's attention)."""
    from apet.kernels import decode_attention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # read per call: CPU tensors, no interpreter
    q, keys = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 8, 16)
    assert not decode_attention.available(q, keys)
