"""The static decoder's packed prefill (apet.kernels.varlen: each left-padded row as [pads | tokens] causal
segments, no mask) equals its masked prefill: logits, the cache the decode reads, and the decode steps after it.
On CPU the packed form runs the block-diagonal SDPA fallback, so this checks the segment bookkeeping (cu_seqlens
from the mask, stage 2's shortened rows) that FlashAttention varlen runs on the GPU."""

from __future__ import annotations

import pytest
import torch

from apet.contracts.plan import plan_compression
from apet.kernels.varlen import is_left_padded, left_pad_segments, prompt_padding


def test_prompt_padding_names_how_the_rows_pad() -> None:
    assert prompt_padding(torch.ones(2, 5, dtype=torch.long)) == "none"
    assert prompt_padding(torch.tensor([[0, 1, 1], [1, 1, 1]])) == "left"
    assert prompt_padding(torch.tensor([[1, 1, 0]])) == "other"  # right padding: no segments, no causal kernel
    assert prompt_padding(torch.tensor([[1, 0, 1]])) == "other"


def test_auto_attends_causally_only_without_padding_where_flash_runs(tiny_adapter, monkeypatch) -> None:
    """On the GPU (FlashAttention available) ``auto`` takes SDPA's causal kernels for an unpadded prompt, the
    packed segments for a left-padded one and the mask otherwise; an explicit form is kept where it applies."""
    import apet.runtime.static_decoder as static_decoder

    monkeypatch.setattr(static_decoder, "flash_varlen_available", lambda *args: True)
    embeds = torch.zeros(1, 4, tiny_adapter.spec.decoder.hidden_size)
    forms = {form: [static_decoder.StaticDecoder(tiny_adapter, None, max_batch=1, max_context=64,
                                                 prefill_attention=form).prefill_form(embeds, padding)
                    for padding in ("none", "left", "other")]
             for form in static_decoder.PREFILL_ATTENTION}
    assert forms == {"auto": ["causal", "packed", "masked"], "causal": ["causal", "packed", "masked"],
                     "packed": ["packed", "packed", "masked"], "masked": ["masked", "masked", "masked"]}


def test_left_pad_segments_and_the_left_pad_check() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert left_pad_segments(mask).tolist() == [0, 2, 5, 5, 10, 14, 15]
    assert is_left_padded(mask)
    assert not is_left_padded(torch.tensor([[1, 0, 1, 1]]))  # a hole: not two segments
    assert not is_left_padded(torch.tensor([[1, 1, 0, 0]]))  # right padding


def _prompt(hidden: int, length: int, pads: list[int]) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(sum(pads) + length)
    embeds = torch.randn(len(pads), length, hidden, generator=generator)
    mask = torch.ones(len(pads), length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0).masked_fill(mask == 0, 1)  # Hugging Face's left-pad positions
    steps = [torch.randn(len(pads), 1, hidden, generator=generator) for _ in range(3)]
    return embeds, mask, positions, steps


def _run(adapter, stage2, form: str, embeds, mask, positions, start, steps) -> tuple[list[torch.Tensor], object]:
    from apet.runtime.static_decoder import StaticDecoder

    decoder = StaticDecoder(adapter, stage2, max_batch=2, max_context=400, prefill_attention=form)
    padding = prompt_padding(mask)
    assert decoder.prefill_form(embeds, padding) == (form if form != "causal" or padding == "none" else "packed")
    out = [decoder.prefill(embeds, mask, positions, start)]
    for i, step in enumerate(steps):
        out.append(decoder.decode(step, positions[:, -1:] + 1 + i, decoder.span(embeds.shape[1] + i)))
    return out, decoder


@pytest.mark.parametrize("form", ["packed", "causal"])
@pytest.mark.parametrize("pads", [[0], [7], [0, 9], [4, 0], [0, 0]],
                         ids=["b1-pad0", "b1-pad7", "b2-0-9", "b2-4-0", "b2-0-0"])
def test_packed_prefill_equals_masked_prefill_with_stage2(tiny_adapter, pads: list[int], form: str) -> None:
    spec = tiny_adapter.spec
    plan = plan_compression(spec.n_tokens, spec.decoder.num_layers, ratio=0.11, stages=2)
    text = 6
    length = max(pads) + text + plan.stage1_keep + 8
    embeds, mask, positions, steps = _prompt(spec.decoder.hidden_size, length, pads)
    start = torch.tensor([pad + text for pad in pads])  # the image span starts after each row's pads and text
    masked, masked_decoder = _run(tiny_adapter, plan.stage2, "masked", embeds, mask, positions, start, steps)
    packed, packed_decoder = _run(tiny_adapter, plan.stage2, form, embeds, mask, positions, start, steps)
    for got, want in zip(packed, masked):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # what decode reads: every valid cache entry of both cache groups (before and after stage 2), and the validity
    for group, valid in enumerate(masked_decoder.valid):
        assert torch.equal(packed_decoder.valid[group], valid)
    batch = len(pads)
    for i in range(len(masked_decoder.keys)):
        group = 0 if i < masked_decoder.split else 1
        valid = masked_decoder.valid[group][:batch]
        for cache in ("keys", "values"):
            got = getattr(packed_decoder, cache)[i][:batch].transpose(1, 2)[valid]
            want = getattr(masked_decoder, cache)[i][:batch].transpose(1, 2)[valid]
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            # the pads' own entries (junk nothing reads) are finite: a NaN there would reach the decode's softmax
            assert torch.isfinite(getattr(packed_decoder, cache)[i][:batch]).all()


def test_auto_attends_masked_on_cpu(tiny_adapter) -> None:
    """CPU keeps the masked form (bit-identical to before); packing needs FlashAttention or an explicit ask."""
    from apet.runtime.static_decoder import StaticDecoder

    decoder = StaticDecoder(tiny_adapter, None, max_batch=1, max_context=64)
    embeds = torch.zeros(1, 4, tiny_adapter.spec.decoder.hidden_size)
    assert [decoder.prefill_form(embeds, padding) for padding in ("none", "left", "other")] == ["masked"] * 3
    with pytest.raises(ValueError, match="prefill_attention"):
        StaticDecoder(tiny_adapter, None, max_batch=1, max_context=64, prefill_attention="flash")
