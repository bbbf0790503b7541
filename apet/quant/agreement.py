"""How closely a quantized LLM follows the float one: teacher-forced top-1 agreement and mean
KL(float || quantized) of the next-token distributions.

Teacher-forced: both models read the same tokens — each prompt (image spliced in) followed by the
float model's own greedy continuation — and are compared at every position, so one early
disagreement does not derail the rest of the sequence as it would in free generation. The comparison of the
two logit sequences is apet check's (:func:`apet.contracts.comparison.next_token_agreement`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from apet.contracts.comparison import next_token_agreement
from apet.modeling.adapter import VisionLanguageAdapter
from apet.quant.calibration import CalibrationSample


@dataclass(frozen=True)
class Agreement:
    top1: float  # fraction of positions whose argmax tokens agree
    kl: float  # mean KL(float || quantized), nats
    positions: int

    def to_json(self) -> dict[str, float]:
        return {"top1_agreement": round(self.top1, 4), "mean_kl": round(self.kl, 5), "positions": self.positions}


@torch.no_grad()
def sequence_logits(adapter: VisionLanguageAdapter, embeds: torch.Tensor, mask: torch.Tensor,
                    positions: torch.Tensor, injected: torch.Tensor | None = None,
                    rows: torch.Tensor | None = None) -> torch.Tensor:
    """Logits at every position [T, V] (float32) through the model's own HF layers, no cache (``injected`` /
    ``rows``: the family's per-layer visual inputs, see :class:`CalibrationSample`)."""
    from apet.quant.apply import _run_layer

    hidden = embeds
    sample = CalibrationSample(embeds, mask, positions, injected, rows)
    for index, layer in enumerate(adapter.decoder_layers()):
        hidden = _run_layer(adapter, layer, hidden, sample, index)
    return adapter.lm_head()(adapter.final_norm()(hidden))[0].float()


def _extend(adapter: VisionLanguageAdapter, sample: CalibrationSample, token: torch.Tensor) -> CalibrationSample:
    embed = adapter.embed_tokens()(token.view(1, 1)).to(sample.embeds.dtype)
    positions = sample.positions
    nxt = positions[..., -1:] + 1
    rows = None if sample.rows is None else torch.cat([sample.rows, torch.full_like(sample.rows[:, :1], -1)], dim=1)
    return CalibrationSample(torch.cat([sample.embeds, embed], dim=1),
                             torch.cat([sample.mask, torch.ones_like(sample.mask[:, :1])], dim=1),
                             torch.cat([positions, nxt], dim=-1), sample.injected, rows)


@torch.no_grad()
def teacher_forced_sequences(reference: VisionLanguageAdapter, samples: list[CalibrationSample],
                             new_tokens: int) -> list[CalibrationSample]:
    """Each prompt extended by the reference's greedy continuation (what both models are then fed)."""
    out = []
    for sample in samples:
        for _ in range(new_tokens):
            logits = sequence_logits(reference, sample.embeds, sample.mask, sample.positions, sample.injected,
                                     sample.rows)
            sample = _extend(reference, sample, logits[-1].argmax())
        out.append(sample)
    return out


@torch.no_grad()
def agreement(reference: VisionLanguageAdapter, quantized: VisionLanguageAdapter,
              sequences: list[CalibrationSample]) -> Agreement:
    """Compare the quantized model with the reference on the reference's sequences (logits are computed
    one sequence at a time: a 7B vocabulary over many prompts would not fit memory at once)."""
    agree, kl, count = 0, 0.0, 0
    for s in sequences:
        ref = sequence_logits(reference, s.embeds, s.mask, s.positions, s.injected, s.rows)
        got = sequence_logits(quantized, s.embeds.to(quantized.dtype), s.mask, s.positions, s.injected, s.rows)
        valid = s.mask[0].bool()
        same, divergence = next_token_agreement(ref[valid].cpu().numpy(), got[valid].cpu().numpy())
        agree, kl, count = agree + same, kl + divergence, count + int(valid.sum())
    return Agreement(agree / max(count, 1), kl / max(count, 1), count)
